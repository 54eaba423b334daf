"""DreamBooth's class images: made with the base model itself when a `prior` subset asks for more than it has.

Prior preservation trains on images of the subject's class ("a photo of a dog") that the base model draws, so the
model keeps drawing other dogs after it learned "sks dog". A subset with `prior: true, generate: N` and the class
prompt as `default_caption` gets its missing images generated once, before training, through sdtune's own sampler
(the schedulers and guidance of `sdtune sample`); a later run finds them and generates nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from sdtune.data.dataset import derive_seed
from sdtune.data.records import IMAGE_SUFFIXES

STEPS, GUIDANCE, SCHEDULER = 25, 7.5, "dpmpp_2m"


def existing_images(folder: Path) -> int:
    return sum(1 for path in folder.glob("*") if path.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else 0


def generate_class_images(
    folder: str | Path, prompt: str, count: int, size: int, pretrained: str, revision: str | None = None,
    pretrained_config: str | None = None, seed: int = 0, steps: int = STEPS, setting: str = "data.subsets",
) -> int:  # fmt: skip
    """Fill `folder` up to `count` images of `prompt` (size × size, each with a .txt caption); returns how many were
    made. Image i's noise comes from (seed, i), so an interrupted run's rerun makes the same images."""
    import torch

    from sdtune.inference.sampling import generate, make_scheduler
    from sdtune.models.pretrained import load_pipeline

    folder = Path(folder).expanduser()
    have = existing_images(folder)
    if have >= count:
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    pipe = load_pipeline(pretrained, revision, dtype=torch.float16 if cuda else torch.float32,
                         device="cuda" if cuda else "cpu", pretrained_config=pretrained_config)  # fmt: skip
    pipe.scheduler = make_scheduler(SCHEDULER, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    rank_zero_info(f"{setting}: generating {count - have} class images of '{prompt}' in {folder} with the base model")
    for index in range(have, count):
        image = generate(pipe, [prompt], [derive_seed(seed, "class", index)], STEPS if steps is None else steps,
                         GUIDANCE, size, size)[0][0]  # fmt: skip
        name = folder / f"class_{index:05d}"
        name.with_suffix(".txt").write_text(prompt + "\n", encoding="utf-8")
        partial = name.with_suffix(".partial")
        image.save(partial, format="PNG")
        os.replace(partial, name.with_suffix(".png"))  # a run killed mid-write leaves no half image
    return count - have

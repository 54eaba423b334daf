"""The model card (`README.md`) beside a diffusers export, as diffusers' training scripts write one for the Hub: YAML
front matter (base model, tags, trigger words, license when the base model's card names one) built with
huggingface_hub's `ModelCardData`, then what the adapter is, how it was trained, the run's last sample grid and how
to load it."""

from __future__ import annotations

import shutil
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from sdtune.adapters.kohya import lora_layers
from sdtune.export.source import ADAPTER, Adapted
from sdtune.inference.sampling import denoiser_of

CARD = "README.md"
SAMPLES = "samples.png"  # the run's last sample grid, copied beside the card


def last_sample_grid(run_dir: Path | None) -> Path | None:
    """`<run>/samples/step_NNNNNN/grid.png` of the highest step, or None when the run sampled nothing."""
    grids = sorted((run_dir / "samples").glob("step_*/grid.png")) if run_dir is not None else []
    return grids[-1] if grids else None


def base_license(pretrained: str) -> str | None:
    """The license a local base model's own card declares (Hub models are not looked up: export works offline)."""
    card = Path(pretrained) / CARD
    if not card.is_file():
        return None
    try:
        return ModelCard.load(card).data.license
    except Exception:  # a card that does not parse just leaves the license out
        return None


def write_model_card(adapted: Adapted, out: Path) -> Path:
    """Write `out/README.md` (and `out/samples.png` when the run has samples) for the adapter in `out`."""
    info, family, pipe = adapted.info, adapted.family, type(adapted.pipe).__name__
    layers = lora_layers(denoiser_of(adapted.pipe), ADAPTER)
    first = next(iter(layers.values()))
    rank, alpha = first.r[ADAPTER], first.lora_alpha[ADAPTER]
    triggers = ", ".join(info.trigger_words)
    grid = last_sample_grid(adapted.run_dir)
    if grid is not None:
        shutil.copyfile(grid, out / SAMPLES)
    data = ModelCardData(
        base_model=info.base_model,
        library_name="diffusers",
        license=base_license(adapted.pretrained),
        tags=["lora", "diffusers", "text-to-image", family.name, "sdtune"],
        instance_prompt=triggers or None,
        widget=[{"text": triggers or info.title, "output": {"url": SAMPLES}}] if grid is not None else None,
    )
    settings = {
        "LoRA rank / alpha": f"{rank} / {alpha:g}",
        "text-encoder LoRA": "yes" if any(e is not None for e in adapted.text_encoders) else "no",
        "steps": info.steps,
        "learning rate": info.learning_rate,
        "text-encoder learning rate": info.text_encoder_lr,
        "resolution": f"{info.resolution[0]}×{info.resolution[1]}" if info.resolution else None,
        "optimizer": info.optimizer,
        "prediction type": info.prediction_type,
        "zero terminal SNR": "yes" if info.zero_terminal_snr else None,
        "clip skip": info.clip_skip,
        "date": info.date,
    }
    rows = "\n".join(f"| {name} | {value} |" for name, value in settings.items() if value is not None)
    prompt = f"{triggers}, a photo" if triggers else "a photo"
    body = [
        f"# {info.title}",
        f"A LoRA for {_named(info.base_model)} ({family.label}), trained with sdtune "
        f"({len(layers)} adapted layers in the denoiser).",
        f"## Trigger words\n\nUse `{triggers}` in the prompt." if triggers else "",
        f"## Training settings\n\n| setting | value |\n| --- | --- |\n{rows}",
        f"## Samples\n\nThe run's last sample grid (step {int(grid.parent.name[5:])}):\n\n"
        f"![samples]({SAMPLES})" if grid is not None else "",
        "## Use it\n\n"
        "diffusers (this folder's `pytorch_lora_weights.safetensors`):\n\n"
        f"```python\nfrom diffusers import {pipe}\n\npipe = {pipe}.from_pretrained(\"{info.base_model}\")\n"
        f"pipe.load_lora_weights(\"path/to/this/folder\")\nimage = pipe(\"{prompt}\").images[0]\n```\n\n"
        "AUTOMATIC1111, Forge and ComfyUI read the kohya file: the run's `adapter/<run name>.safetensors`, or "
        "`sdtune export <run> --format kohya --out my_lora.safetensors`.",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(part for part in body if part) + "\n")
    card.save(out / CARD)
    return out / CARD


def _named(base_model: str) -> str:
    """A Hub id as a link to its page; a local model by its folder name."""
    return f"[{base_model}](https://huggingface.co/{base_model})" if "/" in base_model else f"`{base_model}`"

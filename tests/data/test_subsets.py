"""Several folders per run: repeats, prefixes, default captions, kohya `<repeats>_<words>` layouts, validation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

import sdtune.data.subsets as subsets_module
from sdtune.data import CaptionDataModule, Subset
from sdtune.errors import SdtuneError


def images(root: Path, count: int, captions: dict[int, str] | None = None, stem: str = "img") -> Path:
    """`count` wide ramps (so random crops differ), with .txt captions for the indices in `captions`."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        ramp = Image.new("RGB", (48, 8))
        ramp.putdata([(5 * x, 7 * i, 0) for _ in range(8) for x in range(48)])
        ramp.save(root / f"{stem}{i}.png")
        if captions and i in captions:
            (root / f"{stem}{i}.txt").write_text(captions[i])
    return root


def epoch(dm: CaptionDataModule) -> list[dict]:
    return [sample for batch in dm.train_dataloader() for sample in unbatch(batch)]


def unbatch(batch: dict) -> list[dict]:
    return [{key: batch[key][i] for key in batch} for i in range(len(batch["path"]))]


def test_repeats_prefix_and_default_caption(tmp_path, tiny_model_dir):
    instance = images(tmp_path / "instance", 2, {0: "a dog on grass"})
    regular = images(tmp_path / "regular", 3, {0: "a dog", 1: "a dog", 2: "a dog"})
    dm = CaptionDataModule(
        subsets=[Subset(str(instance), repeats=8, prefix="sks", default_caption="dog"), Subset(str(regular))],
        resolution=8, batch_size=5, pretrained=str(tiny_model_dir),
    )  # fmt: skip
    dm.setup("fit")
    samples = epoch(dm)

    assert dm.record_count == 2 * 8 + 3 == len(samples)
    counts = Counter(s["path"] for s in samples)
    assert counts == {str(instance / "img0.png"): 8, str(instance / "img1.png"): 8,
                      **{str(regular / f"img{i}.png"): 1 for i in range(3)}}  # fmt: skip
    captions = {s["path"]: s["caption"] for s in samples}
    assert captions[str(instance / "img0.png")] == "sks, a dog on grass"
    assert captions[str(instance / "img1.png")] == "sks, dog"  # default caption, then the prefix
    assert captions[str(regular / "img0.png")] == "a dog"
    # Every repeat is its own sample with its own random crop.
    crops = {tuple(s["pixel_values"][0, 0].tolist()) for s in samples if s["path"] == str(instance / "img0.png")}
    assert len(crops) > 3


def test_tag_options_never_touch_the_prefix_and_validation_keeps_captions(tmp_path, tiny_model_dir):
    root = images(tmp_path / "instance", 6, {i: "a dog, on grass, sunny" for i in range(6)})
    dm = CaptionDataModule(
        subsets=[Subset(str(root), repeats=3, prefix="sks")], resolution=8, batch_size=4, tag_dropout=1.0,
        shuffle_tags=True, random_flip=True, val_fraction=0.34, pretrained=str(tiny_model_dir),
    )  # fmt: skip
    dm.setup("fit")

    train_paths = {r.path for r in dm.train_records}
    val_paths = [r.path for r in dm.val_records]
    assert len(val_paths) == 2 and len(set(val_paths)) == 2 and not train_paths & set(val_paths)
    assert dm.record_count == 4 * 3  # repeats apply to the training images only
    assert {s["caption"] for s in epoch(dm)} == {"sks"}  # every tag dropped, the prefix stays
    val = [s for batch in dm.val_dataloader() for s in unbatch(batch)]
    assert sorted(s["path"] for s in val) == sorted(val_paths)  # once each, no repeats
    assert {s["caption"] for s in val} == {"sks, a dog, on grass, sunny"}


def test_kohya_layout_becomes_one_subset_per_folder(tmp_path, tiny_model_dir, monkeypatch):
    logged: list[str] = []
    monkeypatch.setattr(subsets_module, "rank_zero_info", logged.append)
    images(tmp_path / "train" / "10_sks dog", 3, {2: "a sks dog on grass"})
    images(tmp_path / "train" / "1_dog", 2)
    (tmp_path / "train" / "notes.toml").write_text("# kohya config next to the folders is fine")
    dm = CaptionDataModule(str(tmp_path / "train"), resolution=8, batch_size=8, pretrained=str(tiny_model_dir))
    dm.setup("fit")

    assert logged == [
        "data: subset '10_sks dog': 3 images × 10 repeats",
        "data: subset '1_dog': 2 images × 1 repeats",
    ]
    assert dm.record_count == 3 * 10 + 2
    captions = {Path(s["path"]).relative_to(tmp_path / "train").as_posix(): s["caption"] for s in epoch(dm)}
    assert captions == {
        "10_sks dog/img0.png": "sks dog", "10_sks dog/img1.png": "sks dog", "10_sks dog/img2.png": "a sks dog on grass",
        "1_dog/img0.png": "dog", "1_dog/img1.png": "dog",
    }  # fmt: skip


def test_kohya_subset_repeats_multiply_and_plain_root_is_not_announced(tmp_path, tiny_model_dir, monkeypatch):
    logged: list[str] = []
    monkeypatch.setattr(subsets_module, "rank_zero_info", logged.append)
    images(tmp_path / "kohya" / "3_cat", 2)
    plain = tmp_path / "plain"
    images(plain / "photos", 2)  # images only in a subfolder not named like kohya's: an ordinary folder
    dm = CaptionDataModule(
        subsets=[Subset(str(tmp_path / "kohya"), repeats=2, default_caption="a cat")], pretrained=str(tiny_model_dir)
    )
    dm.setup("fit")
    assert dm.record_count == 2 * 3 * 2 and {r.caption for r in dm.train_records} == {"a cat"}
    assert logged == ["data: subset '3_cat': 2 images × 6 repeats"]

    logged.clear()
    dm = CaptionDataModule(str(plain), pretrained=str(tiny_model_dir))
    dm.setup("fit")
    assert dm.record_count == 2 and logged == []


def test_kohya_layout_with_a_stray_folder_names_it(tmp_path, tiny_model_dir):
    images(tmp_path / "train" / "10_sks dog", 1)
    images(tmp_path / "train" / "extras", 1)
    with pytest.raises(SdtuneError, match=r"^data.root '.*train' has kohya .*but also 'extras'; rename") as caught:
        CaptionDataModule(str(tmp_path / "train"), pretrained=str(tiny_model_dir)).setup("fit")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({}, "pass exactly one of data.root and data.subsets"),
        ({"root": "a", "subsets": [Subset("b")]}, "pass exactly one of data.root and data.subsets, not both"),
        ({"subsets": []}, "data.subsets is empty; list at least one folder, or pass data.root instead"),
        ({"subsets": [Subset("a"), Subset("b", repeats=0)]}, "data.subsets[1].repeats must be ≥ 1, got 0"),
        ({"subsets": [Subset("")]}, "data.subsets[0].root is empty"),
        ({"subsets": [{"root": "a", "repeat": 2}]}, "data.subsets[0]: "),
    ],
)
def test_bad_subset_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(SdtuneError) as caught:
        CaptionDataModule(**kwargs)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_dict_subsets_and_missing_subset_root_name_the_setting(tmp_path, tiny_model_dir):
    root = images(tmp_path / "a", 1)
    dm = CaptionDataModule(subsets=[{"root": str(root), "repeats": 2}], pretrained=str(tiny_model_dir))
    dm.setup("fit")
    assert dm.record_count == 2 and isinstance(dm.subsets[0], Subset)
    bad = CaptionDataModule(subsets=[Subset(str(root)), Subset(str(tmp_path / "gone"))], pretrained=str(tiny_model_dir))
    with pytest.raises(SdtuneError, match=r"^data.subsets\[1\].root '.*gone' does not exist$"):
        bad.setup("fit")


def test_repeats_are_identical_across_worker_counts(tmp_path, tiny_model_dir):
    root = images(tmp_path / "instance", 3, {i: "a, b, c, d" for i in range(3)})

    def run(workers: int) -> list[dict]:
        dm = CaptionDataModule(
            subsets=[Subset(str(root), repeats=4, prefix="sks")], resolution=8, batch_size=3, random_flip=True,
            shuffle_tags=True, tag_dropout=0.3, num_workers=workers, seed=4, pretrained=str(tiny_model_dir),
        )  # fmt: skip
        return epoch(dm)

    inline, workers = run(0), run(2)
    assert [s["caption"] for s in inline] == [s["caption"] for s in workers]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(inline, workers))
    assert len({s["caption"] for s in inline}) > 3  # the tag options really were active

"""Loss masks: matched from a mask folder or taken from alpha, and cropped/flipped exactly like their image."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from sdtune.data import CaptionDataModule, Subset
from sdtune.errors import SdtuneError

RED, BLUE = (255, 0, 0), (0, 0, 255)


def red_blue(path: Path, size: tuple[int, int] = (40, 20)) -> Path:
    """Left half red, right half blue."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, BLUE)
    image.paste(RED, (0, 0, size[0] // 2, size[1]))
    image.save(path)
    return path


def left_white(path: Path, size: tuple[int, int] = (40, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    mask.save(path)
    return path


def samples(dm: CaptionDataModule, loader: str = "train_dataloader") -> list[dict]:
    return [
        {key: batch[key][i] for key in batch} for batch in getattr(dm, loader)() for i in range(len(batch["path"]))
    ]


@pytest.mark.parametrize("mask_size", [(40, 20), (80, 40)])  # a mask at another scale is resized to the image
def test_mask_gets_the_same_random_crop_and_flip_as_its_image(tmp_path, tiny_model_dir, mask_size):
    red_blue(tmp_path / "images" / "pic.png")
    left_white(tmp_path / "masks" / "pic.png", mask_size)
    dm = CaptionDataModule(
        subsets=[Subset(str(tmp_path / "images"), repeats=40)], resolution=16, batch_size=8, random_flip=True,
        mask_dir=str(tmp_path / "masks"), pretrained=str(tiny_model_dir),
    )  # fmt: skip
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["mask"].shape == (8, 1, 16, 16) and batch["mask"].dtype == torch.float32

    white_left, mixed, white_fractions = 0, 0, set()
    for sample in samples(dm):
        pixels, mask = sample["pixel_values"], sample["mask"][0]
        assert 0.0 <= mask.min() and mask.max() <= 1.0
        red = (pixels[0] > 0.8) & (pixels[2] < -0.8)
        blue = (pixels[2] > 0.8) & (pixels[0] < -0.8)
        assert red.any() or blue.any()
        mixed += bool(red.any() and blue.any())
        assert (mask[red] > 0.5).all() and (mask[blue] < 0.5).all()  # soft only in the boundary column
        white_left += bool(mask[:, 0].mean() > 0.5)
        white_fractions.add(round((mask > 0.5).float().mean().item(), 3))
    assert 8 < white_left < 32  # some samples were flipped (white on the right), some not
    assert len(white_fractions) > 4 and mixed > 20  # the crop box moved, mostly across the red/blue boundary


def test_masks_match_by_relative_path_with_any_suffix_and_missing_ones_weigh_fully(tmp_path, tiny_model_dir):
    images, masks = tmp_path / "images", tmp_path / "masks"
    red_blue(images / "a.jpg")
    red_blue(images / "sub" / "b.png")
    red_blue(images / "c.png")
    (masks / "sub").mkdir(parents=True)
    Image.new("L", (40, 20), 0).save(masks / "a.png")  # a .png mask for a .jpg image
    Image.new("L", (40, 20), 128).save(masks / "sub" / "b.webp", lossless=True)
    dm = CaptionDataModule(
        str(images), resolution=8, batch_size=3, center_crop=True, mask_dir=str(masks), val_fraction=0.3,
        pretrained=str(tiny_model_dir),
    )  # fmt: skip
    with pytest.warns(UserWarning, match=rf"^1 of 2 images have no mask in {masks}; they train with full weight$"):
        dm.setup("fit")

    by_name = {Path(s["path"]).name: s["mask"] for s in samples(dm) + samples(dm, "val_dataloader")}
    assert set(by_name) == {"a.jpg", "b.png", "c.png"}  # validation items carry masks too
    assert torch.equal(by_name["a.jpg"], torch.zeros(1, 8, 8))
    assert torch.allclose(by_name["b.png"], torch.full((1, 8, 8), 128 / 255))
    assert torch.equal(by_name["c.png"], torch.ones(1, 8, 8))


def test_kohya_folders_find_masks_mirroring_the_parent(tmp_path, tiny_model_dir):
    red_blue(tmp_path / "train" / "5_sks" / "x.png")
    left_white(tmp_path / "masks" / "5_sks" / "x.png")
    dm = CaptionDataModule(
        str(tmp_path / "train"), resolution=8, center_crop=True, mask_dir=str(tmp_path / "masks"),
        pretrained=str(tiny_model_dir),
    )  # fmt: skip
    dm.setup("fit")
    mask = samples(dm)[0]["mask"][0]
    assert mask[:, :3].min() > 0.95 and mask[:, -3:].max() < 0.05


def test_alpha_mask_uses_opacity_and_warns_about_opaque_images(tmp_path, tiny_model_dir):
    rgba = Image.new("RGBA", (16, 16), (0, 0, 255, 255))
    rgba.paste((255, 0, 0, 0), (0, 0, 8, 16))  # left half fully transparent
    (tmp_path / "images").mkdir()
    rgba.save(tmp_path / "images" / "cutout.png")
    red_blue(tmp_path / "images" / "opaque.png", (16, 16))
    dm = CaptionDataModule(
        str(tmp_path / "images"), resolution=16, batch_size=2, center_crop=True, alpha_mask=True,
        pretrained=str(tiny_model_dir),
    )  # fmt: skip
    with pytest.warns(UserWarning, match=r"^1 of 2 images have no alpha channel; they train with full weight$"):
        dm.setup("fit")

    by_name = {Path(s["path"]).name: s for s in samples(dm)}
    cutout = by_name["cutout.png"]
    assert torch.equal(cutout["mask"][0, :, :8], torch.zeros(16, 8))
    assert torch.equal(cutout["mask"][0, :, 8:], torch.ones(16, 8))
    assert torch.equal(cutout["pixel_values"][:, :, :8], torch.ones(3, 16, 8))  # transparent pixels are white
    assert torch.equal(by_name["opaque.png"]["mask"], torch.ones(1, 16, 16))


def test_mask_errors_are_one_line(tmp_path, tiny_model_dir):
    with pytest.raises(SdtuneError, match="^data.mask_dir and data.alpha_mask both set"):
        CaptionDataModule("x", mask_dir="m", alpha_mask=True)

    red_blue(tmp_path / "images" / "pic.png")
    left_white(tmp_path / "masks" / "pic.png", (20, 20))
    dm = CaptionDataModule(
        str(tmp_path / "images"), resolution=8, mask_dir=str(tmp_path / "masks"), pretrained=str(tiny_model_dir)
    )
    dm.setup("fit")
    with pytest.raises(SdtuneError, match=r"^mask '.*pic.png' is 20x20 but its image '.*pic.png' is 40x20; masks"):
        dm.train_dataloader().dataset[0]

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"image": [str(tmp_path / "images" / "pic.png")], "text": ["a"]}).cast_column(
        "image", datasets.Image()
    ).save_to_disk(str(saved))
    dm = CaptionDataModule(str(saved), mask_dir=str(tmp_path / "masks"), pretrained=str(tiny_model_dir))
    with pytest.raises(SdtuneError, match=r"^data.mask_dir cannot be matched to rows of a saved dataset"):
        dm.setup("fit")

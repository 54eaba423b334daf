"""Transforms, the reproducible CaptionDataset and CaptionDataModule (through Lightning)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from sdtune.data import BucketBatchSampler, CaptionDataModule, CaptionDataset
from sdtune.data.images import open_image
from sdtune.data.records import Record
from sdtune.data.transforms import preprocess
from sdtune.errors import SdtuneError
from sdtune.models.tiny import build_tiny_stable_diffusion, write_tokenizer


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture
def tokenizer(tmp_path) -> CLIPTokenizer:
    write_tokenizer(tmp_path / "tokenizer")
    return CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")


def gradient_image(path: Path, size: tuple[int, int] = (12, 8)) -> Path:
    """Left-to-right red ramp: any flip or horizontal shift changes the pixels."""
    width, height = size
    image = Image.new("RGB", size)
    image.putdata([(255 * x // (width - 1), 0, 0) for _ in range(height) for x in range(width)])
    image.save(path)
    return path


def captioned_folder(root: Path, count: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        gradient_image(root / f"{i:02d}.png", size=(20, 12))
        (root / f"{i:02d}.txt").write_text(f"picture number {i}")
    return root


# --- transforms -------------------------------------------------------------------------------------------


def test_non_square_input_gives_square_tensor_in_range():
    image = Image.new("RGB", (37, 23), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 37, 11))  # top half black, bottom white
    pixels = preprocess(image, 16, center_crop=True)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    assert pixels.min() == -1.0 and pixels.max() == 1.0
    assert pixels[:, 0].mean() < -0.9 and pixels[:, -1].mean() > 0.9  # top stays black, bottom white


def test_center_crop_keeps_the_middle():
    image = Image.new("RGB", (30, 10), (255, 0, 0))
    image.paste((0, 255, 0), (10, 0, 20, 10))  # red | green | blue stripes
    image.paste((0, 0, 255), (20, 0, 30, 10))
    pixels = preprocess(image, 10, center_crop=True)
    assert torch.equal(pixels[1], torch.ones(10, 10)) and torch.equal(pixels[0], -torch.ones(10, 10))


def test_random_crop_follows_the_generator(tmp_path):
    image = open_image(str(gradient_image(tmp_path / "g.png", size=(64, 8))))
    crops = [preprocess(image, 8, center_crop=False, generator=torch.Generator().manual_seed(s)) for s in range(8)]
    again = preprocess(image, 8, center_crop=False, generator=torch.Generator().manual_seed(3))
    assert torch.equal(crops[3], again)
    assert len({round(c[0, 0, 0].item(), 4) for c in crops}) > 3  # left edge lands in different places


def test_transparent_pixels_become_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "rgba.png")
    image = open_image(str(tmp_path / "rgba.png"))
    assert image.mode == "RGB"
    assert image.getpixel((2, 2)) == (255, 255, 255) and image.getpixel((0, 0)) == (0, 0, 255)

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0])
    palette.putpixel((0, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    image = open_image(str(tmp_path / "p.png"))
    assert image.getpixel((3, 3)) == (255, 255, 255) and image.getpixel((0, 0)) == (0, 255, 0)


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (32, 16), (255, 0, 0))
    stored.paste((0, 0, 255), (16, 0, 32, 16))  # left red, right blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)

    image = open_image(str(tmp_path / "phone.jpg"))

    assert image.size == (16, 32)
    top, bottom = image.getpixel((8, 4)), image.getpixel((8, 28))
    assert top[0] > 200 and top[2] < 60  # stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60


# --- CaptionDataset ---------------------------------------------------------------------------------------


def many_records(tmp_path: Path, count: int) -> list[Record]:
    path = str(gradient_image(tmp_path / "ramp.png"))
    return [Record(path=path, caption=f"caption {i}") for i in range(count)]


def flipped(sample: dict) -> bool:
    return bool(sample["pixel_values"][0, 0, 0] > sample["pixel_values"][0, 0, -1])


def test_same_seed_epoch_index_gives_identical_sample(tmp_path, tokenizer):
    records = many_records(tmp_path, 8)
    make = lambda: CaptionDataset(records, tokenizer, 8, random_flip=True, caption_dropout=0.5, seed=7)  # noqa: E731
    first, second = make()[(3, 5)], make()[(3, 5)]
    assert torch.equal(first["pixel_values"], second["pixel_values"])
    assert torch.equal(first["input_ids"], second["input_ids"]) and first["caption"] == second["caption"]
    assert torch.equal(make()[5]["pixel_values"], make()[(0, 5)]["pixel_values"])  # plain int means epoch 0


def test_flip_and_dropout_patterns_change_with_epoch(tmp_path, tokenizer):
    dataset = CaptionDataset(many_records(tmp_path, 64), tokenizer, 8, random_flip=True, caption_dropout=0.5)

    def pattern(epoch: int) -> list[tuple[bool, bool]]:
        return [(flipped(s), s["caption"] == "") for s in (dataset[(epoch, i)] for i in range(64))]

    epoch0, epoch1 = pattern(0), pattern(1)
    assert epoch0 == pattern(0)
    assert [f for f, _ in epoch0] != [f for f, _ in epoch1]
    assert [d for _, d in epoch0] != [d for _, d in epoch1]
    assert 16 < sum(f for f, _ in epoch0) < 48  # flips are actually random, not all-or-nothing


def test_caption_dropout_rate_and_dropped_ids_equal_empty_caption(tmp_path, tokenizer):
    dataset = CaptionDataset(many_records(tmp_path, 400), tokenizer, 4, center_crop=True, caption_dropout=0.25)
    samples = [dataset[i] for i in range(400)]
    dropped = [s for s in samples if s["caption"] == ""]
    assert 0.18 < len(dropped) / 400 < 0.32
    empty_ids = dataset.tokenize("")["input_ids"]
    assert all(torch.equal(s["input_ids"], empty_ids) for s in dropped)
    kept = [s for s in samples if s["caption"]]
    assert all(s["caption"] == f"caption {i}" for i, s in enumerate(samples) if s["caption"])
    assert not torch.equal(kept[0]["input_ids"], empty_ids)


def test_input_ids_follow_tokenizer_length_and_truncate(tmp_path, tokenizer):
    tokenizer.model_max_length = 12  # anything but 77 catches a hard-coded length
    long_caption = " ".join(["red circle"] * 40)
    dataset = CaptionDataset([Record(str(gradient_image(tmp_path / "a.png")), long_caption)], tokenizer, 8)
    sample = dataset[0]
    assert sample["input_ids"].dtype == torch.long and sample["input_ids"].shape == (1, 12)  # one window
    assert len(tokenizer(long_caption).input_ids) > 12
    assert sample["input_ids"][0, -1].item() == tokenizer.eos_token_id
    assert sample["caption"] == long_caption and sample["path"].endswith("a.png")


@pytest.mark.parametrize("content", [b"this is not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_unreadable_image_raises_sdtune_error_naming_the_file(tmp_path, tokenizer, content):
    (tmp_path / "broken.png").write_bytes(content)
    dataset = CaptionDataset([Record(str(tmp_path / "broken.png"), "x")], tokenizer, 8)
    with pytest.raises(SdtuneError, match="broken.png") as caught:
        dataset[0]
    assert "\n" not in str(caught.value)


# --- CaptionDataModule -----------------------------------------------------------------------------------


def test_train_dataloader_batches(tmp_path, tiny_model):
    root = captioned_folder(tmp_path / "images", 10)
    dm = CaptionDataModule(str(root), resolution=8, batch_size=4, random_flip=True, pretrained=str(tiny_model))
    dm.setup("fit")
    batches = list(dm.train_dataloader())

    assert dm.record_count == 10 and sorted(len(b["caption"]) for b in batches) == [2, 4, 4]
    first = batches[0]
    assert set(first) == {"pixel_values", "input_ids", "caption", "path", "sample_key", "original_size", "crop_top_left", "is_prior"}
    assert sorted(key for b in batches for key in b["sample_key"]) == [(0, i) for i in range(10)]  # (epoch, index)
    assert first["pixel_values"].shape == (4, 3, 8, 8)
    assert first["input_ids"].shape == (4, 1, dm.tokenizer.model_max_length) and first["input_ids"].dtype == torch.long
    assert all(c.startswith("picture number") for b in batches for c in b["caption"])
    assert sorted(p for b in batches for p in b["path"]) == sorted(str(p) for p in root.glob("*.png"))
    assert dm.val_dataloader() == []


def test_val_fraction_split_is_disjoint_deterministic_and_clean(tmp_path, tiny_model):
    root = captioned_folder(tmp_path / "images", 10)

    def datamodule(seed: int) -> CaptionDataModule:
        dm = CaptionDataModule(
            str(root), resolution=8, batch_size=2, random_flip=True, caption_dropout=1.0,
            val_fraction=0.3, seed=seed, pretrained=str(tiny_model),
        )  # fmt: skip
        dm.setup("fit")
        return dm

    dm = datamodule(seed=0)
    train = {r.path for r in dm.train_records}
    val = {r.path for r in dm.val_records}
    assert len(val) == 3 and len(train) == 7 and not train & val
    assert val == {r.path for r in datamodule(seed=0).val_records}
    assert any(val != {r.path for r in datamodule(seed=s).val_records} for s in range(1, 4))

    val_batches = list(dm.val_dataloader())
    assert {p for b in val_batches for p in b["path"]} == val
    assert all(c for b in val_batches for c in b["caption"])  # validation never drops captions...
    assert all(not flipped({"pixel_values": px}) for b in val_batches for px in b["pixel_values"])  # ...nor flips
    assert all(c == "" for b in dm.train_dataloader() for c in b["caption"])


def test_val_root_is_used_as_is(tmp_path, tiny_model):
    root = captioned_folder(tmp_path / "train", 4)
    held_out = captioned_folder(tmp_path / "held_out", 2)
    dm = CaptionDataModule(str(root), resolution=8, val_root=str(held_out), pretrained=str(tiny_model))
    dm.setup("fit")
    assert dm.record_count == 4
    assert {p for b in dm.val_dataloader() for p in b["path"]} == {str(p) for p in held_out.glob("*.png")}


@pytest.mark.parametrize(
    "kwargs,setting",
    [
        ({"resolution": 0}, "data.resolution"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"caption_dropout": 1.5}, "data.caption_dropout"),
        ({"val_fraction": 1.0}, "data.val_fraction"),
        ({"num_workers": -1}, "data.num_workers"),
    ],
)
def test_bad_settings_are_rejected_with_their_name(kwargs, setting):
    with pytest.raises(SdtuneError, match=setting):
        CaptionDataModule("anywhere", **kwargs)


def test_setup_without_pretrained_or_root_explains(tmp_path, tiny_model):
    with pytest.raises(SdtuneError, match="data.pretrained is not set"):
        CaptionDataModule(str(captioned_folder(tmp_path / "images", 1))).setup("fit")
    with pytest.raises(SdtuneError, match="data.root '.*missing' does not exist"):
        CaptionDataModule(str(tmp_path / "missing"), pretrained=str(tiny_model)).setup("fit")
    with pytest.raises(SdtuneError, match="data.val_fraction 0.5 leaves no training images"):
        CaptionDataModule(str(tmp_path / "images"), val_fraction=0.5, pretrained=str(tiny_model)).setup("fit")


class RecordPaths(L.LightningModule):
    """Trains nothing; remembers which images each epoch saw, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[str]] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).extend(batch["path"])
        return (self.weight * batch["pixel_values"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_sets_the_epoch_so_each_epoch_reshuffles(tmp_path, tiny_model):
    root = captioned_folder(tmp_path / "images", 12)
    dm = CaptionDataModule(str(root), resolution=8, batch_size=3, seed=5, pretrained=str(tiny_model))
    module = RecordPaths()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)

    paths = [r.path for r in dm.train_records]
    sampler = BucketBatchSampler([(8, 8)] * 12, batch_size=3, seed=5)
    for epoch in (0, 1):
        assert module.seen[epoch] == [paths[i] for batch in sampler.global_batches(epoch) for i in batch]
    assert module.seen[0] != module.seen[1]

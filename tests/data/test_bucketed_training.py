"""`data.buckets: true`: each image trains at its aspect-ratio bucket, every batch holds one bucket, the cache encodes
at the bucket sizes, and DDP ranks split the batches between them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from test_cli import sdtune

from sdtune.adapters.lora import LoraSettings
from sdtune.data import CaptionDataModule
from sdtune.data.buckets import assign_bucket, make_buckets
from sdtune.data.transforms import Geometry
from sdtune.errors import SdtuneError
from sdtune.finetune import LoRAFineTune

# Wide, tall and square images; each size twice, so every bucket has a full batch of 2.
SIZES = [(80, 48), (90, 50), (48, 96), (50, 90), (64, 64), (70, 66), (80, 60), (60, 80)] * 2
SETTINGS = dict(resolution=32, batch_size=2, buckets=True, bucket_step=8, center_crop=True)


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory) -> Path:
    """Images of several aspect ratios, each a colour ramp (so crops and flips change the pixels), with captions."""
    root = tmp_path_factory.mktemp("mixed")
    for i, (width, height) in enumerate(SIZES):
        image = Image.new("RGB", (width, height))
        ramp = [(255 * x // width, 255 * y // height, 40 * (i % 6)) for y in range(height) for x in range(width)]
        image.putdata(ramp)
        image.save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a picture {width} by {height}")
    return root


def datamodule(mixed_dir, tiny_model_dir, **overrides) -> CaptionDataModule:
    dm = CaptionDataModule(str(mixed_dir), pretrained=str(tiny_model_dir), **{**SETTINGS, **overrides})
    dm.setup("fit")
    return dm


def test_every_batch_holds_one_bucket_and_an_epoch_every_image_once(mixed_dir, tiny_model_dir):
    dm = datamodule(mixed_dir, tiny_model_dir)
    table = make_buckets(32 * 32, 8)
    expected = {r.path: assign_bucket(*Image.open(r.path).size, table) for r in dm.train_records}
    assert dm.train_buckets == [expected[r.path] for r in dm.train_records]
    assert set(expected.values()) == {(40, 24), (24, 40), (32, 32)}  # wide, tall and square: area ≤ 32²
    batches = list(dm.train_dataloader())
    for batch in batches:
        width, height = expected[batch["path"][0]]
        assert {expected[path] for path in batch["path"]} == {(width, height)}
        assert batch["pixel_values"].shape == (len(batch["path"]), 3, height, width)
    assert sorted(p for b in batches for p in b["path"]) == sorted(expected)
    # The 5:3 image keeps its whole content: its bucket has its aspect ratio, so nothing is cropped.
    wide = next(b for b in batches if str(mixed_dir / "00.png") in b["path"])
    pixels = wide["pixel_values"][wide["path"].index(str(mixed_dir / "00.png"))]
    assert expected[str(mixed_dir / "00.png")] == (40, 24)
    assert pixels[0, :, 0].max() < -0.9 and pixels[0, :, -1].min() > 0.85  # red ramp: first to last column


def test_validation_batches_by_bucket_too(mixed_dir, tiny_model_dir):
    dm = datamodule(mixed_dir, tiny_model_dir, val_fraction=0.5)
    for batch in dm.val_dataloader():
        assert len({tuple(px.shape) for px in batch["pixel_values"]}) == 1


def test_random_crops_stay_inside_the_bucket_and_move_with_the_seed():
    # 100x40 covering a 64x32 bucket resizes to 80x32: 16 columns of slack, none in height.
    centred = Geometry.plan((100, 40), (64, 32), True, False, (0.9, 0.9))
    assert centred.resized == (80, 32) and centred.box == (8, 0, 72, 32)
    boxes = {Geometry.plan((100, 40), (64, 32), False, False, (u, 0.7)).box for u in (0.0, 0.3, 0.6, 0.99)}
    assert boxes == {(0, 0, 64, 32), (5, 0, 69, 32), (10, 0, 74, 32), (16, 0, 80, 32)}
    # A square target is the shorter side resized to it, as without buckets.
    assert Geometry.plan((100, 40), 32, True, False, (0.5, 0.5)).resized == (80, 32)


def test_buckets_use_the_upright_size(tmp_path, tiny_model_dir):
    """A phone photo stored landscape with EXIF orientation 6 (rotate 90°) is a portrait: it needs a tall bucket."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (80, 48), "red").save(tmp_path / "phone.jpg", exif=exif)
    (tmp_path / "phone.txt").write_text("a phone photo")
    dm = datamodule(tmp_path, tiny_model_dir, batch_size=1)
    assert dm.train_buckets == [(24, 40)]
    assert next(iter(dm.train_dataloader()))["pixel_values"].shape == (1, 3, 40, 24)


def test_ddp_ranks_get_disjoint_equal_shares(mixed_dir, tiny_model_dir):
    shares = []
    for rank in (0, 1):
        dm = datamodule(mixed_dir, tiny_model_dir)
        dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
        shares.append([p for batch in dm.train_dataloader() for p in batch["path"]])
    assert len(shares[0]) == len(shares[1]) == len(SIZES) // 2
    assert not set(shares[0]) & set(shares[1])


def test_cached_bucketed_batches_give_the_losses_of_encoded_ones(mixed_dir, tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    module = LoRAFineTune(str(tiny_model_dir), lora=LoraSettings(rank=4), noise_seed=11).eval()
    plain = list(datamodule(mixed_dir, tiny_model_dir, random_flip=True).train_dataloader())
    dm = CaptionDataModule(str(mixed_dir), pretrained=str(tiny_model_dir), cache=True, cache_dir=str(tmp_path),
                           random_flip=True, **SETTINGS)  # fmt: skip
    dm.prepare_data()
    cached = list(dm.train_dataloader())
    assert [b["path"] for b in cached] == [b["path"] for b in plain]
    for p, c in zip(plain, cached, strict=True):
        # The tiny VAE halves each side: a 40x24 bucket is a 20x12 latent.
        assert c["latent_mean"].shape[-2:] == (p["pixel_values"].shape[-2] // 2, p["pixel_values"].shape[-1] // 2)
        losses = [module.diffusion_loss(batch, torch.Generator().manual_seed(5)) for batch in (p, c)]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(bucket_step=12), "data.bucket_step must be a positive multiple of 8"),
        (dict(bucket_min_side=20), "data.bucket_min_side must be a multiple of data.bucket_step"),
        (dict(bucket_min_side=48, bucket_max_side=40), "data.bucket_min_side 48 is above data.bucket_max_side 40"),
        (dict(resolution=32, bucket_step=64), "data.resolution 32 is smaller than data.bucket_step 64"),
    ],
)
def test_bad_bucket_settings_name_the_key(overrides, message):
    with pytest.raises(SdtuneError, match=message):
        CaptionDataModule("anywhere", **{**SETTINGS, **overrides})


def test_fit_with_buckets_and_the_cache_through_the_cli(mixed_dir, tiny_model_dir, tmp_path):
    result = sdtune(
        "fit", "--config", "tiny/lora", "--model.pretrained", tiny_model_dir, "--data.root", mixed_dir,
        "--data.resolution", 32, "--data.batch_size", 2, "--data.buckets", "true", "--data.bucket_step", 8,
        "--data.center_crop", "true", "--data.cache", "true", "--data.cache_dir", tmp_path / "cache",
        "--trainer.max_steps", 3, "--samples.enabled", "false", "--trainer.default_root_dir", tmp_path / "run",
    )  # fmt: skip
    report = next(line for line in result.stderr.splitlines() if "data.buckets:" in line)
    assert "3 buckets, 16 samples, 8 batches" in report and "40x24 ×6 (3)" in report, report
    encoded = set()
    for path in (tmp_path / "cache").rglob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            encoded.add(f.metadata().get("bucket"))
    assert encoded == {"40x24", "24x40", "32x32", None}  # None: the text entries
    assert (tmp_path / "run" / "adapter" / "pytorch_lora_weights.safetensors").is_file()

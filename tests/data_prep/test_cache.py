"""`sdtune prep cache`: entries equal direct encoding, keys change with every input they depend on, reruns reuse,
an interrupted run resumes, flips are cached on request, and the CLI reports counts and one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data_prep.cache as cache
import sdtune.data.cache.encode as cache_encode
from data_prep.cache import CacheSettings, build_cache
from sdtune.cli import main as sdtune_main
from sdtune.data.buckets import assign_bucket, make_buckets
from sdtune.data.cache.index import load_cache_entry, open_cache, sample_latents
from sdtune.errors import SdtuneError
from sdtune.models.clip import encode_text
from sdtune.models.pretrained import load_model
from sdtune.models.text import tokenize_chunks

AREA = 48 * 48
STEP = 16
SIZES = {"wide.png": (64, 40), "tall.png": (40, 64), "square.png": (48, 48), "sub/small.png": (32, 32)}
CAPTIONS = {"wide.png": "a red circle", "tall.png": "a blue square", "square.png": "a red circle", "sub/small.png": ""}
BUCKETED = CacheSettings(area=AREA, bucket_step=STEP, batch_size=2)


def _image(size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth but left-right asymmetric content, so a flip changes the latents."""
    width, height = size
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    rng = np.random.default_rng(seed)
    pixels = 255 * np.clip(x**2 * rng.uniform(0.3, 1, 3) + y * rng.uniform(0, 0.7, 3), 0, 1)
    return Image.fromarray(pixels.astype(np.uint8))


def make_dst(root: Path, metadata: bool = True, extra: dict | None = None) -> Path:
    """An imagefolder with captions in metadata.jsonl (no bucket/width/height), or in .txt sidecars."""
    root.mkdir(parents=True)
    rows = []
    for seed, (name, size) in enumerate(SIZES.items()):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        _image(size, seed).save(root / name)
        rows.append({"file_name": name, "text": CAPTIONS[name], **(extra or {}).get(name, {})})
        if not metadata:
            (root / name).with_suffix(".txt").write_text(CAPTIONS[name])
    if metadata:
        (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


@pytest.fixture(scope="module")
def parts(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    loaded.vae.eval()
    loaded.text_encoder.eval()
    return loaded


def cover_crop(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Independent reference: scale to cover the bucket, centre-crop."""
    scale = max(bucket[0] / image.width, bucket[1] / image.height)
    size = (max(bucket[0], round(image.width * scale)), max(bucket[1], round(image.height * scale)))
    resized = image.resize(size, Image.LANCZOS)
    left, top = (resized.width - bucket[0]) // 2, (resized.height - bucket[1]) // 2
    return resized.crop((left, top, left + bucket[0], top + bucket[1]))


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


@torch.no_grad()
def direct_text(parts, caption: str, clip_skip: int = 1, max_tokens: int = 75) -> torch.Tensor:
    ids = tokenize_chunks(parts.tokenizer, caption, max_tokens)[0]
    return encode_text(parts.text_encoder, ids[None], clip_skip)[0]


def entry_files(index) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(index.root.rglob("*.safetensors"))}


# --- (a) values and shapes ------------------------------------------------------------------------------------


@torch.no_grad()
def test_entries_equal_direct_encoding_at_the_bucket_size(tmp_path, tiny_model_dir, parts):
    dst = make_dst(tmp_path / "dst")
    index = build_cache(dst, str(tiny_model_dir), settings=BUCKETED)

    buckets = make_buckets(AREA, STEP)
    assert {row.file_name for row in index.rows} == set(SIZES)
    assert len({row.bucket for row in index.rows}) >= 3  # wide, tall and square buckets: shapes really vary
    for row in index.rows:
        assert row.bucket == assign_bucket(*SIZES[row.file_name], buckets)
        image = Image.open(dst / row.file_name).convert("RGB")
        posterior = parts.vae.encode(pixels(cover_crop(image, row.bucket))).latent_dist
        mean, std = index.latents(row.file_name)
        # The tiny VAE halves each side; SD's would divide by 8. The shape follows the bucket, never a constant.
        assert mean.shape == std.shape == (4, row.bucket[1] // 2, row.bucket[0] // 2)
        assert mean.dtype == torch.float32
        torch.testing.assert_close(mean, posterior.mean[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(std, posterior.std[0], atol=1e-4, rtol=1e-4)

        hidden = index.text(row.file_name)
        assert hidden.shape == (77, 32)
        torch.testing.assert_close(hidden, direct_text(parts, row.caption), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(index.text(None), direct_text(parts, ""), atol=1e-5, rtol=1e-5)

    # Identical captions share one entry; every distinct caption plus the empty one (for caption dropout) is cached.
    assert index.row("wide.png").text == index.row("square.png").text
    assert index.counts == {"latents_computed": 4, "latents_reused": 0, "text_computed": 3, "text_reused": 0}
    manifest = json.loads((index.root / "manifest.json").read_text())
    assert manifest["settings"]["flip"] is False and manifest["storage_dtype"] == "float32"
    assert manifest["scaling_factor"] == parts.vae.config.scaling_factor and manifest["vae_scale_factor"] == 2


@torch.no_grad()
def test_sample_latents_matches_on_the_fly_encoding(tmp_path, tiny_model_dir, parts):
    dst = make_dst(tmp_path / "dst")
    index = build_cache(dst, str(tiny_model_dir), settings=CacheSettings(resolution=32))
    image = Image.open(dst / "wide.png").convert("RGB")
    posterior = parts.vae.encode(pixels(cover_crop(image, (32, 32)))).latent_dist
    # What DiffusionFineTune.encode_images computes, with the same generator state.
    expected = (posterior.sample(generator=torch.Generator().manual_seed(7)) - 0.0) * parts.vae.config.scaling_factor
    mean, std = index.latents("wide.png")
    generator = torch.Generator().manual_seed(7)
    got = sample_latents(mean[None], std[None], generator, index.scaling_factor, index.shift_factor)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_longer_captions_and_clip_skip(tmp_path, tiny_model_dir, parts):
    dst = make_dst(tmp_path / "dst")
    settings = CacheSettings(resolution=32, clip_skip=2, max_token_length=150)
    index = build_cache(dst, str(tiny_model_dir), settings=settings)
    hidden = index.text("tall.png")
    assert hidden.shape == (2 * 77, 32)
    expected = direct_text(parts, "a blue square", clip_skip=2, max_tokens=150)
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hidden, direct_text(parts, "a blue square", clip_skip=1, max_tokens=150))


def test_buckets_come_from_metadata_unless_area_is_given(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(cache, "DEFAULT_AREA", 32 * 32)  # 512x512 is the real default: too slow to encode here
    dst = make_dst(tmp_path / "dst", extra={"wide.png": {"bucket": "32x16", "width": 64, "height": 40}})
    index = build_cache(dst, str(tiny_model_dir), settings=CacheSettings(bucket_step=STEP))
    assert index.row("wide.png").bucket == (32, 16)
    assert index.latents("wide.png")[0].shape == (4, 8, 16)
    # Rows without a bucket fall back to the default area.
    assert index.row("tall.png").bucket == assign_bucket(40, 64, make_buckets(32 * 32, STEP)) != (32, 16)
    index = build_cache(dst, str(tiny_model_dir), settings=BUCKETED)
    assert index.row("wide.png").bucket == assign_bucket(64, 40, make_buckets(AREA, STEP))


def test_plain_folder_with_caption_sidecars(tmp_path, tiny_model_dir, parts):
    dst = make_dst(tmp_path / "dst", metadata=False)
    index = build_cache(dst, str(tiny_model_dir), settings=CacheSettings(resolution=32))
    assert {row.file_name: row.caption for row in index.rows} == CAPTIONS
    torch.testing.assert_close(index.text("tall.png"), direct_text(parts, "a blue square"), atol=1e-5, rtol=1e-5)


# --- (b), (c) reuse and invalidation --------------------------------------------------------------------------


def test_rerun_reuses_everything_without_loading_the_model(tmp_path, tiny_model_dir, monkeypatch):
    dst = make_dst(tmp_path / "dst")
    first = build_cache(dst, str(tiny_model_dir), settings=BUCKETED)
    before = entry_files(first)

    def no_model(*args, **kwargs):
        raise AssertionError("nothing to compute, yet the model was loaded")

    monkeypatch.setattr("sdtune.models.pretrained.load_model", no_model)
    second = build_cache(dst, str(tiny_model_dir), settings=BUCKETED)
    assert second.computed == 0 and second.reused == first.computed == 7
    assert entry_files(second) == before  # same files, untouched
    assert second.rows == first.rows
    reopened = open_cache(dst, str(tiny_model_dir))
    assert reopened.rows == first.rows and reopened.settings["area"] == AREA


def test_encoding_never_loads_the_unet(tmp_path, tiny_model_dir):
    """Only the VAE and the text encoder are needed; at SD1.5 size a UNet would add 3.4 GB to the peak memory."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for weights in (model / "unet").glob("*.safetensors"):
        weights.unlink()  # loading the UNet would now fail
    result = build_cache(make_dst(tmp_path / "dst"), str(model), settings=BUCKETED)
    assert result.computed == 7


def test_changed_image_recomputes_only_its_latents(tmp_path, tiny_model_dir):
    dst = make_dst(tmp_path / "dst")
    first = build_cache(dst, str(tiny_model_dir), settings=BUCKETED)
    _image(SIZES["tall.png"], seed=99).save(dst / "tall.png")
    second = build_cache(dst, str(tiny_model_dir), settings=BUCKETED)
    assert second.counts == {"latents_computed": 1, "latents_reused": 3, "text_computed": 0, "text_reused": 3}
    changed = [row.file_name for row, old in zip(second.rows, first.rows) if row.latent != old.latent]
    assert changed == ["tall.png"]
    assert not torch.equal(second.latents("tall.png")[0], first.latents("tall.png")[0])


def test_changed_caption_recomputes_only_its_text(tmp_path, tiny_model_dir, parts):
    dst = make_dst(tmp_path / "dst")
    build_cache(dst, str(tiny_model_dir), settings=BUCKETED)
    metadata = dst / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace("a blue square", "a green triangle"))
    index = build_cache(dst, str(tiny_model_dir), settings=BUCKETED)
    # Text entries: "a red circle", "" (small.png and caption dropout) and the new caption.
    assert index.counts == {"latents_computed": 0, "latents_reused": 4, "text_computed": 1, "text_reused": 2}
    torch.testing.assert_close(index.text("tall.png"), direct_text(parts, "a green triangle"), atol=1e-5, rtol=1e-5)


def test_new_size_recomputes_latents_and_reuses_text(tmp_path, tiny_model_dir):
    dst = make_dst(tmp_path / "dst")
    first = build_cache(dst, str(tiny_model_dir), settings=CacheSettings(resolution=32))
    second = build_cache(dst, str(tiny_model_dir), settings=CacheSettings(resolution=16))
    assert second.counts == {"latents_computed": 4, "latents_reused": 0, "text_computed": 0, "text_reused": 3}
    assert all(a.latent != b.latent and a.text == b.text for a, b in zip(first.rows, second.rows))
    assert second.latents("wide.png")[0].shape == (4, 8, 8)
    # Old entries stay: switching back reuses them all.
    third = build_cache(dst, str(tiny_model_dir), settings=CacheSettings(resolution=32))
    assert third.computed == 0 and third.rows == first.rows


def test_clip_skip_and_token_length_recompute_text_only(tmp_path, tiny_model_dir):
    dst = make_dst(tmp_path / "dst")
    first = build_cache(dst, str(tiny_model_dir), settings=BUCKETED)
    second = build_cache(dst, str(tiny_model_dir), settings=CacheSettings(area=AREA, bucket_step=STEP, clip_skip=2))
    assert second.counts == {"latents_computed": 0, "latents_reused": 4, "text_computed": 3, "text_reused": 0}
    assert all(a.text != b.text and a.latent == b.latent for a, b in zip(first.rows, second.rows))
    longer = CacheSettings(area=AREA, bucket_step=STEP, max_token_length=150)
    third = build_cache(dst, str(tiny_model_dir), settings=longer)
    assert third.counts["text_computed"] == 3 and third.counts["latents_computed"] == 0


def test_another_or_changed_model_gets_a_new_key(tmp_path, tiny_model_dir):
    from sdtune.models.tiny import build_tiny_stable_diffusion

    dst = make_dst(tmp_path / "dst")
    first = build_cache(dst, str(tiny_model_dir), settings=CacheSettings(resolution=32))
    other_model = build_tiny_stable_diffusion(tmp_path / "other", seed=1)
    other = build_cache(dst, str(other_model), settings=CacheSettings(resolution=32))
    assert other.root != first.root and other.computed == 7 and other.reused == 0
    assert not torch.allclose(other.latents("wide.png")[0], first.latents("wide.png")[0])

    # Rewriting a weight file (new mtime) invalidates the model key too, even at the same path.
    weights = next((other_model / "vae").glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    again = build_cache(dst, str(other_model), settings=CacheSettings(resolution=32))
    assert again.root != other.root and again.computed == 7
    assert open_cache(dst, str(other_model)).root == again.root
    with pytest.raises(SdtuneError, match="no cache for model"):
        open_cache(make_dst(tmp_path / "uncached"), str(other_model))


# --- (d) interruption -----------------------------------------------------------------------------------------


def test_interrupted_run_resumes_with_complete_entries_only(tmp_path, tiny_model_dir, monkeypatch):
    dst = make_dst(tmp_path / "dst")
    settings = CacheSettings(area=AREA, bucket_step=STEP, batch_size=1)
    real_encode, calls = cache_encode._encode_latents, []

    def crash_after_two(vae, pixels):
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        calls.append(1)
        return real_encode(vae, pixels)

    monkeypatch.setattr(cache_encode, "_encode_latents", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache(dst, str(tiny_model_dir), settings=settings)
    model_dir = next((dst / "cache").iterdir())
    written = sorted((model_dir / "latents").iterdir())
    assert len(written) == 2 and all(p.suffix == ".safetensors" for p in written)
    assert all(load_cache_entry(p)[0]["mean"].ndim == 3 for p in written)  # complete, loadable entries
    assert not (model_dir / "index.jsonl").exists()  # no index for a run that did not finish
    (model_dir / "latents" / ".deadbeef.12345.tmp").write_bytes(b"half an entry from a killed run")

    monkeypatch.setattr(cache_encode, "_encode_latents", real_encode)
    index = build_cache(dst, str(tiny_model_dir), settings=settings)
    assert index.counts["latents_computed"] == 2 and index.counts["latents_reused"] == 2
    assert sorted(p.name for p in model_dir.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")) == []
    assert len(list((model_dir / "latents").iterdir())) == 4
    assert set(written) <= set((model_dir / "latents").iterdir())


# --- (e) flip -------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_flip_caches_both_orientations(tmp_path, tiny_model_dir, parts):
    dst = make_dst(tmp_path / "dst")
    plain = build_cache(dst, str(tiny_model_dir), settings=BUCKETED)
    assert plain.flip is False and all(row.latent_flip is None for row in plain.rows)
    with pytest.raises(SdtuneError, match="--flip"):
        plain.latents("wide.png", flipped=True)

    flipped = build_cache(dst, str(tiny_model_dir), settings=CacheSettings(area=AREA, bucket_step=STEP, flip=True))
    assert flipped.flip is True
    # The upright entries are the same ones; only the mirrored ones are new.
    assert flipped.counts == {"latents_computed": 4, "latents_reused": 4, "text_computed": 0, "text_reused": 3}
    for row in flipped.rows:
        image = cover_crop(Image.open(dst / row.file_name).convert("RGB"), row.bucket).transpose(Image.FLIP_LEFT_RIGHT)
        posterior = parts.vae.encode(pixels(image)).latent_dist
        mean, std = flipped.latents(row.file_name, flipped=True)
        torch.testing.assert_close(mean, posterior.mean[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(std, posterior.std[0], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(mean, flipped.latents(row.file_name)[0], atol=1e-3)


# --- (f) CLI --------------------------------------------------------------------------------------------------


def test_cli_reports_counts_and_flip(tmp_path, tiny_model_dir, capsys):
    dst = make_dst(tmp_path / "dst")
    argv = ["prep", "cache", str(dst), "--model", str(tiny_model_dir), "--resolution", "32", "--batch-size", "3"]
    assert sdtune_main(argv) == 0
    out = capsys.readouterr().out
    assert "cached 4 images" in out and "computed 7, reused 0" in out
    assert "flip=false" in out and "random_flip" in out
    assert sdtune_main([*argv, "--flip", "--clip-skip", "2"]) == 0
    out = capsys.readouterr().out
    assert "computed 7, reused 4" in out and "latents: computed 4, reused 4" in out and "flip=true" in out
    manifest = json.loads(next((dst / "cache").glob("*/manifest.json")).read_text())
    assert manifest["settings"]["flip"] is True and manifest["settings"]["clip_skip"] == 2


@pytest.mark.parametrize(
    "argv,message",
    [
        (["{tmp}/missing", "--model", "{model}"], "does not exist"),
        (["{dst}", "--model", "{tmp}/no-model"], "no-model"),
        (["{dst}", "--model", "{model}", "--area", "100"], "area 100"),
        (["{dst}", "--model", "{model}", "--resolution", "33"], "not a multiple"),
        (["{dst}", "--model", "{model}", "--max-token-length", "100"], "max-token-length"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(tmp_path, tiny_model_dir, capsys, argv, message):
    dst = make_dst(tmp_path / "dst")
    argv = [a.format(tmp=tmp_path, dst=dst, model=tiny_model_dir) for a in argv]
    assert sdtune_main(["prep", "cache", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdtune: error: ") and err.count("\n") == 1 and message in err


def test_cli_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sdtune_main(["prep", "cache", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "sdtune prep cache data/my_dog --model" in out and "--flip" in out

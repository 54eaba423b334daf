"""A dataset folder from someone else, as `sdtune fit --data.root`, `prep build` and `prep check` meet it: rows and
symlinks that lead outside the folder are skipped with their reason and never opened, files in formats sdtune does
not read (an EPS named .png) are skipped with their reason and never reach Pillow's other readers, and a 16-bit PNG
trains as `prep build` stores it (mid-grey stays mid-grey), all without changing a source file."""

from __future__ import annotations

import json
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile_files import EPS, png_header_only, snapshot
from PIL import EpsImagePlugin, Image, TgaImagePlugin

from data_prep.build import build_dataset
from data_prep.check import check_dataset
from sdtune.cli import main
from sdtune.data import CaptionDataModule
from sdtune.data.cache.encode import cache_pixels
from sdtune.data.transforms import to_tensor
from sdtune.errors import SdtuneError

_opened: list[str] | None = None  # paths opened while `opened_files` records


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one does nothing outside `opened_files`


@contextmanager
def opened_files():
    """Every file opened in this process (Python's `open` audit event) while inside the block."""
    global _opened
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


def picture(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture
def shared(tmp_path) -> tuple[Path, Path]:
    """(folder, outside): a folder whose metadata.jsonl lists two real images and five that lead out of it."""
    outside = tmp_path / "outside"
    picture(outside / "secret.png", (255, 0, 255))
    picture(outside / "secret2.png", (0, 255, 255))
    picture(outside / "album/private.png", (255, 255, 0))
    root = tmp_path / "shared"
    picture(root / "a.png", (255, 0, 0))
    picture(root / "b.png", (0, 0, 255))
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "album").symlink_to(outside / "album", target_is_directory=True)
    rows = [("a.png", "a red square"), ("../outside/secret.png", "x"), (str(outside / "secret2.png"), "x"),
            ("link.png", "x"), ("album/private.png", "x"), ("../../../../../../etc/passwd", "x"),
            ("b.png", "a blue square")]  # fmt: skip
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": t}) + "\n" for f, t in rows))
    return root, outside


def datamodule(root: Path, tiny_model_dir: Path, **options) -> CaptionDataModule:
    settings = dict(resolution=32, batch_size=1, center_crop=True, pretrained=str(tiny_model_dir)) | options
    return CaptionDataModule(str(root), **settings)


def setup_warnings(dm: CaptionDataModule) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    return [str(w.message) for w in caught]


# --- rows and symlinks leading outside data.root -------------------------------------------------------------------


def test_rows_leading_outside_the_root_are_skipped_with_their_reason_and_never_opened(shared, tiny_model_dir):
    root, outside = shared
    before = snapshot(root, outside)
    dm = datamodule(root, tiny_model_dir)
    with opened_files() as opened:
        messages = setup_warnings(dm)
        batches = list(dm.train_dataloader())

    assert dm.record_count == 2 and len(batches) == 2
    assert sorted(Path(path).name for batch in batches for path in batch["path"]) == ["a.png", "b.png"]
    reasons = "\n".join(dm.skipped)
    assert len(dm.skipped) == 5
    assert "metadata.jsonl row 2 '../outside/secret.png': outside data.root; not read" in reasons
    assert f"row 3 '{outside / 'secret2.png'}': outside data.root" in reasons  # an absolute path
    assert "row 4 'link.png': leads outside data.root through a symlink" in reasons
    assert "row 5 'album/private.png': leads outside data.root through a symlink" in reasons  # a linked folder
    assert "row 6 '../../../../../../etc/passwd': outside data.root" in reasons
    left_out = [m for m in messages if m.startswith("5 image(s) left out: data.root: skipped metadata.jsonl row 2")]
    assert len(left_out) == 1 and "\n" not in left_out[0]
    assert not any(path.startswith(str(outside)) or path == "/etc/passwd" for path in opened)
    assert str(root / "a.png") in opened  # the audit hook does see the files that are read
    assert snapshot(root, outside) == before


def test_symlinks_in_a_plain_folder_and_their_captions_are_not_followed(tmp_path, tiny_model_dir):
    outside = tmp_path / "outside"
    picture(outside / "secret.png", (255, 0, 255))
    (outside / "secret.txt").write_text("the text of a private note")
    root = tmp_path / "folder"
    picture(root / "a.png", (255, 0, 0))
    (root / "a.txt").symlink_to(outside / "secret.txt")
    (root / "b.png").symlink_to(outside / "secret.png")
    dm = datamodule(root, tiny_model_dir)
    with opened_files() as opened:
        setup_warnings(dm)
    assert [(Path(r.path).name, r.caption) for r in dm.train_records] == [("a.png", "")]
    assert dm.skipped == [
        "data.root: skipped 'a.txt': leads outside data.root through a symlink; not read",
        "data.root: skipped 'b.png': leads outside data.root through a symlink; not read",
    ]
    assert not any(path.startswith(str(outside)) for path in opened)


def test_a_kohya_folder_linked_from_elsewhere_leaves_data_root(tmp_path, tiny_model_dir):
    outside = tmp_path / "outside"
    picture(outside / "private.png", (255, 0, 255))
    root = tmp_path / "kohya"
    picture(root / "10_dog/a.png", (255, 0, 0))
    (root / "5_cat").symlink_to(outside, target_is_directory=True)
    with pytest.raises(SdtuneError) as caught:
        datamodule(root, tiny_model_dir).setup("fit")
    assert str(caught.value) == (
        f"data.root '{root / '5_cat'}' has no usable images: 1 skipped, first '5_cat/private.png': leads outside "
        "data.root through a symlink; not read"
    )


def test_saved_datasets_naming_files_outside_are_skipped(tmp_path, tiny_model_dir):
    """A `save_to_disk` folder with a column of paths, and one whose image cells hold a path instead of bytes."""
    import datasets
    import pyarrow as pa

    outside = picture(tmp_path / "outside/secret.png", (255, 0, 255))
    paths = tmp_path / "paths"
    picture(paths / "a.png", (255, 0, 0))
    names = ["a.png", "../outside/secret.png", str(outside)]
    datasets.Dataset.from_dict({"image": names, "text": ["a"] * 3}).save_to_disk(str(paths))
    cells = tmp_path / "cells"
    images = [{"bytes": picture(tmp_path / "red.png", (255, 0, 0)).read_bytes(), "path": None}] * 2
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": images, "text": ["a", "b"]}, features=features).save_to_disk(str(cells))
    (shard,) = cells.glob("*.arrow")  # the second cell now names a file instead of holding its bytes
    table = pa.ipc.open_stream(pa.BufferReader(shard.read_bytes())).read_all()  # a copy: the file is rewritten below
    column = pa.array([images[0], {"bytes": None, "path": str(outside)}], type=table.schema.field("image").type)
    table = table.set_column(table.schema.get_field_index("image"), "image", column)
    with pa.OSFile(str(shard), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)

    with opened_files() as opened:
        by_column, by_cell = datamodule(paths, tiny_model_dir), datamodule(cells, tiny_model_dir)
        setup_warnings(by_column)
        setup_warnings(by_cell)
        assert "unreadable" not in by_cell._train_dataset()[0]
    assert [Path(r.path).name for r in by_column.train_records] == ["a.png"]
    assert by_column.skipped == [
        "data.root: skipped row 1 '../outside/secret.png': outside data.root; not read",
        f"data.root: skipped row 2 '{outside}': outside data.root; not read",
    ]
    assert by_cell.record_count == 1
    assert by_cell.skipped == [f"data.root: skipped row 1 '{outside}': outside data.root; not read"]
    assert str(outside) not in opened


def test_no_row_left_is_one_line_from_sdtune_fit(shared, tiny_model_dir, tmp_path, capsys):
    root, outside = shared
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    hostile = [row for row in rows if row["file_name"] not in ("a.png", "b.png")]
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in hostile))

    with opened_files() as opened:
        code = main(["fit", "--config", "tiny/lora", "--model.pretrained", str(tiny_model_dir), "--data.root",
                     str(root), "--trainer.default_root_dir", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"sdtune: error: data.root '{root}' has no usable images: 5 skipped, first metadata.jsonl row 1 "
        "'../outside/secret.png': outside data.root; not read"
    )
    assert not any(path.startswith(str(outside)) or path == "/etc/passwd" for path in opened)
    with pytest.raises(SdtuneError, match="has no usable images: 5 skipped"):
        datamodule(root, tiny_model_dir).setup("fit")


# --- formats sdtune does not read, and decompression bombs ---------------------------------------------------------


@pytest.fixture
def odd_files(tmp_path, monkeypatch) -> Path:
    """Two good images, an EPS and a TGA named .png, and a decompression bomb; Pillow's EPS and TGA readers fail the
    test if anything reaches them."""

    def reached(self, *args):
        raise AssertionError(f"{type(self).__name__} reader reached")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", reached)
    monkeypatch.setattr(TgaImagePlugin.TgaImageFile, "_open", reached)
    root = tmp_path / "odd"
    picture(root / "a.png", (255, 0, 0))
    picture(root / "e.png", (0, 0, 255))
    (root / "b.png").write_bytes(EPS)
    Image.new("RGB", (32, 32), "green").save(root / "c.png", format="TGA")
    (root / "d.png").write_bytes(png_header_only(40000, 40000))
    return root


@pytest.mark.parametrize("buckets", [True, False])
def test_other_formats_and_bombs_are_skipped_at_setup_with_their_reason(buckets, odd_files, tiny_model_dir):
    dm = datamodule(odd_files, tiny_model_dir, buckets=buckets, bucket_step=32)
    messages = setup_warnings(dm)
    assert [Path(r.path).name for r in dm.train_records] == ["a.png", "e.png"]
    reasons = {Path(line.split("'")[1]).name: line for line in dm.skipped}
    assert set(reasons) == {"b.png", "c.png", "d.png"}
    assert "not an image format sdtune reads (PostScript or EPS); convert it to PNG or JPEG" in reasons["b.png"]
    assert "not an image format sdtune reads" in reasons["c.png"]
    assert "too large: 1600 MP, above Pillow's decompression-bomb limit; not decoded" in reasons["d.png"]
    assert any(m.startswith("3 image(s) left out") for m in messages)


def test_prep_build_and_check_skip_other_formats_with_their_reason(odd_files, tmp_path):
    before = snapshot(odd_files)
    result = build_dataset(odd_files, tmp_path / "built", min_side=8)
    reasons = {entry["path"]: entry["reason"] for entry in result.rejected}
    assert result.kept == 2 and set(reasons) == {"b.png", "c.png", "d.png"}
    assert reasons["b.png"] == "not an image (PostScript or EPS)" and reasons["c.png"].startswith("not an image")
    assert reasons["d.png"].startswith("too large")

    dst = tmp_path / "dst"  # an imagefolder from elsewhere, checked before training
    dst.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (dst / name).write_bytes((odd_files / name).read_bytes())
    (dst / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{n}.png", "text": "x"}) + "\n" for n in "abc")
    )
    report = check_dataset(dst, progress=False).report
    errors = {e["files"][0]: e for e in report["errors"]}
    assert report["counts"]["images"] == 1 and set(errors) == {"b.png", "c.png"}
    assert errors["b.png"]["code"] == "unreadable_image" and "(PostScript or EPS)" in errors["b.png"]["message"]
    assert snapshot(odd_files) == before


# --- prep build and check on folders that lead outside ---------------------------------------------------------------


def test_prep_build_names_symlinks_leading_outside_src_and_never_reads_them(shared, tmp_path, capsys):
    root, outside = shared
    (root / "c.png").symlink_to(root / "a.png")  # a link that stays inside is an ordinary image
    before = snapshot(root, outside)
    with opened_files() as opened:
        code = main(["prep", "build", str(root), "--out", str(tmp_path / "built"), "--min-side", "8"])
    assert code == 0
    report = json.loads((tmp_path / "built" / "prep_report.json").read_text())
    assert report["rejected"] == [
        {"path": "album/", "reason": "leads outside SRC through a symlink; not read"},
        {"path": "link.png", "reason": "leads outside SRC through a symlink; not read"},
    ]
    assert report["totals"]["kept"] == 3 and report["totals"]["found"] == 5
    warned = {w["path"]: w["reason"] for w in report["warnings"]}
    assert warned["../outside/secret.png"] == "listed in metadata.jsonl but outside SRC; not read"
    assert warned["../../../../../../etc/passwd"] == "listed in metadata.jsonl but outside SRC; not read"
    assert warned[str(outside / "secret2.png")] == "listed in metadata.jsonl but outside SRC; not read"
    assert warned["link.png"] == "listed in metadata.jsonl but leads outside SRC through a symlink; not read"
    assert not any(path.startswith(str(outside)) or path == "/etc/passwd" for path in opened)
    assert snapshot(root, outside) == before


def test_prep_check_refuses_rows_leading_outside_the_dataset(shared, capsys):
    root, outside = shared
    with opened_files() as opened:
        code = main(["prep", "check", str(root), "--no-sheet", "--json", str(root.parent / "report.json")])
    report = json.loads((root.parent / "report.json").read_text())
    assert code == 1 and report["counts"]["outside"] == 5 and report["counts"]["images"] == 2
    outside_errors = [e["message"] for e in report["errors"] if e["code"] == "outside_dataset"]
    assert "../outside/secret.png: outside the dataset folder; not read" in outside_errors
    assert "link.png: leads outside the dataset folder through a symlink; not read" in outside_errors
    assert not any(path.startswith(str(outside)) or path == "/etc/passwd" for path in opened)


# --- every mode trains as prep build stores it ----------------------------------------------------------------------


def mode_images(root: Path) -> dict[str, Path]:
    """16-bit grey (a 0..65535 ramp: mid-grey on average), LA, RGBA, a palette with a transparent colour, L."""
    root.mkdir(parents=True, exist_ok=True)
    ramp = Image.new("I;16", (64, 64))
    ramp.putdata([x * 1040 for _ in range(64) for x in range(64)])  # 0 .. 65520
    ramp.save(root / "gray16.png")
    la = Image.new("LA", (64, 64), (0, 255))
    la.paste((0, 0), (0, 0, 64, 32))  # top half transparent
    la.save(root / "la.png")
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (32, 0, 64, 64))
    rgba.save(root / "rgba.png")
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([255, 0, 255, 0, 255, 0] + [0] * 762)
    palette.paste(1, (32, 0, 64, 64))
    palette.save(root / "palette.png", transparency=0)
    Image.new("L", (64, 64), 90).save(root / "grey.png")
    return {path.name: path for path in sorted(root.glob("*.png"))}


def test_every_mode_trains_exactly_as_prep_build_stores_it(tmp_path, tiny_model_dir):
    images = mode_images(tmp_path / "modes")
    before = snapshot(tmp_path / "modes")
    with Image.open(images["gray16.png"]) as source:
        assert source.mode.startswith("I") and np.asarray(source.convert("L")).mean() > 240  # PIL clips it white
    built = build_dataset(tmp_path / "modes", tmp_path / "built", min_side=8)
    assert built.kept == len(images)
    rows = [json.loads(line) for line in built.metadata_path.read_text().splitlines()]
    stored = {row["source"]: tmp_path / "built" / row["file_name"] for row in rows}

    dm = datamodule(tmp_path / "modes", tiny_model_dir, resolution=64)
    setup_warnings(dm)
    dataset = dm._train_dataset()
    for index, record in enumerate(dm.train_records):
        name = Path(record.path).name
        with Image.open(stored[name]) as reference:
            expected = to_tensor(reference.convert("RGB"))
        assert torch.equal(dataset[index]["pixel_values"], expected), name
        assert torch.equal(cache_pixels(record.path, (64, 64)), expected), name  # what a latent cache encodes

    grey16 = dataset[[Path(r.path).name for r in dm.train_records].index("gray16.png")]["pixel_values"]
    assert abs((grey16.mean().item() + 1) * 127.5 - 127.5) < 2  # mid-grey (prep build's 127.5), not 254.5
    assert snapshot(tmp_path / "modes") == before

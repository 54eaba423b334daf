"""`sdtune prep build` on a hostile source folder: every bad file named with its reason, every good one upright RGB
with the right colours and caption, duplicates reported (or removed), SRC untouched, same output with 2 workers."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hostile import BLUE, GREEN, RED, WHITE, make_hostile_src, pattern, save, snapshot, write
from PIL import Image

from data_prep.build import build_dataset
from data_prep.dedupe import DuplicateIndex, perceptual_hash, pixel_hash
from data_prep.sources import decode_caption
from sdtune.cli import main
from sdtune.data.buckets import assign_bucket, format_bucket, make_buckets
from sdtune.data.records import discover_records

CONTRACT_KEYS = ["file_name", "text", "source", "bucket", "width", "height"]


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]


def report_of(out: Path) -> dict:
    return json.loads((out / "prep_report.json").read_text(encoding="utf-8"))


def by_source(out: Path) -> dict[str, dict]:
    return {row["source"]: row for row in rows_of(out)}


def stored(out: Path, source: str) -> Image.Image:
    image = Image.open(out / by_source(out)[source]["file_name"])
    image.load()
    return image


def close(pixel, colour, tolerance=12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour))


def build(src: Path, out: Path, *extra: str) -> int:
    return main(["prep", "build", str(src), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    src = root / "src"
    expected = make_hostile_src(src)
    before = snapshot(src)
    out = root / "out"
    code = build(src, out, "--min-side", "32")
    return SimpleNamespace(root=root, src=src, out=out, expected=expected, before=before, code=code)


def test_exits_zero_and_names_every_bad_file_with_its_reason(hostile):
    assert hostile.code == 0
    report = report_of(hostile.out)
    reasons = {entry["path"]: entry["reason"] for entry in report["rejected"]}
    assert set(reasons) == set(hostile.expected.rejected)
    for path, word in hostile.expected.rejected.items():
        assert word in reasons[path], (path, reasons[path])
    assert report["totals"] == {
        "found": hostile.expected.images, "kept": len(hostile.expected.kept),
        "rejected": len(hostile.expected.rejected), "warnings": len(report["warnings"]),
    }
    assert set(report) >= {"source", "settings", "totals", "rejected", "warnings"}
    for path, word in hostile.expected.warned.items():
        assert any(w["path"] == path and word in w["reason"] for w in report["warnings"]), (path, word)
    assert not any(".cache" in w["path"] or ".hidden" in w["path"] for w in report["warnings"] + report["rejected"])


def test_rows_have_exactly_the_contract_keys_and_the_right_captions(hostile):
    rows = rows_of(hostile.out)
    assert all(list(row) == CONTRACT_KEYS for row in rows)
    assert {row["source"]: row["text"] for row in rows} == hostile.expected.kept
    # Captions: whitespace collapsed, latin-1 bytes decoded, 300 words kept whole, non-ASCII paths intact.
    assert by_source(hostile.out)["clean.jpg"]["text"] == "a clean photo of a thing"
    assert by_source(hostile.out)["captions/latin.png"]["text"] == "café crème"
    assert len(by_source(hostile.out)["captions/long.png"]["text"].split()) == 300
    assert by_source(hostile.out)["ñandú/café.png"]["file_name"] == "ñandú/café.png"


def test_every_mode_becomes_8bit_rgb_with_transparency_over_white(hostile):
    for source in hostile.expected.kept:
        image = stored(hostile.out, source)
        assert image.mode == "RGB" and image.format in ("JPEG", "PNG"), source
    cmyk = stored(hostile.out, "modes/cmyk.jpg")
    assert close(cmyk.getpixel((10, 32)), RED, 16) and close(cmyk.getpixel((86, 32)), BLUE, 16)
    palette = stored(hostile.out, "modes/palette.png")
    assert palette.getpixel((10, 32)) == WHITE and palette.getpixel((86, 32)) == GREEN
    la = stored(hostile.out, "modes/la.png")
    assert la.getpixel((48, 10)) == WHITE and la.getpixel((48, 50)) == (0, 0, 0)
    rgba = stored(hostile.out, "modes/rgba.png")
    assert rgba.getpixel((10, 32)) == WHITE and rgba.getpixel((86, 32)) == BLUE
    gif = stored(hostile.out, "modes/animated.gif")  # the first frame, not the second
    first = np.asarray(pattern((96, 64), 2), dtype=int)
    assert np.abs(np.asarray(gif, dtype=int) - first).mean() < 12


def test_16bit_gradient_keeps_its_full_range(hostile):
    grey = np.asarray(stored(hostile.out, "modes/gray16.png").convert("L"), dtype=int)
    row = grey[32]
    assert row.min() <= 2 and row.max() >= 253  # PIL's convert("L") would clip nearly all of it to 255
    assert abs(int(row[128]) - 128) <= 2 and np.all(np.diff(row) >= 0)
    with Image.open(hostile.src / "modes/gray16.png") as source:
        assert source.mode.startswith("I")  # the file really is 16-bit ...
        assert (np.asarray(source.convert("L")) == 255).mean() > 0.9  # ... and PIL's own convert clips it


def test_exif_rotation_is_applied(hostile):
    rotated = stored(hostile.out, "rotated.jpg")
    assert rotated.size == (64, 96)  # stored 96x64 with orientation 6 (90° clockwise)
    assert close(rotated.getpixel((60, 4)), RED, 24)  # stored top-left is now top-right
    assert not close(rotated.getpixel((4, 4)), RED, 60)
    assert rotated.getexif().get(0x0112, 1) == 1
    row = by_source(hostile.out)["rotated.jpg"]
    assert (row["width"], row["height"]) == (64, 96)


def test_clean_files_are_copied_verbatim_others_reencoded(hostile):
    rows = by_source(hostile.out)
    for source in ("clean.jpg", "ñandú/café.png"):
        assert (hostile.out / rows[source]["file_name"]).read_bytes() == (hostile.src / source).read_bytes()
    assert rows["nested/deeper/leaf.webp"]["file_name"] == "nested/deeper/leaf.png"
    assert rows["modes/cmyk.jpg"]["file_name"] == "modes/cmyk.jpg"
    assert stored(hostile.out, "modes/cmyk.jpg").format == "JPEG"  # re-encoded (it was CMYK), still JPEG
    assert stored(hostile.out, "modes/rgba.png").format == "PNG"


def test_name_collisions_never_overwrite(hostile):
    rows = by_source(hostile.out)
    names = [rows[s]["file_name"] for s in ("a.png", "a.PNG", "b.bmp", "b.png")]
    assert len({name.casefold() for name in names}) == 4, names
    for source in ("a.png", "a.PNG", "b.bmp", "b.png"):
        with Image.open(hostile.src / source) as original:
            assert np.array_equal(np.asarray(stored(hostile.out, source)), np.asarray(original.convert("RGB"))), source
    assert len({row["file_name"] for row in rows.values()}) == len(rows)


def test_duplicates_are_reported_and_kept_by_default(hostile):
    warnings = report_of(hostile.out)["warnings"]
    exact = [w["reason"] for w in warnings if w["path"] == "dup/b_copy.png"]
    near = [w["reason"] for w in warnings if w["path"] == "dup/c_near.jpg"]
    assert any(r.startswith("duplicate of dup/a_original.png") for r in exact), exact
    assert any(r.startswith("near-duplicate of dup/a_original.png") for r in near), near
    assert {"dup/a_original.png", "dup/b_copy.png", "dup/c_near.jpg"} <= set(by_source(hostile.out))
    # Distinct images are not flagged: only the two planted duplicates are.
    assert sum("duplicate of" in w["reason"] for w in warnings) == 2


def test_dedupe_removes_later_duplicates(hostile, tmp_path):
    out = tmp_path / "deduped"
    assert build(hostile.src, out, "--min-side", "32", "--dedupe") == 0
    reasons = {entry["path"]: entry["reason"] for entry in report_of(out)["rejected"]}
    assert reasons["dup/b_copy.png"] == "duplicate of dup/a_original.png"
    assert reasons["dup/c_near.jpg"].startswith("near-duplicate of dup/a_original.png")
    sources = set(by_source(out))
    assert "dup/a_original.png" in sources and not {"dup/b_copy.png", "dup/c_near.jpg"} & sources
    assert len(sources) == len(hostile.expected.kept) - 2


def test_two_workers_give_the_same_output(hostile, tmp_path):
    out = tmp_path / "two"
    assert build(hostile.src, out, "--min-side", "32", "--workers", "2") == 0
    assert (out / "metadata.jsonl").read_bytes() == (hostile.out / "metadata.jsonl").read_bytes()
    one, two = report_of(hostile.out), report_of(out)
    one["settings"].pop("workers"), two["settings"].pop("workers")
    assert one == two
    for row in rows_of(out):
        assert (out / row["file_name"]).read_bytes() == (hostile.out / row["file_name"]).read_bytes()


def test_buckets_and_sizes_match_the_stored_images(hostile):
    buckets = make_buckets(512 * 512)
    for row in rows_of(hostile.out):
        with Image.open(hostile.out / row["file_name"]) as image:
            assert image.size == (row["width"], row["height"])
        assert row["bucket"] == format_bucket(assign_bucket(row["width"], row["height"], buckets))


def test_the_records_reader_loads_the_build(hostile):
    records = discover_records(hostile.out)
    expected = {str(hostile.out / row["file_name"]): row["text"] for row in rows_of(hostile.out)}
    assert {r.path: r.caption for r in records} == expected


def test_source_tree_is_never_modified(hostile, tmp_path):
    # The fixture's build plus one with every writing option; SRC must be byte-identical, names and mtimes too.
    out = tmp_path / "all_options"
    args = ["--min-side", "32", "--workers", "2", "--dedupe", "--max-side", "48", "--prefix", "sks"]
    assert build(hostile.src, out, *args) == 0
    assert build(hostile.src, out, *args, "--overwrite") == 0
    assert snapshot(hostile.src) == hostile.before


def test_nothing_usable_is_a_one_line_error(tmp_path, capsys):
    src = write(tmp_path / "src/empty.jpg", b"").parent
    write(src / "page.png", b"<html><body>404</body></html>")
    code = build(src, tmp_path / "out")
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "no usable images" in err, err
    assert report_of(tmp_path / "out")["totals"]["kept"] == 0
    assert build(tmp_path / "nothing_here", tmp_path / "out2") == 2  # missing SRC: bad arguments


def test_refuses_unsafe_destinations(tmp_path, capsys):
    src = tmp_path / "src"
    save(pattern((64, 64), 1), src / "one.png")
    before = snapshot(src)
    assert build(src, src / "out", "--min-side", "8") == 2
    assert f"--out '{src / 'out'}' is inside SRC '{src}'" in capsys.readouterr().err
    assert build(src, src, "--min-side", "8") == 2
    assert build(src / "sub", src, "--min-side", "8") == 2  # (missing SRC also refused)
    inner = src / "inner"
    save(pattern((64, 64), 2), inner / "two.png")
    before = snapshot(src)
    assert build(inner, src, "--min-side", "8") == 2
    assert f"--out '{src}' contains SRC '{inner}'" in capsys.readouterr().err
    assert snapshot(src) == before
    busy = tmp_path / "busy"
    write(busy / "notes.md", b"mine")
    assert build(src, busy, "--min-side", "8") == 2
    assert build(src, busy, "--min-side", "8", "--overwrite") == 2  # no previous build there: nothing deleted
    assert (busy / "notes.md").read_bytes() == b"mine"


def test_overwrite_replaces_only_the_previous_build(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    save(pattern((64, 64), 1), src / "sub/one.png")
    save(pattern((64, 64), 2), src / "two.png")
    assert build(src, out, "--min-side", "8") == 0
    write(out / "notes.md", b"mine")
    (src / "sub/one.png").rename(src / "uno.png")
    assert build(src, out, "--min-side", "8") == 2  # not empty
    assert build(src, out, "--min-side", "8", "--overwrite") == 0
    assert sorted(row["file_name"] for row in rows_of(out)) == ["two.png", "uno.png"]
    assert not (out / "sub").exists() and (out / "notes.md").read_bytes() == b"mine"


def test_min_side_default_max_pixels_and_max_side(tmp_path):
    src = tmp_path / "src"
    save(pattern((300, 200), 1), src / "short.png")  # shorter side 200 < 256
    save(pattern((400, 300), 2), src / "ok.jpg", quality=90)
    assert build(src, tmp_path / "default") == 0
    report = report_of(tmp_path / "default")
    assert [(e["path"], e["reason"].split(":")[0]) for e in report["rejected"]] == [("short.png", "too small")]
    assert build(src, tmp_path / "limited", "--min-side", "8", "--max-pixels", "100000") == 0  # 400x300 = 120000
    assert "too large" in {e["path"]: e["reason"] for e in report_of(tmp_path / "limited")["rejected"]}["ok.jpg"]
    assert build(src, tmp_path / "small", "--min-side", "8", "--max-side", "100") == 0
    rows = by_source(tmp_path / "small")
    assert (rows["ok.jpg"]["width"], rows["ok.jpg"]["height"]) == (100, 75)
    assert (rows["short.png"]["width"], rows["short.png"]["height"]) == (100, 67)
    assert stored(tmp_path / "small", "ok.jpg").format == "JPEG"  # a JPEG source stays JPEG (quality 95)


def test_caption_sources_template_and_prefix(tmp_path):
    src = tmp_path / "src"
    save(pattern((64, 64), 1), src / "red_car-2.png")
    save(pattern((64, 64), 2), src / "sub/blue_bike.png")
    write(src / "red_car-2.txt", b"from sidecar")
    write(src / "metadata.jsonl", b'{"file_name": "red_car-2.png", "text": " from\\n metadata "}\n'
                                  b'{"file_name": "gone.png", "text": "x"}\n')

    def captions(name: str, *args: str) -> dict[str, str]:
        assert build(src, tmp_path / name, "--min-side", "8", *args) == 0
        return {row["source"]: row["text"] for row in rows_of(tmp_path / name)}

    assert captions("auto") == {"red_car-2.png": "from metadata", "sub/blue_bike.png": ""}
    warned = {(w["path"], w["reason"].split(":")[0]) for w in report_of(tmp_path / "auto")["warnings"]}
    assert ("sub/blue_bike.png", "no caption") in warned
    assert any(path == "gone.png" for path, _ in warned)
    assert captions("sidecar", "--caption-from", "sidecar") == {
        "red_car-2.png": "from sidecar", "sub/blue_bike.png": ""}
    assert captions("filename", "--caption-from", "filename") == {
        "red_car-2.png": "red car 2", "sub/blue_bike.png": "blue bike"}
    assert captions("template", "--caption-template", "photo of sks dog") == dict.fromkeys(
        ["red_car-2.png", "sub/blue_bike.png"], "photo of sks dog")
    assert captions("prefix", "--caption-from", "sidecar", "--prefix", "sks") == {
        "red_car-2.png": "sks, from sidecar", "sub/blue_bike.png": "sks"}
    (src / "metadata.jsonl").unlink()
    write(src / "metadata.csv", "file_name,caption\nsub/blue_bike.png,ñ csv\n".encode())
    assert captions("csv")["sub/blue_bike.png"] == "ñ csv"


def test_arrow_copy_loads_with_the_records_reader(tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        save(pattern((64, 48), i), src / f"{i}.png")
        write(src / f"{i}.txt", f"caption {i}".encode())
    out = tmp_path / "out"
    assert build(src, out, "--min-side", "8", "--arrow") == 0
    records = discover_records(out / "arrow")
    assert [r.caption for r in records] == ["caption 0", "caption 1", "caption 2"]
    for i, record in enumerate(records):
        with Image.open(record.open()) as image:
            assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(pattern((64, 48), i)))
    assert len(discover_records(out)) == 3  # DST itself still reads as an imagefolder


def test_help_shows_a_full_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prep", "build", "--help"])
    assert exit_info.value.code == 0
    assert "sdtune prep build " in capsys.readouterr().out


def test_build_dataset_function_returns_counts(tmp_path):
    src = tmp_path / "src"
    save(pattern((64, 64), 1), src / "a.png")
    write(src / "b.png", b"")
    result = build_dataset(src, tmp_path / "out", min_side=8, progress=False)
    assert (result.found, result.kept, [e["reason"] for e in result.rejected]) == (2, 1, ["zero bytes"])


def test_captions_never_fail_to_decode():
    assert decode_caption("café".encode()) == ("café", None)
    assert decode_caption(b"caf\xe9")[0] == "café"
    assert decode_caption("ñ".encode("utf-16"))[0] == "ñ"
    assert decode_caption(bytes(range(256)))[1] is not None  # every byte value: still a string


def test_near_duplicates_need_a_close_hash_and_close_colours():
    index = DuplicateIndex(max_distance=4)
    base = pattern((128, 96), 1)
    index.add("base", pixel_hash(base), *perceptual_hash(base))
    smaller = base.resize((120, 90), Image.Resampling.LANCZOS)
    match = index.find(pixel_hash(smaller), *perceptual_hash(smaller))
    assert match is not None and not match.exact and match.earlier == "base"
    # Solid colours all hash alike; the colour thumbnail keeps red and blue apart.
    red, blue = Image.new("RGB", (64, 64), RED), Image.new("RGB", (64, 64), BLUE)
    index.add("red", pixel_hash(red), *perceptual_hash(red))
    assert index.find(pixel_hash(blue), *perceptual_hash(blue)) is None
    assert index.find(pixel_hash(red), *perceptual_hash(red)).exact
    other = pattern((128, 96), 2)
    assert index.find(pixel_hash(other), *perceptual_hash(other)) is None

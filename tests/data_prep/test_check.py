"""`sdtune prep check`: counts, size bins, bucket fill against the global batch, caption problems, exit codes, the
JSON report and the HTML contact sheet. Each test writes its own small DST (images + metadata.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from data_prep.check import check_dataset, format_table
from data_prep.check_captions import estimate_tokens
from data_prep.dataset import load_entries
from sdtune.cli import main
from sdtune.data.buckets import assign_bucket, format_bucket, make_buckets


def write_dst(root: Path, rows: list[dict], sizes: dict[str, tuple[int, int]]) -> Path:
    """Images of the given sizes (solid colours, PNG unless the name says .jpg) and metadata.jsonl with `rows`."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, size) in enumerate(sizes.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, ((40 * i) % 256, 100, 200)).save(path)
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return root


def good_dst(root: Path, per_bucket: int = 4) -> Path:
    """`per_bucket` square images (bucket 512x512 stored) and as many wide ones without bucket/width/height keys."""
    sizes, rows = {}, []
    for i in range(per_bucket):
        sizes[f"sq/{i}.png"] = (64, 64)
        rows.append({"file_name": f"sq/{i}.png", "text": f"a square photo number {i}", "source": f"sq{i}.png",
                     "bucket": "512x512", "width": 64, "height": 64})
        sizes[f"wide_{i}.png"] = (600, 300)
        rows.append({"file_name": f"wide_{i}.png", "text": f"a wide photo number {i}"})
    return write_dst(root, rows, sizes)


WIDE = format_bucket(assign_bucket(600, 300, make_buckets(512 * 512)))


def test_counts_sizes_and_buckets_of_a_good_dataset(tmp_path):
    dst = good_dst(tmp_path / "dst", per_bucket=4)

    report = check_dataset(dst, batch_size=2, devices=2, progress=False).report

    assert report["ok"] and report["errors"] == []
    assert report["counts"] == {
        "rows": 8, "images": 8, "missing": 0, "unreadable": 0, "outside": 0, "captioned": 8, "empty_captions": 0,
        "duplicate_captions": 0, "long_captions": 0,
    }
    assert report["sizes"]["bins"] == {"<256": 4, "256-511": 4, "512-767": 0, "768-1023": 0, ">=1024": 0}
    # Stored bucket kept for the square rows; the wide rows' bucket computed from the image header (512² area).
    assert {b["bucket"]: (b["images"], b["batches"], b["leftover"]) for b in report["buckets"]} == {
        "512x512": (4, 1, 0), WIDE: (4, 1, 0)
    }
    assert report["settings"]["global_batch"] == 4


def test_bucket_smaller_than_one_global_batch_is_an_error(tmp_path):
    sizes = {f"{i}.png": (64, 64) for i in range(16)} | {f"t{i}.png": (448, 576) for i in range(3)}
    rows = [{"file_name": name, "text": f"photo {name}"} for name in sizes]
    rows[-3:] = [dict(row, bucket="448x576") for row in rows[-3:]]
    dst = write_dst(tmp_path / "dst", rows, sizes)

    report = check_dataset(dst, batch_size=4, devices=2, accumulate=2, progress=False).report

    assert not report["ok"]
    [error] = report["errors"]
    assert error["code"] == "bucket_too_small"
    assert error["message"].startswith(
        "bucket 448x576 has 3 images, fewer than one batch of 16 (batch 4 × devices 2 × accumulate 2)"
    )
    assert sorted(error["files"]) == ["t0.png", "t1.png", "t2.png"]
    # The 16 square images fill exactly one global batch: no error for them.
    assert [b["ok"] for b in report["buckets"] if b["bucket"] != "448x576"] == [True]
    # Lowering the batch makes the same dataset pass.
    assert check_dataset(dst, batch_size=3, progress=False).report["ok"]


def test_cli_exit_codes_table_json_and_sheet(tmp_path, capsys):
    bad = good_dst(tmp_path / "bad", per_bucket=3)
    assert main(["prep", "check", str(bad), "--batch-size", "2", "--accumulate", "2"]) == 1
    out = capsys.readouterr().out
    bucket_line = next(line for line in out.splitlines() if line.strip().startswith("512x512"))
    assert bucket_line.split()[:4] == ["512x512", "3", "0", "3"] and "ERROR" in bucket_line
    assert "fewer than one batch of 4 (batch 2 × devices 1 × accumulate 2)" in out
    assert "FAILED: 2 errors" in out
    report = json.loads((bad / "check_report.json").read_text())
    assert report["counts"]["images"] == 6 and len(report["errors"]) == 2
    assert (bad / "contact_sheet.html").is_file()

    good = good_dst(tmp_path / "good", per_bucket=4)
    out_json, sheet = tmp_path / "out" / "r.json", tmp_path / "out" / "s.html"
    code = main(["prep", "check", str(good), "--batch-size", "4", "--json", str(out_json), "--sheet", str(sheet)])
    assert code == 0
    assert json.loads(out_json.read_text())["ok"] is True and sheet.is_file()
    assert not (good / "check_report.json").exists() and not (good / "contact_sheet.html").exists()
    assert "OK: 0 errors" in capsys.readouterr().out


def test_missing_and_unreadable_images_are_errors(tmp_path):
    dst = good_dst(tmp_path / "dst", per_bucket=2)
    (dst / "sq" / "1.png").unlink()
    (dst / "wide_0.png").write_bytes(b"not an image at all")
    noise = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    noise.save(dst / "noise.png")
    full = (dst / "noise.png").read_bytes()
    (dst / "noise.png").unlink()
    (dst / "truncated.png").write_bytes(full[: len(full) // 2])  # header intact, pixel data cut off
    with (dst / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "truncated.png", "text": "half a file"}) + "\n")

    report = check_dataset(dst, progress=False).report

    codes = sorted((e["code"], e["files"][0]) for e in report["errors"])
    assert codes == [("missing_image", "sq/1.png"), ("unreadable_image", "truncated.png"),
                     ("unreadable_image", "wide_0.png")]
    assert (report["counts"]["rows"], report["counts"]["images"], report["counts"]["missing"],
            report["counts"]["unreadable"]) == (5, 2, 1, 2)
    assert main(["prep", "check", str(dst), "--no-sheet"]) == 1
    assert not (dst / "contact_sheet.html").exists()


def test_caption_warnings_empty_duplicate_long_and_unlisted(tmp_path):
    long_caption = " ".join(["word"] * 80)
    sizes = {f"{i}.png": (64, 64) for i in range(6)} | {"stray.png": (64, 64)}
    texts = ["", "", "A red  circle", "a red circle", long_caption, "unique"]
    rows = [{"file_name": f"{i}.png", "text": text} for i, text in enumerate(texts)]
    rows[5]["width"], rows[5]["height"] = 100, 64  # wrong size in metadata
    dst = write_dst(tmp_path / "dst", rows, sizes)

    report = check_dataset(dst, progress=False).report

    assert report["ok"]  # warnings only
    c = report["counts"]
    assert (c["captioned"], c["empty_captions"], c["duplicate_captions"], c["long_captions"]) == (4, 2, 2, 1)
    by_code = {w["code"]: w for w in report["warnings"]}
    assert set(by_code) == {"empty_caption", "duplicate_caption", "long_caption", "unlisted_image", "size_mismatch"}
    assert by_code["empty_caption"]["files"] == ["0.png", "1.png"]
    assert by_code["duplicate_caption"]["files"] == ["2.png", "3.png"]
    assert by_code["long_caption"]["files"] == ["4.png"] and "estimated" in by_code["long_caption"]["message"]
    assert report["long_captions"] == [{"file_name": "4.png", "tokens": 80}]
    assert report["tokens"]["counted_by"] == "estimate" and report["tokens"]["max"] == 80
    assert by_code["unlisted_image"]["files"] == ["stray.png"]
    assert "says 100x64, the image is 64x64" in by_code["size_mismatch"]["message"]
    assert "estimated; pass --tokenizer" in format_table(report)


def test_estimate_tokens():
    assert estimate_tokens("a red circle") == 3
    assert estimate_tokens("a red, blue circle.") == 6  # punctuation marks count
    assert estimate_tokens("photo 2024") == 5  # one per digit
    assert estimate_tokens("supercalifragilistic") == 3  # 20 letters: 1 + ceil(10 / 6)
    assert estimate_tokens("") == 0


@pytest.fixture()
def tokenizer_model(tmp_path):
    """The smallest directory `load_tokenizer` accepts: the tiny CLIP tokenizer and empty other subfolders."""
    from sdtune.models.tiny import write_tokenizer

    model = tmp_path / "model"
    for name in ("unet", "vae", "text_encoder", "scheduler"):
        (model / name).mkdir(parents=True)
    write_tokenizer(model / "tokenizer")
    return model


def test_tokenizer_gives_exact_counts(tmp_path, tokenizer_model):
    from sdtune.models.pretrained import load_tokenizer
    from sdtune.models.text import text_token_ids

    captions = ["a red circle on a white background", "photographic masterpiece, intricate details"]
    dst = write_dst(tmp_path / "dst", [{"file_name": f"{i}.png", "text": t} for i, t in enumerate(captions)],
                    {"0.png": (64, 64), "1.png": (64, 64)})
    exact = [len(ids) for ids in text_token_ids(load_tokenizer(str(tokenizer_model)), captions)]
    assert exact != [estimate_tokens(c) for c in captions]  # the tiny vocabulary splits words: counts differ

    report = check_dataset(dst, tokenizer=str(tokenizer_model), max_tokens=min(exact), progress=False).report

    assert report["tokens"]["counted_by"] == "tokenizer" and report["tokens"]["max"] == max(exact)
    assert report["long_captions"] == [{"file_name": f"{exact.index(max(exact))}.png", "tokens": max(exact)}]
    assert "CLIP tokenizer" in report["warnings"][0]["message"]


def test_contact_sheet_escapes_captions_and_shows_every_image(tmp_path):
    sizes = {"a.png": (64, 64), "b.png": (600, 300), "c&d.png": (64, 64)}
    rows = [{"file_name": "a.png", "text": "<script>alert('x')</script> & more"},
            {"file_name": "b.png", "text": "a wide \"quoted\" one"},
            {"file_name": "c&d.png", "text": ""}]
    dst = write_dst(tmp_path / "dst", rows, sizes)
    main(["prep", "check", str(dst)])
    page = (dst / "contact_sheet.html").read_text()

    assert page.count("<img ") == 3 and page.count('src="data:image/jpeg;base64,') == 3
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    assert "a wide &quot;quoted&quot; one" in page and "c&amp;d.png" in page and "(no caption)" in page
    # Grouped by bucket, tall to wide: the square section comes before the wide one.
    assert page.index('id="bucket-512x512"') < page.index(f'id="bucket-{WIDE}"')
    assert "600x300 · bucket " + WIDE in page

    main(["prep", "check", str(dst), "--sheet-limit", "2"])
    limited = (dst / "contact_sheet.html").read_text()
    assert limited.count("<img ") == 2 and "Showing the first 2 rows" in limited


def test_area_recomputes_buckets_and_exif_orientation_is_applied(tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    image = Image.new("RGB", (80, 40))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90°: stored 80x40, upright 40x80
    image.save(dst / "rot.jpg", exif=exif)
    Image.new("RGB", (64, 64)).save(dst / "sq.png")
    (dst / "metadata.jsonl").write_text(
        json.dumps({"file_name": "rot.jpg", "text": "tall"}) + "\n"
        + json.dumps({"file_name": "sq.png", "text": "square", "bucket": "512x512"}) + "\n"
    )

    [rot, sq] = load_entries(dst)
    assert (rot.width, rot.height) == (40, 80) and sq.bucket == "512x512"
    assert rot.bucket == format_bucket(assign_bucket(40, 80, make_buckets(512 * 512)))

    report = check_dataset(dst, area=1024 * 1024, progress=False).report
    assert {b["bucket"] for b in report["buckets"]} == {
        format_bucket(assign_bucket(40, 80, make_buckets(1024 * 1024))), "1024x1024"
    }


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    assert main(["prep", "check", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"sdtune: error: dataset '{tmp_path / 'nope'}' does not exist; pass the folder written by `sdtune prep build`"
    (tmp_path / "empty").mkdir()
    assert main(["prep", "check", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "has no metadata.jsonl" in err


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prep", "check", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "sdtune prep check data/my_dog --batch-size 4" in out and "--tokenizer" in out and "--accumulate" in out

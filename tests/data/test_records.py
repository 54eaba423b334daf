"""Record discovery across the three dataset layouts, and its one-line errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import pytest
from PIL import Image

from sdtune.data.images import open_image
from sdtune.data.records import discover_records
from sdtune.errors import SdtuneError


def write_image(path: Path, color: str = "red", size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def captions_by_name(records) -> dict[str, str]:
    return {Path(r.path).name: r.caption for r in records}


def test_jsonl_metadata_gives_captions_and_sorted_order(tmp_path):
    for name in ("b.png", "a.png", "sub/c.jpg"):
        write_image(tmp_path / name)
    rows = [
        {"file_name": "b.png", "text": "  a blue bird \n"},
        {"file_name": "sub/c.jpg", "text": "a cat"},
        {"file_name": "a.png", "text": None},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")

    records = discover_records(tmp_path)

    assert [Path(r.path).relative_to(tmp_path).as_posix() for r in records] == ["a.png", "b.png", "sub/c.jpg"]
    assert [r.caption for r in records] == ["", "a blue bird", "a cat"]


def test_csv_metadata_accepts_caption_alias_and_commas(tmp_path):
    write_image(tmp_path / "x.png")
    write_image(tmp_path / "unlisted.png")  # images not in the metadata are not training data
    (tmp_path / "metadata.csv").write_text('file_name,caption\nx.png,"red, square, photo"\n', encoding="utf-8")

    assert captions_by_name(discover_records(tmp_path)) == {"x.png": "red, square, photo"}


def test_sidecars_recursive_any_case_with_fallbacks(tmp_path):
    write_image(tmp_path / "one.PNG")
    (tmp_path / "one.txt").write_text("  first caption\n", encoding="utf-8")
    write_image(tmp_path / "deep/two.JpEg")
    (tmp_path / "deep/two.caption").write_bytes("caf\xe9 au lait".encode("latin-1"))  # not valid UTF-8
    write_image(tmp_path / "three.webp")  # no sidecar
    write_image(tmp_path / ".ipynb_checkpoints/stale.png")
    (tmp_path / "notes.txt").write_text("not an image")

    records = discover_records(tmp_path)

    assert captions_by_name(records) == {"one.PNG": "first caption", "two.JpEg": "café au lait", "three.webp": ""}
    assert [r.path for r in records] == sorted(r.path for r in records)


@pytest.mark.parametrize("as_dict,column", [(False, "text"), (True, "caption")])
def test_save_to_disk_rows_read_their_own_images(tmp_path, as_dict, column):
    def png(color: str) -> dict:
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4), color).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    features = datasets.Features({"image": datasets.Image(), column: datasets.Value("string")})
    table = datasets.Dataset.from_dict(
        {"image": [png("red"), png("blue")], column: ["a red thing", " a blue thing "]}, features=features
    )
    (datasets.DatasetDict(train=table) if as_dict else table).save_to_disk(str(tmp_path / "saved"))

    records = discover_records(tmp_path / "saved")

    assert [r.caption for r in records] == ["a red thing", "a blue thing"]
    assert open_image(records[0].open()).getpixel((0, 0)) == (255, 0, 0)
    assert open_image(records[1].open()).getpixel((0, 0)) == (0, 0, 255)


def test_missing_root_names_the_setting(tmp_path):
    with pytest.raises(SdtuneError, match=r"^data.val_root '.*nope' does not exist$"):
        discover_records(tmp_path / "nope", setting="data.val_root")


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(SdtuneError, match="data.root .* has no images"):
        discover_records(tmp_path)


def test_metadata_pointing_at_missing_files_counts_them_and_names_the_first(tmp_path):
    write_image(tmp_path / "here.png")
    rows = [{"file_name": n, "text": "t"} for n in ("here.png", "gone1.png", "gone2.png")]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

    with pytest.raises(SdtuneError) as caught:
        discover_records(tmp_path)

    message = str(caught.value)
    assert "2 missing" in message and "'gone1.png'" in message and "\n" not in message


def test_metadata_without_caption_column(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "label": "cat"}))
    with pytest.raises(SdtuneError, match="no caption column 'text' or 'caption'.*label"):
        discover_records(tmp_path)


def test_saved_dataset_without_caption_column(tmp_path):
    datasets.Dataset.from_dict({"image": ["a.png"], "label": [1]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(SdtuneError, match="no caption column"):
        discover_records(tmp_path / "saved")


def test_invalid_jsonl_line_is_reported_with_its_number(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{broken\n')
    with pytest.raises(SdtuneError, match="metadata.jsonl line 2 is not valid JSON"):
        discover_records(tmp_path)

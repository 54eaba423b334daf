"""The offline shapes dataset: right files, right captions, the drawn colour really there, same bytes per seed."""

from __future__ import annotations

import json

import pytest
from PIL import Image, ImageColor

from data_prep.shapes import make_shapes_dataset
from sdtune.data.records import discover_records
from sdtune.errors import SdtuneError


def test_writes_an_imagefolder_sdtune_reads(tmp_path):
    out = make_shapes_dataset(tmp_path / "shapes", count=12, size=32)

    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and len(list(out.glob("*.png"))) == 12
    expected = {f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")}
    assert {row["text"] for row in rows} == expected  # 12 images cover every pair exactly once
    records = discover_records(out)
    assert sorted(r.caption for r in records) == sorted(row["text"] for row in rows)


def test_each_image_contains_its_captioned_colour_on_a_light_background(tmp_path):
    out = make_shapes_dataset(tmp_path, count=8, size=48, colors=("red", "blue"), shapes=("circle", "triangle"))
    for row in map(json.loads, (out / "metadata.jsonl").read_text().splitlines()):
        image = Image.open(out / row["file_name"])
        assert image.size == (48, 48) and image.mode == "RGB"
        color = ImageColor.getrgb(row["text"].split()[1])
        pixels = list(image.getdata())
        assert pixels.count(color) > 48 * 48 * 0.03  # the shape is big enough to see
        assert min(pixels[0]) >= 230  # corners are background: white or light gray


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    def image_bytes(seed: int, name: str) -> list[bytes]:
        out = make_shapes_dataset(tmp_path / name, count=6, size=32, seed=seed)
        return [p.read_bytes() for p in sorted(out.glob("*.png"))]

    assert image_bytes(0, "a") == image_bytes(0, "b")
    assert image_bytes(0, "a") != image_bytes(1, "c")


@pytest.mark.parametrize(
    "kwargs,message",
    [({"count": 0}, "count"), ({"shapes": ("hexagon",)}, "hexagon"), ({"colors": ("notacolour",)}, "notacolour")],
)
def test_bad_arguments_raise_one_line_errors(tmp_path, kwargs, message):
    with pytest.raises(SdtuneError, match=message):
        make_shapes_dataset(tmp_path, **kwargs)

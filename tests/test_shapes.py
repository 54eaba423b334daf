"""The offline shapes dataset: right files, right captions, the drawn colour really there, same bytes per seed;
the judge that reads colour and shape back; and `sdtune prep shapes`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageColor, ImageDraw, ImageFilter

from sdtune.cli import main as sdtune_main
from sdtune.data.records import discover_records
from sdtune.errors import SdtuneError
from sdtune.toy.shapes import JUDGE_COLORS, SHAPES, _draw_shape, judge, make_shapes_dataset


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


# --- judge ------------------------------------------------------------------------------------------------------

JUDGED_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")


def _generated(tmp_path, size: int, seed: int, count: int = 36) -> list[tuple[Image.Image, str]]:
    out = make_shapes_dataset(tmp_path / f"s{size}_{seed}", count=count, size=size, seed=seed, colors=JUDGED_COLORS)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    return [(Image.open(out / row["file_name"]).convert("RGB"), row["text"]) for row in rows]


def _blur_and_noise(image: Image.Image, seed: int) -> Image.Image:
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(1)), dtype=np.int16)
    noise = np.random.default_rng(seed).integers(-10, 11, size=blurred.shape)
    return Image.fromarray(np.clip(blurred + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """324 images: every (colour, shape) pair of 6 colours × 3 shapes, twice, at 32/64/128 px, 3 seeds each."""
    tmp = tmp_path_factory.mktemp("judge")
    return [pair for size in (32, 64, 128) for seed in range(3) for pair in _generated(tmp, size, seed)]


def test_judge_names_colour_and_shape_of_generated_images(generated):
    assert len(generated) >= 300
    answers = [judge(image) for image, _ in generated]
    right = sum(a is not None and a.caption == text for a, (_, text) in zip(answers, generated))
    assert right / len(generated) >= 0.98
    # Every colour and shape was both drawn and recognised, so no class is guessed by default.
    assert {a.color for a in answers if a} == set(JUDGED_COLORS)
    assert {a.shape for a in answers if a} == {"circle", "square", "triangle"}
    assert all(isinstance(a, tuple) and tuple(a[:2]) == (a.color, a.shape) for a in answers if a)


def test_judge_survives_blur_and_noise(generated):
    right = sum(
        (answer := judge(_blur_and_noise(image, seed))) is not None and answer.caption == text
        for seed, (image, text) in enumerate(generated)
    )
    assert right / len(generated) >= 0.95


def _two_shapes() -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((2, 2, 22, 22), fill="red")
    draw.ellipse((34, 34, 60, 60), fill="blue")
    return image


def _two_colours() -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 10, 50, 30), fill="red")
    draw.rectangle((10, 31, 50, 50), fill="blue")
    return image


def _tiny_blob() -> Image.Image:
    image = Image.new("RGB", (64, 64), (235, 235, 235))
    ImageDraw.Draw(image).rectangle((30, 30, 32, 32), fill="red")
    return image


@pytest.mark.parametrize("size", [32, 64, 128])
def test_judge_sees_nothing_in_blank_or_noise_images(size):
    rng = np.random.default_rng(size)
    images = [Image.new("RGB", (size, size), "white"), Image.new("RGB", (size, size), (40, 90, 200))]
    images += [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(10)]
    images += [
        Image.fromarray(np.clip(rng.normal(128, sigma, (size, size, 3)), 0, 255).astype(np.uint8))
        for sigma in (5, 15, 25, 40, 60, 90)
        for _ in range(3)
    ]
    assert [judge(image) for image in images] == [None] * len(images)


@pytest.mark.parametrize("make", [_two_shapes, _two_colours, _tiny_blob])
def test_judge_sees_nothing_without_one_clear_shape(make):
    assert judge(make()) is None


def test_judge_palette_is_configurable():
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).rectangle((16, 16, 48, 48), fill="brown")
    assert judge(image).color != "brown"  # not in the default palette
    assert judge(image, colors=("red", "brown")) == ("brown", "square", 1.0, 0.0, pytest.approx(33 * 33 / 64**2))


def _blob(fill: tuple[int, int, int], shape: str, size: int, noise: int = 0, seed: int = 0) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    _draw_shape(ImageDraw.Draw(image), shape, (size // 5, size // 5, size * 4 // 5, size * 4 // 5), fill)
    pixels = np.asarray(image, dtype=np.int16) + np.random.default_rng(seed).integers(-noise, noise + 1, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


# Grey, light grey, dark grey, purple 7/8 washed out with grey 128, red half washed out with white: 128, 210, 105,
# 112 and 133 from the nearest JUDGE_COLORS colour (purple, orange, purple, purple, orange), beyond MAX_COLOR_DISTANCE.
WASHED_OUT = [(128, 128, 128), (200, 200, 200), (80, 80, 80), (128, 112, 128), (255, 128, 128)]


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("fill", WASHED_OUT)
def test_judge_says_nothing_for_a_colour_far_from_every_named_one(fill, size):
    for shape in SHAPES:
        for noise in (0, 10):
            answer = judge(_blob(fill, shape, size, noise))
            assert answer is not None and (answer.color, answer.shape) == (None, shape), (fill, shape, noise)
            assert answer.caption == f"a {shape}"


@pytest.mark.parametrize("size", [32, 64])
def test_judge_still_names_every_palette_colour(tmp_path, size):
    out = make_shapes_dataset(tmp_path, count=2 * len(JUDGE_COLORS) * len(SHAPES), size=size, colors=JUDGE_COLORS)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    answers = [judge(Image.open(out / row["file_name"])) for row in rows]
    assert [a and a.caption for a in answers] == [row["text"] for row in rows]


@pytest.mark.parametrize("size", [32, 64])
def test_judge_keeps_a_slightly_perturbed_purple_purple(tmp_path, size):
    out = make_shapes_dataset(tmp_path, count=12, size=size, seed=size, colors=("purple",))
    for seed, row in enumerate(map(json.loads, (out / "metadata.jsonl").read_text().splitlines())):
        blurred = np.asarray(Image.open(out / row["file_name"]).filter(ImageFilter.GaussianBlur(1)), dtype=np.int16)
        noisy = blurred + np.random.default_rng(seed).integers(-20, 21, size=blurred.shape)
        answer = judge(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
        assert answer is not None and answer.caption == row["text"]


def test_a_blob_of_named_colours_mixed_is_not_nothing():
    # Stripes of yellow, cyan and magenta: the per-channel median is white, far from every named colour, but the
    # pixels are not, so this is a blob of mixed colours (no answer), not a washed-out one.
    image = Image.new("RGB", (64, 64), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    for i, x in enumerate(range(12, 52, 2)):
        draw.rectangle((x, 12, x + 1, 51), fill=("yellow", "cyan", "magenta")[i % 3])
    assert judge(image) is None
    assert judge(image, colors=("yellow", "cyan", "magenta", "white")) is None  # white is named: still mixed


# --- `sdtune prep shapes` ---------------------------------------------------------------------------------------


def test_cli_writes_images_the_judge_agrees_with(tmp_path, capsys):
    out = tmp_path / "cli_shapes"
    assert sdtune_main(["prep", "shapes", "--out", str(out), "--n", "12", "--size", "48", "--seed", "3"]) == 0
    assert "wrote 12 images" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and len(list(out.glob("*.png"))) == 12
    for row in rows:
        image = Image.open(out / row["file_name"])
        assert image.size == (48, 48)
        assert judge(image).caption == row["text"]


def test_cli_colour_and_shape_lists(tmp_path):
    out = tmp_path / "two"
    argv = ["prep", "shapes", "--out", str(out), "--n", "4", "--colors", "purple,orange", "--shapes", "square"]
    assert sdtune_main(argv) == 0
    texts = sorted(json.loads(line)["text"] for line in (out / "metadata.jsonl").read_text().splitlines())
    assert texts == ["a orange square", "a orange square", "a purple square", "a purple square"]


def test_cli_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sdtune_main(["prep", "shapes", "--help"])
    assert exit_info.value.code == 0
    assert "sdtune prep shapes --out data/shapes --n 64" in capsys.readouterr().out


def test_cli_bad_count_is_one_line_exit_2(tmp_path, capsys):
    assert sdtune_main(["prep", "shapes", "--out", str(tmp_path / "x"), "--n", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdtune: error: shapes: count must be at least 1") and err.count("\n") == 1

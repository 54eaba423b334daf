"""Scoring samples with the shapes judge: the accuracies on hand-drawn images, prompt parsing, and
`sdtune evaluate --judge shapes` end to end on the tiny model (its own noise, then drawn images in its place)."""

from __future__ import annotations

import json

import pytest
from PIL import Image, ImageDraw
from training import trained_adapter

import sdtune.inference.sampling
from sdtune.adapters.lora import LoraSettings
from sdtune.cli import main
from sdtune.errors import SdtuneError
from sdtune.toy.judging import accuracy, format_table, judge_palette, parse_prompt, score, shape_prompts
from sdtune.toy.shapes import JUDGE_COLORS, judge


def drawn(color: str | tuple | None, shape: str | None, size: int = 64) -> Image.Image:
    """One shape on white, inset by a fifth of the side; `shape` None gives a blank image."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    left, right = size // 5, size * 4 // 5
    if shape == "circle":
        draw.ellipse((left, left, right, right), fill=color)
    elif shape == "square":
        draw.rectangle((left, left, right, right), fill=color)
    elif shape == "triangle":
        draw.polygon([(size // 2, left), (right, right), (left, right)], fill=color)
    return image


# --- scoring ----------------------------------------------------------------------------------------------------


def test_score_counts_colour_shape_and_both_right():
    samples = [
        ("a red circle", drawn("red", "circle")),  # right
        ("a red circle", drawn("blue", "circle")),  # wrong colour
        ("a blue square", drawn("blue", "square")),  # right
        ("a blue square", drawn("blue", "triangle")),  # wrong shape
        ("a purple triangle", drawn("purple", "triangle")),  # right
        ("a purple triangle", drawn((128, 128, 128), "triangle")),  # grey: colour "nothing", shape right
        ("a purple triangle", drawn(None, None)),  # blank: unreadable, both wrong
        ("a brown square", drawn("brown", "square")),  # right: brown joins the palette for this prompt
    ]
    result = score(samples)
    assert (result["color"], result["shape"], result["both"], result["count"]) == (5 / 8, 6 / 8, 4 / 8, 8)
    assert result["prompts"] == [
        {"prompt": "a red circle", "color": 1 / 2, "shape": 1.0, "both": 1 / 2, "count": 2},
        {"prompt": "a blue square", "color": 1.0, "shape": 1 / 2, "both": 1 / 2, "count": 2},
        {"prompt": "a purple triangle", "color": 1 / 3, "shape": 2 / 3, "both": 1 / 3, "count": 3},
        {"prompt": "a brown square", "color": 1.0, "shape": 1.0, "both": 1.0, "count": 1},
    ]
    assert judge(samples[-1][1]).color != "brown"  # the default palette alone would have got it wrong


def test_score_compares_colours_not_names_and_reads_an():
    # fuchsia is magenta's other PIL name: the judge answers "magenta" (first in the palette), which is right.
    result = score([("a fuchsia circle", drawn("magenta", "circle")), ("an orange square", drawn("orange", "square"))])
    assert (result["color"], result["shape"], result["both"]) == (1.0, 1.0, 1.0)


def test_palette_is_the_judge_colours_plus_new_prompt_colours_once():
    palette = judge_palette(["a purple circle", "a brown square", "a Brown circle", "a red triangle"])
    assert palette == (*JUDGE_COLORS, "brown")


def test_accuracy_and_table():
    result = accuracy([("a red circle", None), ("a red circle", judge(drawn("red", "circle")))])
    assert (result["color"], result["shape"], result["both"], result["count"]) == (0.5, 0.5, 0.5, 2)
    table = format_table([("base", result), ("my_lora @0.5", {**result, "color": 1.0})])
    assert table.splitlines() == [
        "model         colour   shape    both  images",
        "base           50.0%   50.0%   50.0%       2",
        "my_lora @0.5  100.0%   50.0%   50.0%       2",
    ]


# --- prompts ----------------------------------------------------------------------------------------------------


def test_parse_prompt():
    assert parse_prompt("a purple triangle") == ("purple", "triangle")
    assert parse_prompt("  A Red  Circle ") == ("red", "circle")


@pytest.mark.parametrize(
    "prompt,message",
    [
        ("a dog", "'a dog' is not of the form 'a {color} {shape}'"),
        ("red circle", "'red circle' is not of the form"),
        ("the red circle", "'the red circle' is not of the form"),
        ("a big red circle", "'a big red circle' is not of the form"),
        ("a notacolour circle", "'notacolour' is not a PIL colour name"),
        ("a red hexagon", "'hexagon' is not a shape the judge knows"),
    ],
)
def test_a_prompt_that_does_not_parse_is_a_one_line_error_naming_it(prompt, message):
    with pytest.raises(SdtuneError) as error:
        parse_prompt(prompt)
    assert message in str(error.value) and f"'{prompt}'" in str(error.value) and "\n" not in str(error.value)


def test_shape_prompts_are_colours_times_shapes():
    assert shape_prompts(["purple", "red"], ["circle", "square"]) == [
        "a purple circle", "a purple square", "a red circle", "a red square"
    ]  # fmt: skip
    with pytest.raises(SdtuneError, match="--judge-colors: 'nope'"):
        shape_prompts(["red", "nope"])
    with pytest.raises(SdtuneError, match="--judge-shapes: 'hexagon'"):
        shape_prompts(["red"], ["hexagon"])


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--judge", "shapes", "--prompt", "a red circle", "--prompt", "a dog"], "prompt 'a dog' is not of the form"),
        (["--judge", "shapes", "--judge-colors", "red,notacolour"], "--judge-colors: 'notacolour' is not a PIL colour"),
        (["--judge", "shapes", "--judge-shapes", ""], "--judge-colors and --judge-shapes must each name"),
        (["--judge", "shapes", "--prompt", "a red circle", "--judge-colors", "red"], "not both"),
        (["--judge-colors", "red", "--adapter", "x"], "--judge-colors and --judge-shapes need --judge shapes"),
        (["--prompt", "a red circle"], "no --adapter to compare with the base model"),
    ],
)
def test_cli_rejects_bad_judge_input_in_one_line_before_loading(flags, message, tmp_path, capsys):
    # --model is an empty folder: each error must come before the model is loaded (which would fail on it).
    (tmp_path / "empty_model").mkdir()
    assert main(["evaluate", "--model", str(tmp_path / "empty_model"), *flags, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


# --- `sdtune evaluate --judge shapes` ----------------------------------------------------------------------------

COMMON = ["--seed", "0", "--steps", "2", "--width", "32", "--height", "32"]


def test_evaluate_judges_base_and_adapter_on_generated_prompts(tiny_model_dir, tmp_path, capsys):
    adapter = trained_adapter(tiny_model_dir, tmp_path / "my_lora", lora=LoraSettings(rank=4, alpha=4.0))
    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--judge", "shapes",
            "--judge-colors", "purple,red", "--judge-shapes", "circle", *COMMON, "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    stdout = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert [p["prompt"] for p in metrics["prompts"]] == ["a purple circle", "a red circle"]
    assert metrics["settings"]["judge"] == "shapes" and metrics["judge"]["palette"] == list(JUDGE_COLORS)
    assert [block["name"] for block in metrics["judge"]["models"]] == ["base", "my_lora"]

    for model, block in zip(metrics["models"], metrics["judge"]["models"], strict=True):
        assert block["count"] == 2
        assert [(p["prompt"], p["count"]) for p in block["prompts"]] == [("a purple circle", 1), ("a red circle", 1)]
        # The random model draws noise; whatever it drew, the saved images judged again give the same numbers.
        marks = {}
        for entry in model["images"]:
            answer = judge(Image.open(out / entry["file"]), JUDGE_COLORS)
            assert entry["judged"] == (answer.caption if answer else None)
            color, shape = entry["prompt"].split()[1:]
            marks[entry["prompt"]] = (answer is not None and answer.color == color, answer is not None and answer.shape == shape)  # fmt: skip
        for key, index in (("color", 0), ("shape", 1)):
            assert block[key] == sum(m[index] for m in marks.values()) / 2
            assert [p[key] for p in block["prompts"]] == [float(marks[p][index]) for p in ("a purple circle", "a red circle")]
        assert block["both"] == sum(c and s for c, s in marks.values()) / 2
        assert all(0.0 <= block[k] <= 1.0 for k in ("color", "shape", "both"))

    assert "model    colour   shape    both  images" in stdout and "\nmy_lora " in stdout
    report = (out / "report.html").read_text()
    assert "shapes judge" in report and "<td>a purple circle</td>" in report and "<th>my_lora</th>" in report


def _draw_instead(monkeypatch, recolor: dict[str, str]):
    """Make `evaluate` sample by drawing each prompt's shape (its colour passed through `recolor`)."""

    def iter_images(pipe, prompts, seeds, width=None, height=None, **_):
        for index, prompt in enumerate(prompts):
            color, shape = parse_prompt(prompt)
            for seed in seeds:
                yield index, seed, drawn(recolor.get(color, color), shape, size=width)

    monkeypatch.setattr(sdtune.inference.sampling, "iter_images", iter_images)


@pytest.mark.parametrize(
    "recolor,expected",
    [({}, (1.0, 1.0, 1.0)), ({"red": "blue", "blue": "red", "purple": "green"}, (0.0, 1.0, 0.0))],
    ids=["drawn-right", "colours-swapped"],
)
def test_evaluate_scores_drawn_images_exactly(recolor, expected, tiny_model_dir, tmp_path, monkeypatch, capsys):
    _draw_instead(monkeypatch, recolor)
    out = tmp_path / "eval"
    prompts = ["--prompt", "a red circle", "--prompt", "a blue square", "--prompt", "a purple triangle"]
    assert main(["evaluate", "--model", str(tiny_model_dir), "--judge", "shapes", *prompts, *COMMON, "--seed", "1",
                 "--out", str(out)]) == 0  # fmt: skip
    (block,) = json.loads((out / "metrics.json").read_text())["judge"]["models"]
    assert (block["color"], block["shape"], block["both"], block["count"]) == (*expected, 6)
    assert all((p["color"], p["shape"], p["both"], p["count"]) == (*expected, 2) for p in block["prompts"])
    percent = [f"{100 * share:.1f}%" for share in expected]
    assert f"base   {percent[0]:>6}  {percent[1]:>6}  {percent[2]:>6}       6" in capsys.readouterr().out

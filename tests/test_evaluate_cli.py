"""`sdtune evaluate`: base and adapters on the same seeds, CLIP score, validation loss, grid and report."""

import json

import pytest
from PIL import Image
from tiny_clip import build_tiny_clip
from training import trained_adapter

from sdtune.adapters.lora import LoraSettings
from sdtune.cli import main
from sdtune.inference.metrics import clip_scores, load_clip


@pytest.fixture(scope="module")
def evaluation(tiny_model_dir, shapes_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    adapter = trained_adapter(tiny_model_dir, root / "my_lora", lora=LoraSettings(rank=4, alpha=4.0))
    clip = build_tiny_clip(root / "clip")
    out = root / "out"
    args = ["evaluate", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--adapter", f"{adapter}:0",
            "--prompt", "a red circle", "--prompt", "a blue square", "--seed", "0", "--seed", "1", "--steps", "3",
            "--width", "32", "--height", "32", "--clip-model", str(clip), "--data", str(shapes_dir), "--out", str(out)]
    code = main(args)
    return code, out, clip, args


def test_evaluate_compares_base_and_adapters_on_the_same_seeds(evaluation):
    code, out, clip, _ = evaluation
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    base, adapter, zero = metrics["models"]
    assert [m["name"] for m in metrics["models"]] == ["base", "my_lora", "my_lora @0"]
    assert metrics["prompts"][0] == {"prompt": "a red circle", "negative_prompt": None}
    assert adapter["val_loss"] != pytest.approx(base["val_loss"], rel=1e-4)  # the adapter changes the loss
    assert zero["val_loss"] == base["val_loss"]  # scale 0 is the base model, and adapters do not leak between runs
    for b, z in zip(base["images"], zero["images"]):
        assert Image.open(out / b["file"]).tobytes() == Image.open(out / z["file"]).tobytes()
    assert any(Image.open(out / b["file"]).tobytes() != Image.open(out / a["file"]).tobytes()
               for b, a in zip(base["images"], adapter["images"]))  # fmt: skip

    model, processor = load_clip(str(clip))
    images = [Image.open(out / image["file"]) for image in base["images"]]
    expected = clip_scores(model, processor, images, [image["prompt"] for image in base["images"]])
    assert base["clip_score"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_evaluate_writes_a_labelled_grid_and_a_report(evaluation):
    code, out, _, _ = evaluation
    grid = Image.open(out / "grid.png")
    assert grid.height > 6 * 32 and grid.width > 2 * 32  # 2 prompts × 3 models rows, 2 seed columns
    report = (out / "report.html").read_text()
    assert "<td>my_lora @0</td>" in report and "clip score" in report and "val loss" in report
    assert "grid.png" in report


def test_evaluate_refuses_to_overwrite_and_needs_an_adapter(evaluation, tiny_model_dir, capsys):
    _, out, _, args = evaluation
    before = (out / "metrics.json").read_bytes()
    assert main(args) == 2
    assert "already holds an evaluation" in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == before
    assert main(["evaluate", "--model", str(tiny_model_dir), "--prompt", "x", "--out", str(out / "x")]) == 2
    assert "no --adapter" in capsys.readouterr().err


def test_evaluate_scores_the_loss_with_the_runs_prediction_type(tiny_model_dir, shapes_dir, evaluation, tmp_path):
    _, out, _, _ = evaluation
    adapter = out.parent / "my_lora"
    common = ["evaluate", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--prompt", "a red circle",
              "--steps", "1", "--width", "32", "--height", "32", "--data", str(shapes_dir)]
    assert main([*common, "--out", str(tmp_path / "eps")]) == 0
    assert main([*common, "--prediction-type", "v_prediction", "--out", str(tmp_path / "v")]) == 0
    eps = json.loads((tmp_path / "eps" / "metrics.json").read_text())
    v = json.loads((tmp_path / "v" / "metrics.json").read_text())
    assert (eps["settings"]["prediction_type"], v["settings"]["prediction_type"]) == ("epsilon", "v_prediction")
    assert eps["models"][0]["val_loss"] != pytest.approx(v["models"][0]["val_loss"], rel=1e-3)

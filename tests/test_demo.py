"""The README's demo, shortened: a LoRA teaches the shipped toy base a new colour, and the shapes judge measures it.

The thresholds are loose for noise (8 images per new-colour prompt group, a shorter run) and tight enough that a
LoRA that does not train, a loss with the wrong target or a sampler that ignores the prompt fails them."""

import json

from sdtune.cli import main
from sdtune.commands.demo import split_scores


def test_demo_teaches_the_toy_base_orange_and_keeps_the_known_colours(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "200", "--seeds", "3"]) == 0
    scores = split_scores(json.loads((out / "eval" / "metrics.json").read_text()))
    printed = capsys.readouterr().out
    assert "orange (new)" in printed and str(out / "eval" / "grid.png") in printed
    assert scores["base"]["known"] >= 0.8, scores  # the base draws what its prompts ask for
    assert scores["base"]["new"] <= 0.2, scores  # and has never seen orange
    assert scores["lora"]["new"] >= 0.6, scores  # the LoRA learned it
    assert scores["lora"]["known"] >= 0.75, scores  # without losing the rest
    assert (out / "run" / "adapter" / "pytorch_lora_weights.safetensors").is_file()


def test_flow_demo_teaches_the_flow_toy_orange(tmp_path, capsys):
    # The same on sdtune:toy-flow (an SD3) with the toy/flow_lora recipe. Full length it measured orange 0 % → 88 %,
    # known colours 97 % → 95 %; this shortened run 0 % → 78 %, known 97 % → 97 %.
    out = tmp_path / "demo"
    assert main(["demo", "--flow", "--out", str(out), "--steps", "200", "--seeds", "3"]) == 0
    scores = split_scores(json.loads((out / "eval" / "metrics.json").read_text()))
    assert "toy/flow_lora" in capsys.readouterr().out
    assert scores["base"]["known"] >= 0.8, scores
    assert scores["base"]["new"] <= 0.2, scores
    assert scores["lora"]["new"] >= 0.6, scores
    assert scores["lora"]["known"] >= 0.75, scores

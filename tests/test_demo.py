"""The README's demo command: tiny model, generated data, real `sdtune fit`, adapter loaded in diffusers, PNGs."""

import re

from PIL import Image

from sdtune.cli import main


def test_demo_trains_and_writes_samples(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "20"]) == 0
    assert (out / "run" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    base, tuned = sorted((out / "samples").glob("base_*.png")), sorted((out / "samples").glob("lora_*.png"))
    assert len(base) == len(tuned) == 3
    assert Image.open(tuned[0]).size == (64, 64)
    difference = float(re.search(r"mean \|Δpixel\| = ([0-9.]+)", capsys.readouterr().out).group(1))
    assert difference > 0.01  # the trained adapter changes what the pipeline draws

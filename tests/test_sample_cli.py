"""`sdtune sample` as a user types it: files and samples.json, prompt files, adapters with scales, image-to-image,
inpainting, no silent overwrite, and one-line errors for every bad input."""

import json

import numpy as np
import pytest
from PIL import Image
from training import trained_adapter

from sdtune.adapters.lora import LoraSettings
from sdtune.cli import main

FAST = ["--steps", "2", "--width", "32", "--height", "32"]


def run(capsys, *args):
    code = main(["sample", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("sdtune: error:")]


def test_sample_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "sdtune sample --model " in out and "--init-image" in out and "--mask" in out
    assert main([]) == 0 and "  sample " in capsys.readouterr().out


def test_writes_one_png_per_prompt_and_seed_and_samples_json(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes\na red circle\n\n  a blue square!  \n# the end\n")
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "--model", tiny_model_dir, "--prompts-file", prompts, "--seed", 0, "--seed", 7,
                          "--negative-prompt", "blurry", "--scheduler", "euler_a", "--clip-skip", 2, *FAST, "--out", out)  # fmt: skip
    assert code == 0 and "wrote 4 text-to-image images" in stdout
    names = ["0000_a-red-circle_s0.png", "0001_a-red-circle_s7.png", "0002_a-blue-square_s0.png", "0003_a-blue-square_s7.png"]
    assert sorted(p.name for p in out.iterdir()) == [*names, "samples.json"]
    assert all(Image.open(out / name).size == (32, 32) for name in names)
    record = json.loads((out / "samples.json").read_text())
    assert record["mode"] == "text-to-image" and record["model"]["pretrained"] == str(tiny_model_dir)
    assert record["adapters"] == []
    settings = record["settings"]
    assert (settings["steps"], settings["scheduler"], settings["scheduler_class"]) == (2, "euler_a", "EulerAncestralDiscreteScheduler")
    assert (settings["width"], settings["height"], settings["clip_skip"], settings["guidance"]) == (32, 32, 2, 7.5)
    assert [(i["file"], i["prompt"], i["seed"], i["negative_prompt"]) for i in record["images"]] == [
        (names[0], "a red circle", 0, "blurry"), (names[1], "a red circle", 7, "blurry"),
        (names[2], "a blue square!", 0, "blurry"), (names[3], "a blue square!", 7, "blurry"),
    ]  # fmt: skip
    assert not np.array_equal(np.asarray(Image.open(out / names[0])), np.asarray(Image.open(out / names[1])))


def test_refuses_to_overwrite_unless_told_and_same_seed_gives_the_same_bytes(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", tiny_model_dir, "--prompt", "a red circle", *FAST, "--out", out]
    assert run(capsys, *args)[0] == 0
    png = out / "0000_a-red-circle_s0.png"
    first = png.read_bytes()
    png.write_bytes(b"mine")
    code, _, err = run(capsys, *args)
    assert code == 2 and len(error_lines(err)) == 1 and "already exist" in err and "--overwrite" in err
    assert png.read_bytes() == b"mine"
    assert run(capsys, *args, "--overwrite")[0] == 0
    assert png.read_bytes() == first  # seed 0 again: the same image, byte for byte


def test_default_size_is_the_unets_native_size(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "--model", tiny_model_dir, "--prompt", "x", "--steps", "2", "--out", out)[0] == 0
    assert Image.open(out / "0000_x_s0.png").size == (64, 64)  # sample_size 32 × VAE factor 2
    assert json.loads((out / "samples.json").read_text())["settings"]["width"] == 64


def test_jsonl_prompts_carry_their_own_negative_prompt(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle", "negative_prompt": "green"}\n\n{"prompt": "a blue square"}\n')
    out = tmp_path / "out"
    assert run(capsys, "--model", tiny_model_dir, "--prompts-file", prompts, "--negative-prompt", "blurry", *FAST, "--out", out)[0] == 0
    images = json.loads((out / "samples.json").read_text())["images"]
    assert [(i["prompt"], i["negative_prompt"]) for i in images] == [("a red circle", "green"), ("a blue square", "blurry")]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    return trained_adapter(tiny_model_dir, out, lora=LoraSettings(rank=4, alpha=4.0))


def test_adapters_with_scales(tiny_model_dir, adapter_dir, tmp_path, capsys):
    def image(name, *adapter_args):
        out = tmp_path / name
        assert run(capsys, "--model", tiny_model_dir, "--prompt", "a red circle", *adapter_args, *FAST, "--out", out)[0] == 0
        return (out / "0000_a-red-circle_s0.png").read_bytes(), json.loads((out / "samples.json").read_text())

    base, _ = image("base")
    off, _ = image("off", "--adapter", f"{adapter_dir}:0")
    on, record = image("on", "--adapter", adapter_dir / "pytorch_lora_weights.safetensors")
    assert off == base  # scale 0: exactly the base image
    assert on != base
    assert record["adapters"] == [{"name": "a0", "path": str(adapter_dir / "pytorch_lora_weights.safetensors"),
                                   "file": str(adapter_dir / "pytorch_lora_weights.safetensors"), "scale": 1.0}]  # fmt: skip
    _, record = image("mixed", "--adapter", f"{adapter_dir}:0.5", "--adapter", f"{adapter_dir}:-0.25")
    assert [(a["name"], a["scale"]) for a in record["adapters"]] == [("a0", 0.5), ("a1", -0.25)]


def test_image_to_image_and_inpainting(tiny_model_dir, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.new("RGB", (48, 40), (200, 40, 40)).save(init)
    mask = tmp_path / "mask.png"
    mask_image = Image.new("L", (48, 40), 0)
    mask_image.paste(255, (0, 0, 24, 40))
    mask_image.save(mask)
    common = ["--model", tiny_model_dir, "--prompt", "a red circle", "--init-image", init, *FAST]
    assert run(capsys, *common, "--strength", 0.5, "--out", tmp_path / "i2i")[0] == 0
    assert run(capsys, *common, "--mask", mask, "--out", tmp_path / "inpaint")[0] == 0
    i2i = json.loads((tmp_path / "i2i" / "samples.json").read_text())
    inpaint = json.loads((tmp_path / "inpaint" / "samples.json").read_text())
    assert (i2i["mode"], i2i["settings"]["strength"]) == ("image-to-image", 0.5)
    assert (inpaint["mode"], inpaint["settings"]["strength"], inpaint["settings"]["mask"]) == ("inpainting", 1.0, str(mask))
    out = np.asarray(Image.open(tmp_path / "inpaint" / "0000_a-red-circle_s0.png"), dtype=np.float32)
    assert out.shape == (32, 32, 3)
    assert np.abs(out[:, 20:] - [200, 40, 40]).max() <= 1  # the unmasked right side is the init image


BAD = {
    "missing model": (["--model", "{tmp}/no/model"], "does not exist"),
    "missing adapter": (["--adapter", "{tmp}/no/adapter"], "does not exist"),
    "adapter folder without weights": (["--adapter", "{tmp}"], "pytorch_lora_weights.safetensors"),
    "bad scale": (["--adapter", "{tmp}/adapter:strong"], "is not a scale"),
    "missing init image": (["--init-image", "{tmp}/none.png"], "--init-image"),
    "unreadable init image": (["--init-image", "{tmp}/notes.txt"], "not a readable image"),
    "missing mask": (["--init-image", "{tmp}/init.png", "--mask", "{tmp}/none.png"], "--mask"),
    "mask without init image": (["--mask", "{tmp}/init.png"], "--mask needs --init-image"),
    "strength zero": (["--init-image", "{tmp}/init.png", "--strength", "0"], "(0, 1]"),
    "strength above one": (["--init-image", "{tmp}/init.png", "--strength", "1.5"], "(0, 1]"),
    "strength runs no step": (["--init-image", "{tmp}/init.png", "--strength", "0.1", "--steps", "5"], "--steps 10"),
    "strength without init image": (["--strength", "0.5"], "--strength needs --init-image"),
    "unknown scheduler": (["--scheduler", "karras"], "invalid choice"),
    "width not a multiple": (["--width", "36"], "--width 36 is not a multiple of 8"),
    "clip skip too deep": (["--clip-skip", "9"], "--clip-skip"),
    "bad prompts file type": (["--prompts-file", "{tmp}/prompts.csv", "--no-prompt"], ".txt or .jsonl"),
    "bad jsonl": (["--prompts-file", "{tmp}/bad.jsonl", "--no-prompt"], "line 2"),
    "no prompt": (["--no-prompt"], "no prompt"),
    "not a number": (["--steps", "many"], "invalid int value"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_exit_2(case, tiny_model_dir, tmp_path, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "init.png")
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / "prompts.csv").write_text("prompt\na red circle\n")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    extra, expected = BAD[case]
    extra = [arg.format(tmp=tmp_path) for arg in extra]
    args = ["--model", str(tiny_model_dir), "--steps", "2", "--width", "32", "--height", "32", "--out", str(tmp_path / "out")]
    if "--no-prompt" in extra:
        extra.remove("--no-prompt")
    else:
        args += ["--prompt", "a red circle"]
    code, _, err = run(capsys, *args, *extra)  # later flags win: the case's --model/--steps/--width replace the defaults
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert expected in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

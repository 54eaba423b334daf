"""Conv-LoRA (LoCon), DoRA and text-encoder adapters through every export format: each round-trips (checked on
write) or is refused with a clear message; kohya files are read back by `sdtune sample` as adapters."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from training import trained_adapter

from sdtune.adapters.lora import LoraSettings, TextEncoderLora
from sdtune.cli import main

VARIANTS = {
    "conv": dict(lora=LoraSettings(rank=4, alpha=2.0, conv_rank=2, conv_alpha=6.0)),
    "dora": dict(lora=LoraSettings(rank=4, alpha=8.0, use_dora=True)),
    "text_encoder": dict(lora=LoraSettings(rank=2, alpha=2.0), text_encoder_lora=TextEncoderLora(rank=2, alpha=4.0)),
}
# (variant, format) pairs a format cannot hold, and the message saying so.
REFUSED = {("dora", "kohya"): "cannot hold a DoRA adapter"}


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return {name: trained_adapter(tiny_model_dir, root / name, std=0.05, **settings) for name, settings in VARIANTS.items()}


@pytest.mark.parametrize("kind", ["diffusers", "peft", "kohya", "merge"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_round_trips_or_is_refused(variant, kind, adapters, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / ("lora.safetensors" if kind == "kohya" else "out")
    how = ["--merge"] if kind == "merge" else ["--format", kind]
    code = main(["export", str(adapters[variant]), "--model", str(tiny_model_dir), *how, "--out", str(out)])
    err = capsys.readouterr().err
    if (variant, kind) in REFUSED:
        assert code == 2 and REFUSED[variant, kind] in err and not out.exists()
        return
    assert code == 0, err
    assert out.exists() and not list(tmp_path.glob("*.invalid"))
    if kind == "kohya" and variant == "conv":  # 3×3 down, 1×1 up, as kohya's LoCon
        tensors = load_file(out)
        conv = "lora_unet_down_blocks_0_resnets_0_conv1"
        assert tensors[f"{conv}.lora_down.weight"].shape[1:] == (32, 3, 3)
        assert tensors[f"{conv}.lora_up.weight"].shape[2:] == (1, 1) and tensors[f"{conv}.alpha"].item() == 6.0
    if kind == "kohya" and variant == "text_encoder":
        assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in load_file(out))


@pytest.mark.parametrize("variant", ["conv", "text_encoder"])
def test_sample_reads_a_kohya_file_like_the_adapter_it_came_from(variant, adapters, tiny_model_dir, tmp_path):
    kohya = tmp_path / "lora.safetensors"
    assert main(["export", str(adapters[variant]), "--model", str(tiny_model_dir), "--format", "kohya", "--out", str(kohya)]) == 0
    images = {}
    for name, adapter in (("diffusers", adapters[variant]), ("kohya", kohya), ("base", None)):
        extra = ["--adapter", str(adapter)] if adapter else []
        out = tmp_path / name
        assert main(["sample", "--model", str(tiny_model_dir), *extra, "--prompt", "a red circle", "--seed", "0",
                     "--steps", "3", "--out", str(out)]) == 0  # fmt: skip
        images[name] = np.asarray(Image.open(next(out.glob("**/*.png"))), dtype=np.float32)
    assert np.abs(images["kohya"] - images["diffusers"]).mean() <= 1.0
    assert np.abs(images["diffusers"] - images["base"]).mean() > 2.0  # the adapter matters


def test_text_encoder_layers_are_named_as_every_reader_expects(adapters):
    keys = [k for k in load_file(adapters["text_encoder"] / "pytorch_lora_weights.safetensors") if k.startswith("text_encoder.")]
    assert keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in keys)


def test_a_v_prediction_run_carries_its_prediction_type_into_merged_and_kohya(adapters, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    for file in adapters["conv"].iterdir():
        (run / "adapter" / file.name).write_bytes(file.read_bytes())
    config = {"model": {"init_args": {"pretrained": str(tiny_model_dir), "objective": {"prediction_type": "v_prediction"}}}}
    (run / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    assert main(["export", str(run), "--merge", "--out", str(tmp_path / "merged")]) == 0
    scheduler = json.loads((tmp_path / "merged" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert main(["export", str(run), "--format", "kohya", "--out", str(tmp_path / "v.safetensors")]) == 0
    meta = safe_open(str(tmp_path / "v.safetensors"), "pt").metadata()
    assert meta["ss_v_parameterization"] == "True" and meta["modelspec.prediction_type"] == "v"


def test_a_text_encoder_dora_file_is_refused_by_the_loaders(adapters, tmp_path, tiny_model_dir, capsys):
    """diffusers drops text-encoder DoRA magnitudes when loading; such a file (from another tool) is refused
    instead of giving silently wrong images."""
    tensors = load_file(adapters["text_encoder"] / "pytorch_lora_weights.safetensors")
    layer = next(k for k in tensors if k.startswith("text_encoder.") and k.endswith("q_proj.lora_A.weight"))
    tensors[layer.replace("lora_A.weight", "lora_magnitude_vector")] = torch.ones(32)
    save_file(tensors, str(tmp_path / "te_dora.safetensors"))
    assert main(["sample", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "te_dora.safetensors"),
                 "--prompt", "x", "--out", str(tmp_path / "s")]) == 2  # fmt: skip
    assert "text-encoder DoRA" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_training_starts_from_an_exported_kohya_file(adapters, tiny_model_dir, tmp_path):
    from sdtune.adapters.lora import lora_state_dict
    from sdtune.finetune import LoRAFineTune

    kohya = tmp_path / "lora.safetensors"
    assert main(["export", str(adapters["text_encoder"]), "--model", str(tiny_model_dir), "--format", "kohya", "--out", str(kohya)]) == 0
    source = LoRAFineTune(str(tiny_model_dir), init_adapter=str(adapters["text_encoder"]), **VARIANTS["text_encoder"])
    resumed = LoRAFineTune(str(tiny_model_dir), init_adapter=str(kohya), **VARIANTS["text_encoder"])
    for part in ("unet", "text_encoder"):
        expected, got = lora_state_dict(getattr(source, part)), lora_state_dict(getattr(resumed, part))
        assert expected.keys() == got.keys() and any(v.abs().max() > 0 for k, v in got.items() if "lora_B" in k)
        assert all(torch.equal(expected[k], got[k]) for k in expected)


class Transformers4Layout(torch.nn.Module):
    """A CLIPTextModel as transformers 4 nests it (`text_model.encoder.layers.0…`; transformers 5 flattened it),
    built from the installed one's modules: what a transformers-4 user loads the peft export into."""

    def __init__(self, clip) -> None:
        super().__init__()
        self.text_model = clip

    def forward(self, input_ids):
        return self.text_model(input_ids)


def test_peft_text_encoder_loads_into_the_transformers_4_and_5_layouts(adapters, tiny_model_dir, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline
    from peft import PeftModel
    from transformers import CLIPTextModel

    out = tmp_path / "peft"
    assert main(["export", str(adapters["text_encoder"]), "--model", str(tiny_model_dir), "--format", "peft", "--out", str(out)]) == 0
    assert "transformers 4 (≥ 4.45) or 5" in capsys.readouterr().out  # the versions that read it, printed
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    ids = pipe.tokenizer(["a red circle"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        base = pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(str(adapters["text_encoder"]))
        expected = pipe.text_encoder(ids)[0]
    assert (expected - base).abs().max() > 1e-3  # the adapter changes the text encoder
    for layout in (lambda clip: clip, Transformers4Layout):
        model = PeftModel.from_pretrained(layout(CLIPTextModel.from_pretrained(str(tiny_model_dir / "text_encoder"))), str(out / "text_encoder"))
        b = [p for name, p in model.named_parameters() if "lora_B" in name]
        assert len(b) == sum(".lora_B." in k for k in load_file(adapters["text_encoder"] / "pytorch_lora_weights.safetensors") if k.startswith("text_encoder."))
        assert all(p.abs().max() > 0 for p in b)
        with torch.no_grad():
            torch.testing.assert_close(model(ids)[0], expected, rtol=1e-5, atol=1e-6)

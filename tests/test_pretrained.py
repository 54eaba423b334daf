import json
import subprocess
import sys

import pytest

from sdtune.errors import SdtuneError
from sdtune.models import load_model, load_tokenizer


def test_tiny_model_loads_through_the_real_loader(tiny_model_dir):
    parts = load_model(str(tiny_model_dir))
    # Read from configs, never assumed: the tiny model differs from SD1.x on each of these.
    assert parts.vae_scale_factor == 2
    assert parts.text_encoder.config.hidden_size == parts.unet.config.cross_attention_dim == 32
    assert parts.tokenizer.model_max_length == 77
    assert parts.noise_scheduler.config.prediction_type == "epsilon"
    ids = parts.tokenizer("a red circle").input_ids
    assert len(ids) == 5  # whole-word tokens: bos, a, red, circle, eos


def test_hub_id_offline_without_cache_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(SdtuneError) as err:
        load_tokenizer("stable-diffusion-v1-5/stable-diffusion-v1-5")
    message = str(err.value)
    assert "\n" not in message
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in message and "HF_HUB_OFFLINE" in message


def test_missing_local_directory_and_incomplete_directory(tmp_path):
    with pytest.raises(SdtuneError, match="does not exist"):
        load_model(str(tmp_path / "nope" / "model"))
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(SdtuneError, match="missing vae/, text_encoder/, tokenizer/, scheduler/"):
        load_model(str(tmp_path / "half"))


def test_tiny_model_is_a_complete_diffusers_pipeline(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    assert pipe.unet.config.cross_attention_dim == 32


def test_cli_hub_id_offline_exits_with_one_line(tmp_path, shapes_dir):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "sdtune.cli", "fit", "--config", "tiny/lora", "--model.pretrained", "org/missing-model",
         "--data.root", str(shapes_dir), "--trainer.default_root_dir", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("sdtune: error:")]
    assert len(errors) == 1 and "org/missing-model" in errors[0]

"""Base models from single-file checkpoints in the original LDM layout (.safetensors / .ckpt, as AUTOMATIC1111 users
have them), with a diffusers directory giving configs, tokenizer and scheduler: the same model as the directory,
through `fit` and `sample`, and one-line errors for every bad file or missing config."""

import argparse
import json

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from test_cli import sdtune
from training import trained_adapter, write_single_file

from sdtune.adapters.lora import LoraSettings
from sdtune.cli import main
from sdtune.errors import SdtuneError
from sdtune.models.pretrained import load_model, load_tokenizer

FAST = ["--steps", "2", "--width", "32", "--height", "32"]


@pytest.fixture(scope="module")
def ldm_files(tiny_model_dir, tmp_path_factory):
    """The tiny model as one LDM-layout .safetensors and one .ckpt (a {"state_dict": ...} pickle, as CompVis and
    A1111 wrote them)."""
    folder = tmp_path_factory.mktemp("single-file")
    return {suffix: write_single_file(tiny_model_dir, folder / f"tiny{suffix}") for suffix in (".safetensors", ".ckpt")}


@pytest.fixture(scope="module")
def from_directory(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def outputs(parts) -> dict[str, torch.Tensor]:
    """What each part computes on fixed inputs: UNet noise prediction, VAE latents and reconstruction, text states."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    pixels = torch.rand(1, 3, 16, 16, generator=generator) * 2 - 1
    ids = parts.tokenizer(["a red circle"], padding="max_length", max_length=parts.tokenizer.model_max_length,
                          return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        text = parts.text_encoder(ids).last_hidden_state
        return {
            "text": text,
            "unet": parts.unet(latents, torch.tensor([500]), text).sample,
            "latents": parts.vae.encode(pixels).latent_dist.mean,
            "decoded": parts.vae.decode(latents).sample,
        }


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_parts_from_the_file_compute_what_the_directory_does(suffix, ldm_files, tiny_model_dir, from_directory):
    parts = load_model(str(ldm_files[suffix]), pretrained_config=str(tiny_model_dir))
    expected, got = outputs(from_directory), outputs(parts)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)
    assert parts.noise_scheduler.config == from_directory.noise_scheduler.config
    assert parts.tokenizer("a red circle").input_ids == from_directory.tokenizer("a red circle").input_ids


def test_parts_load_in_their_own_dtypes(ldm_files, tiny_model_dir):
    parts = load_model(str(ldm_files[".safetensors"]), pretrained_config=str(tiny_model_dir),
                                  dtype=torch.bfloat16, denoiser_dtype=torch.float32)  # fmt: skip
    assert (parts.vae.dtype, parts.text_encoder.dtype, parts.unet.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)


def test_fit_trains_a_lora_on_a_single_file_and_export_uses_it(ldm_files, tiny_model_dir, shapes_dir, tmp_path):
    run = tmp_path / "run"
    sdtune("fit", "--config", "tiny/lora", "--model.pretrained", ldm_files[".safetensors"],
           "--model.pretrained_config", tiny_model_dir, "--data.root", shapes_dir, "--data.resolution", 32,
           "--data.batch_size", 2, "--trainer.max_steps", 2, "--samples.enabled", "false",
           "--trainer.default_root_dir", run)  # fmt: skip
    assert (run / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]
    assert (saved["pretrained"], saved["pretrained_config"]) == (str(ldm_files[".safetensors"]), str(tiny_model_dir))
    # The run's base model (file + config) is what export loads, for the adapter and for its check.
    for source in (run, run / "checkpoints" / "last.ckpt"):
        out = tmp_path / f"{source.name}.safetensors"
        assert main(["export", str(source), "--format", "kohya", "--out", str(out)]) == 0 and out.is_file()
    merged = tmp_path / "merged"
    assert main(["export", str(run / "adapter"), "--model", str(ldm_files[".safetensors"]), "--model-config",
                 str(tiny_model_dir), "--merge", "--out", str(merged)]) == 0  # fmt: skip
    assert (merged / "unet" / "config.json").is_file()


def test_sample_from_the_file_draws_the_directorys_images(ldm_files, tiny_model_dir, tmp_path, capsys):
    args = ["--prompt", "a red circle", "--seed", "3", *FAST]
    assert main(["sample", "--model", str(tiny_model_dir), *args, "--out", str(tmp_path / "dir")]) == 0
    assert main(["sample", "--model", str(ldm_files[".safetensors"]), "--model-config", str(tiny_model_dir), *args,
                 "--out", str(tmp_path / "file")]) == 0  # fmt: skip
    name = "0000_a-red-circle_s3.png"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "file" / name)), np.asarray(Image.open(tmp_path / "dir" / name)))
    record = json.loads((tmp_path / "file" / "samples.json").read_text())["model"]
    assert (record["pretrained"], record["pretrained_config"]) == (str(ldm_files[".safetensors"]), str(tiny_model_dir))


def test_evaluate_records_the_config(ldm_files, tiny_model_dir, tmp_path, capsys):
    adapter = trained_adapter(tiny_model_dir, tmp_path / "adapter", lora=LoraSettings(rank=2))
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(ldm_files[".ckpt"]), "--model-config", str(tiny_model_dir), "--adapter",
                 str(adapter), "--prompt", "a red circle", *FAST, "--out", str(out)]) == 0  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["pretrained_config"] == str(tiny_model_dir)


@pytest.fixture(scope="module")
def sdxl_file(tiny_sdxl_dir, tmp_path_factory):
    return write_single_file(tiny_sdxl_dir, tmp_path_factory.mktemp("sdxl-file") / "tiny-sdxl.safetensors")


def test_an_sdxl_file_loads_the_weights_of_its_folder(sdxl_file, tiny_sdxl_dir):
    parts = load_model(str(sdxl_file), pretrained_config=str(tiny_sdxl_dir))
    expected = load_model(str(tiny_sdxl_dir))
    assert parts.family.name == "sdxl" and type(parts.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        got, want = getattr(parts, name).state_dict(), getattr(expected, name).state_dict()
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[key], want[key]) for key in want), name


def test_sample_from_an_sdxl_file_draws_the_folders_images(sdxl_file, tiny_sdxl_dir, tmp_path):
    args = ["--prompt", "a red circle", "--seed", "3", *FAST]
    assert main(["sample", "--model", str(tiny_sdxl_dir), *args, "--out", str(tmp_path / "dir")]) == 0
    assert main(["sample", "--model", str(sdxl_file), "--model-config", str(tiny_sdxl_dir), *args,
                 "--out", str(tmp_path / "file")]) == 0  # fmt: skip
    name = "0000_a-red-circle_s3.png"
    got, expected = (np.asarray(Image.open(tmp_path / folder / name), dtype=np.float32) for folder in ("file", "dir"))
    # Same weights; the pooled projection's output differs by one float32 rounding (1e-7) between the two loaders.
    assert np.abs(got - expected).max() <= 1


@pytest.mark.parametrize("sdxl_with_sd1_configs", [True, False])
def test_a_file_with_configs_of_the_other_architecture_is_one_line(sdxl_with_sd1_configs, sdxl_file, ldm_files,
                                                                    tiny_model_dir, tiny_sdxl_dir, tmp_path, capsys):  # fmt: skip
    model, config = (sdxl_file, tiny_model_dir) if sdxl_with_sd1_configs else (ldm_files[".safetensors"], tiny_sdxl_dir)
    code = main(["sample", "--model", str(model), "--model-config", str(config), "--prompt", "x", *FAST, "--out", str(tmp_path / "out")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sdtune: error:")]
    kind, label = ("an SDXL", "SD1.x") if sdxl_with_sd1_configs else ("an SD1.x/2.x", "SDXL")
    assert code == 2 and len(errors) == 1
    assert f"is {kind} checkpoint but model.pretrained_config is {label}: pass the configs of its architecture" in errors[0]


def copy_configs(model_dir, out):
    """The json and txt files of a diffusers directory (configs and tokenizer), without weights."""
    for file in model_dir.rglob("*"):
        if file.suffix in (".json", ".txt"):
            target = out / file.relative_to(model_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
    return out


def _no_config(files, config, folder, monkeypatch):
    return files[".safetensors"], None, "model.pretrained is a single-file checkpoint: set model.pretrained_config (--model-config"


def _truncated(files, config, folder, monkeypatch):
    path = folder / "truncated.safetensors"
    data = files[".safetensors"].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, config, "could not be read (truncated or not a checkpoint?): SafetensorError"


def _not_stable_diffusion(files, config, folder, monkeypatch):
    path = folder / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(path))
    return path, config, "is not a Stable Diffusion checkpoint in the original layout: no UNet (model.diffusion_model.*)"


def _pickled_objects(files, config, folder, monkeypatch):
    path = folder / "callbacks.ckpt"
    torch.save({"state_dict": {}, "callbacks": argparse.Namespace(every_n_steps=500)}, path)  # weights_only refuses it
    return path, config, "pickles Python objects besides tensors (argparse.Namespace)"


def _config_without_subfolders(files, config, folder, monkeypatch):
    (folder / "half" / "unet").mkdir(parents=True)
    return files[".safetensors"], folder / "half", "is not a diffusers model directory: missing vae/, text_encoder/, tokenizer/, scheduler/"


def _config_of_another_architecture(files, config, folder, monkeypatch):
    other = copy_configs(config, folder / "other")
    unet_config = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps({**unet_config, "cross_attention_dim": 64}))
    return files[".safetensors"], other, "unet could not be loaded with the configs of model.pretrained_config"


def _uncached_hub_config_offline(files, config, folder, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(folder / "empty-cache"))
    hub_id = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    return files[".safetensors"], hub_id, f"model.pretrained_config '{hub_id}' could not be loaded (HF_HUB_OFFLINE is set"


@pytest.mark.parametrize("make", [_no_config, _truncated, _not_stable_diffusion, _pickled_objects,
                                  _config_without_subfolders, _config_of_another_architecture,
                                  _uncached_hub_config_offline])  # fmt: skip
def test_bad_single_files_are_one_line(make, ldm_files, tiny_model_dir, tmp_path, capsys, monkeypatch):
    model, config, expected = make(ldm_files, tiny_model_dir, tmp_path, monkeypatch)
    flags = ["--model-config", str(config)] if config else []
    code = main(["sample", "--model", str(model), *flags, "--prompt", "x", *FAST, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("sdtune: error:")]
    assert len(errors) == 1 and expected in errors[0], err
    assert not (tmp_path / "out").exists()


def test_a_hub_id_in_the_offline_cache_gives_the_configs(ldm_files, tiny_model_dir, tmp_path, monkeypatch):
    """The usual setup: the file from Civitai or A1111, the configs from the SD1.5 repo already in the HF cache
    (here a fake cache entry holding only the json/txt files, which is all a single file needs)."""
    commit = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--org--tiny-sd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    copy_configs(tiny_model_dir, repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # read at import
    parts = load_model(str(ldm_files[".safetensors"]), pretrained_config="org/tiny-sd")
    assert parts.unet.config.cross_attention_dim == 32 and parts.tokenizer.model_max_length == 77


def test_fit_without_config_is_one_line(ldm_files, shapes_dir, tmp_path, capsys):
    code = main(["fit", "--config", "tiny/lora", "--model.pretrained", str(ldm_files[".safetensors"]), "--data.root",
                 str(shapes_dir), "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("sdtune: error: model.pretrained is a single-file checkpoint: set model.pretrained_config")


def test_tokenizer_comes_from_the_config_without_reading_the_file(tiny_model_dir, tmp_path):
    fake = tmp_path / "not-read.safetensors"
    fake.write_bytes(b"never opened")
    assert load_tokenizer(str(fake), pretrained_config=str(tiny_model_dir)).model_max_length == 77
    with pytest.raises(SdtuneError, match="set model.pretrained_config"):
        load_tokenizer(str(fake))

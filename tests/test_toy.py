"""The toy world: whole-word tokens, the latent size its recipes assume, `sdtune toy build` and the shipped base."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_cli import sdtune
from transformers import CLIPTokenizer

from sdtune.data import CaptionDataModule
from sdtune.errors import SdtuneError
from sdtune.models import load_model
from sdtune.models.pretrained import load_tokenizers
from sdtune.toy.model import TOY_WORDS, build_toy_stable_diffusion
from sdtune.toy.shapes import make_shapes_dataset


def test_toy_words_are_single_tokens_and_other_text_still_tokenizes(tmp_path):
    build_toy_stable_diffusion(tmp_path / "toy")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "toy" / "tokenizer")
    for word in TOY_WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    ids = [tokenizer(f"a {color} circle").input_ids for color in ("red", "green", "purple")]
    assert len({tuple(i) for i in ids}) == 3 and all(len(i) == 5 for i in ids)  # start, a, colour, circle, end
    assert tokenizer.decode(tokenizer("a zebra-striped hexagon").input_ids, skip_special_tokens=True) == "a zebra - striped hexagon"
    assert len(tokenizer) == load_model(str(tmp_path / "toy")).text_encoder.config.vocab_size


def test_toy_model_encodes_32_pixels_to_8x8_latents(tmp_path):
    parts = load_model(str(build_toy_stable_diffusion(tmp_path / "toy")))
    with torch.no_grad():
        latents = parts.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8) and parts.unet.config.sample_size == 8
    assert parts.unet.config.cross_attention_dim == parts.text_encoder.config.hidden_size


def test_toy_build_runs_every_step_and_writes_a_float16_base(tmp_path):
    # The whole chain of `sdtune toy build` (init, prep, fit toy/vae, fit toy/base, float16 copy), shortened.
    result = sdtune("toy", "build", "--out", tmp_path / "toy", "--images", 64, "--vae-steps", 2, "--base-steps", 2, "--skip-judge")
    for step in ("toy init", "prep shapes", "fit --config toy/vae", "fit --config toy/base"):
        assert f"sdtune {step}" in result.stdout
    base = tmp_path / "toy" / "toy-base"
    assert "not judged (--skip-judge)" in (base / "README.md").read_text()
    files = load_file(base / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(t.dtype == torch.float16 for t in files.values())
    assert all(t.dtype == torch.float32 for t in load_file(base / "text_encoder" / "model.safetensors").values())
    parts = load_model(str(base))
    trained = load_model(str(tmp_path / "toy" / "base" / "model"))
    assert parts.unet.dtype == torch.float32
    for name, tensor in trained.unet.state_dict().items():
        torch.testing.assert_close(parts.unet.state_dict()[name], tensor, rtol=1e-3, atol=1e-4)
    random = load_model(str(tmp_path / "toy" / "random"))
    assert not torch.equal(trained.text_encoder.get_input_embeddings().weight, random.text_encoder.get_input_embeddings().weight)
    assert parts.vae.config.scaling_factor != random.vae.config.scaling_factor  # measured by the VAE run
    again = sdtune("toy", "build", "--out", tmp_path / "toy", check=False)
    assert again.returncode == 2 and "already holds a toy build" in again.stderr


def test_the_shipped_toy_base_is_found_by_name():
    parts = load_model("sdtune:toy")
    assert parts.unet.config.sample_size * 4 == 32 and parts.unet.dtype == torch.float32
    with pytest.raises(SdtuneError, match="'sdtune:tiny' is not a model sdtune ships"):
        load_model("sdtune:tiny")


def test_the_shipped_flow_toy_is_an_sd3_on_the_toy_vae():
    parts = load_model("sdtune:toy-flow")
    assert parts.family.name == "sd3" and parts.transformer.dtype == torch.float32
    # every tokenizer reads 8 tokens, and a prompt of the toy world fits them whole
    tokenizers = load_tokenizers("sdtune:toy-flow")
    assert [t.model_max_length for t in tokenizers] == [8, 8, 8]
    assert all(len(t("a orange triangle").input_ids) <= 8 for t in tokenizers)
    toy = load_model("sdtune:toy")
    for name, tensor in toy.vae.state_dict().items():
        assert torch.equal(parts.vae.state_dict()[name], tensor), name


def test_caption_length_defaults_to_one_window_of_the_models_tokenizer(tmp_path):
    make_shapes_dataset(tmp_path / "data", count=4, size=32, seed=0)
    for model, tokens in (("sdtune:toy-flow", 6), ("sdtune:toy", 75)):
        data = CaptionDataModule(str(tmp_path / "data"), resolution=32, batch_size=2, pretrained=model)
        data.setup("fit")
        assert data.max_token_length == tokens, model
        assert next(iter(data.train_dataloader()))["input_ids"].shape[-1] == tokens + 2, model


def test_toy_build_flow_trains_the_transformer_and_clips_on_the_toy_vae(tmp_path):
    result = sdtune("toy", "build", "--flow", "--out", tmp_path / "toy", "--images", 64, "--base-steps", 2, "--skip-judge")
    for step in ("toy init --flow", "prep shapes", "fit --config toy/flow_base"):
        assert f"sdtune {step}" in result.stdout
    assert "toy/vae" not in result.stdout
    base = tmp_path / "toy" / "toy-base"
    files = load_file(base / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(t.dtype == torch.float16 for t in files.values())
    for part in ("transformer", "vae"):  # the building machine's folders stay out of the shipped configs
        assert "_name_or_path" not in json.loads((base / part / "config.json").read_text()), part
    trained, random = load_model(str(tmp_path / "toy" / "base" / "model")), load_model(str(tmp_path / "toy" / "random"))
    assert trained.family.name == "sd3"
    for part in ("transformer", "text_encoder", "text_encoder_2"):
        before, after = getattr(random, part).state_dict(), getattr(trained, part).state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in after), part
    for part in ("text_encoder_3", "vae"):  # T5 stays frozen, and the VAE is sdtune:toy's
        before, after = getattr(random, part).state_dict(), getattr(trained, part).state_dict()
        assert all(torch.equal(before[k], after[k]) for k in after), part


@pytest.mark.parametrize("command", ["init", "build"])
def test_toy_commands_help_shows_an_example(command, capsys):
    from sdtune.cli import main

    assert main(["toy", "--help"]) == 0
    assert f"sdtune toy {command}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["toy", command, "--help"])
    assert exit_info.value.code == 0
    assert f"sdtune toy {command} --out" in capsys.readouterr().out
    assert main(["toy", "nosuch"]) == 2
    assert capsys.readouterr().err.strip() == "sdtune: error: unknown toy command 'nosuch' (init or build; see `sdtune toy --help`)"

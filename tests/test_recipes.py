"""Every packaged recipe parses through the real CLI and says how to run it."""

import pytest
import yaml

from sdtune.cli import main
from sdtune.commands.recipes import list_recipes

RECIPES = list_recipes()


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_recipe_parses_and_resolves_its_classes(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", recipe.name, "--model.pretrained", "org/model", "--data.root", "data", "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"].startswith("sdtune.")
    assert config["data"]["class_path"].startswith("sdtune.")


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_recipe_header_says_purpose_prerequisites_and_command(recipe):
    header = "\n".join(line for line in recipe.path.read_text().splitlines() if line.startswith("#"))
    assert recipe.summary
    assert "Prerequisites:" in header
    assert f"sdtune fit --config {recipe.name}" in header


def test_sd15_lora_values():
    config = yaml.safe_load(next(r for r in RECIPES if r.name == "sd15/lora").path.read_text())
    model = config["model"]["init_args"]
    assert (model["lora"]["rank"], model["lora"]["alpha"]) == (16, 16)
    assert model["optimizer"]["class_path"] == "torch.optim.AdamW" and model["optimizer"]["init_args"]["lr"] == 1e-4
    assert model["lr_schedule"]["name"] == "constant_with_warmup" and model["lr_schedule"]["warmup_steps"] > 0
    assert model["objective"]["min_snr_gamma"] == 5.0
    assert config["data"]["init_args"]["resolution"] == 512
    assert config["trainer"]["precision"] == "bf16-mixed"


def test_tiny_lora_runs_in_fp32():
    config = yaml.safe_load(next(r for r in RECIPES if r.name == "tiny/lora").path.read_text())
    assert config["trainer"]["precision"] == "32-true"


def test_sdxl_lora_values():
    config = yaml.safe_load(next(r for r in RECIPES if r.name == "sdxl/lora").path.read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert model["pretrained"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (model["lora"]["rank"], model["gradient_checkpointing"]) == (16, True)
    assert (data["resolution"], data["buckets"]) == (1024, True)
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert (config["samples"]["width"], config["samples"]["height"]) == (1024, 1024)


def test_sd2_lora_values():
    config = yaml.safe_load(next(r for r in RECIPES if r.name == "sd2/lora").path.read_text())
    model = config["model"]["init_args"]
    assert model["pretrained"] == "stabilityai/stable-diffusion-2-1"
    assert model["objective"]["prediction_type"] is None and model["objective"]["zero_terminal_snr"] is False
    assert (config["data"]["init_args"]["resolution"], config["samples"]["width"]) == (768, 768)


def test_dreambooth_recipe_has_instance_and_generated_class_images():
    config = yaml.safe_load(next(r for r in RECIPES if r.name == "sd15/dreambooth_lora").path.read_text())
    instance, prior = config["data"]["init_args"]["subsets"]
    assert "sks" in instance["default_caption"] and not instance.get("prior")
    assert prior["prior"] is True and prior["generate"] > 0 and "sks" not in prior["default_caption"]
    assert config["model"]["init_args"]["objective"]["prior_loss_weight"] == 1.0


def test_pivotal_recipe_adds_a_token_beside_the_lora():
    config = yaml.safe_load(next(r for r in RECIPES if r.name == "sd15/pivotal_lora").path.read_text())
    model = config["model"]["init_args"]
    assert model["new_tokens"]["tokens"] == ["<sks>"] and len(model["new_tokens"]["init_words"]) == 1
    assert model["lora"]["rank"] == 16 and any("<sks>" in p for p in config["samples"]["prompts"])


def test_full_recipe_keeps_an_ema():
    config = yaml.safe_load(next(r for r in RECIPES if r.name == "sd15/full").path.read_text())
    assert config["ema"] == {"enabled": True, "decay": 0.9999, "for_samples": True}


@pytest.mark.parametrize("name, pretrained", [("flux/lora", "black-forest-labs/FLUX.1-dev"),
                                              ("sd35/lora", "stabilityai/stable-diffusion-3.5-large")])
def test_flow_recipes_values(name, pretrained):
    config = yaml.safe_load(next(r for r in RECIPES if r.name == name).path.read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert model["pretrained"] == pretrained and model["quantize"] is None
    assert {"add_q_proj", "to_add_out", "to_q"} <= set(model["lora"]["target_modules"])
    assert model["objective"]["flow"]["timestep_sampling"] == "logit_normal" and "min_snr_gamma" not in model["objective"]
    assert data["cache"] is True and data["center_crop"] is True  # T5 runs once per caption, then leaves the GPU
    assert config["samples"]["scheduler"] == "flow_euler" and config["trainer"]["precision"] == "bf16-mixed"
    header = next(r for r in RECIPES if r.name == name).path.read_text().split("seed_everything")[0]
    assert "GB" in header and "--model.quantize nf4" in header


def test_sd15_loha_values():
    from sdtune.adapters.lora import LoraSettings

    config = yaml.safe_load(next(r for r in RECIPES if r.name == "sd15/loha").path.read_text())
    lora = config["model"]["init_args"]["lora"]
    assert (lora["type"], lora["rank"], lora["alpha"]) == ("loha", 8, 4)
    assert LoraSettings(**lora).peft_config().peft_type.value == "LOHA"  # values a LoHa accepts
    assert config["model"]["init_args"]["text_encoder_lora"] is None

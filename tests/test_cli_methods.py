"""Training options through the real CLI, checked on what the run writes: the full fine-tune's pipeline folder and a
LoRA run that stacks DoRA, conv ranks, a text-encoder adapter, 8-bit AdamW, Huber loss and accumulation."""

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from test_cli import sdtune


def unet_weights(unet):
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def test_full_recipe_writes_pipelines_that_diffusers_loads(tiny_model_dir, shapes_dir, tmp_path):
    run = tmp_path / "run"
    sdtune("fit", "--config", "tiny/full", "--model.pretrained", tiny_model_dir, "--data.root", shapes_dir,
           "--trainer.max_steps", 4, "--trainer.default_root_dir", run, "--adapter.every_n_train_steps", 2,
           "--ema.enabled", "true", "--ema.decay", 0.5)
    base = unet_weights(StableDiffusionPipeline.from_pretrained(tiny_model_dir).unet)
    final = StableDiffusionPipeline.from_pretrained(run / "model")
    middle = StableDiffusionPipeline.from_pretrained(run / "model" / "step_000002")
    trained, halfway = unet_weights(final.unet), unet_weights(middle.unet)
    assert trained.keys() == base.keys()
    moved = [k for k in base if not torch.equal(base[k], trained[k])]
    assert len(moved) > 0.9 * len(base)  # nearly every UNet tensor trained (not only an adapter)
    assert any(not torch.equal(halfway[k], trained[k]) for k in moved)
    assert type(final.scheduler).__name__ == type(StableDiffusionPipeline.from_pretrained(tiny_model_dir).scheduler).__name__
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert {k.removeprefix("unet.") for k in checkpoint["state_dict"]} == set(dict(final.unet.named_parameters()))
    # The EMA's own pipeline: the checkpoint's average, neither the trained weights nor the base.
    averaged = unet_weights(StableDiffusionPipeline.from_pretrained(run / "model_ema").unet)
    shadow = checkpoint["callbacks"]["EMA"]["shadow"]
    assert all(torch.equal(averaged[k], shadow["unet." + k]) for k in moved)
    assert all(not torch.equal(averaged[k], trained[k]) and not torch.equal(averaged[k], base[k]) for k in moved[:20])


def test_lora_options_stack_and_the_adapter_loads_in_diffusers(tiny_model_dir, shapes_dir, tmp_path):
    run = tmp_path / "run"
    sdtune("fit", "--config", "tiny/lora", "--model.pretrained", tiny_model_dir, "--data.root", shapes_dir,
           "--trainer.default_root_dir", run, "--trainer.max_steps", 2, "--trainer.accumulate_grad_batches", 2,
           "--model.lora.use_dora", "true", "--model.lora.conv_rank", 2, "--model.text_encoder_lora.lr", 1e-4,
           "--model.optimizer", "bitsandbytes.optim.AdamW8bit", "--model.optimizer.lr", 1e-3,
           "--model.optimizer.min_8bit_size", 0, "--model.objective.loss", "huber", "--model.objective.noise_offset", 0.05,
           "--adapter.every_n_train_steps", 1)
    adapter = load_file(run / "adapter" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder.") for k in adapter)
    assert any("lora_magnitude_vector" in k for k in adapter)
    assert any(".resnets." in k and ".conv1." in k for k in adapter)
    assert sorted(p.name for p in (run / "adapter").glob("step_*")) == ["step_000001", "step_000002"]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2
    state = checkpoint["optimizer_states"][0]
    assert [(g["name"], g["initial_lr"]) for g in state["param_groups"]] == [("unet", 1e-3), ("text_encoder", 1e-4)]
    # bitsandbytes serialises its state under this key; min_8bit_size 0 makes even the tiny tensors 8-bit.
    quantized = [s["__bnb_optimizer_quant_state__"] for s in state["state"].values()]
    assert quantized and all(q["state1"].dtype == q["state2"].dtype == torch.uint8 for q in quantized)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[0, 1, 2, 3]])
    before = pipe.text_encoder(ids)[0]
    pipe.load_lora_weights(run / "adapter")
    assert (pipe.text_encoder(ids)[0] - before).abs().max() > 0  # the text-encoder half loaded too


def test_kohya_folders_tags_masks_and_long_prompts_through_the_cli(tiny_model_dir, shapes_dir, tmp_path):
    import shutil

    from PIL import Image

    parent, masks = tmp_path / "train", tmp_path / "masks"
    for folder, repeats in (("3_sks shape", 3), ("1_shape", 1)):
        shutil.copytree(shapes_dir, parent / f"{folder}")
        (masks / folder).mkdir(parents=True)
    first = sorted((parent / "3_sks shape").glob("*.png"))[0]
    Image.new("L", (64, 64), 255).save(masks / "3_sks shape" / first.name)
    run = tmp_path / "run"
    result = sdtune("fit", "--config", "tiny/lora", "--model.pretrained", tiny_model_dir, "--data.root", parent,
                    "--trainer.default_root_dir", run, "--trainer.max_steps", 1, "--data.shuffle_tags", "true",
                    "--data.keep_tokens", 1, "--data.tag_dropout", 0.1, "--data.max_token_length", 150,
                    "--data.mask_dir", masks, "--model.clip_skip", 2)
    log = result.stdout + result.stderr
    assert "subset '3_sks shape': 8 images × 3 repeats" in log and "subset '1_shape': 8 images × 1 repeats" in log
    assert "15 of 16 images have no mask" in log  # one mask for the 16 images (repeats do not count)
    config = (run / "config.yaml").read_text()
    assert "max_token_length: 150" in config and "clip_skip: 2" in config
    assert (run / "adapter" / "pytorch_lora_weights.safetensors").is_file()

"""SD3 and Flux: the tiny random pipelines load through the real loading code as their family, sdtune's prompt
encoding and denoiser call are the diffusers pipelines', and the recipes train through the CLI into adapters that
StableDiffusion3Pipeline / FluxPipeline load with the same transformer output as sdtune's."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file
from test_cli import sdtune, sdtune_here

from sdtune.adapters.quantize import weight_bytes
from sdtune.errors import SdtuneError
from sdtune.export.check import Probe, unet_output
from sdtune.finetune import LoRAFineTune
from sdtune.models import load_model
from sdtune.models.pretrained import load_pipeline

PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
RECIPES = {"sd3": "sd35/lora", "flux": "flux/lora"}


@pytest.fixture(scope="module", params=["sd3", "flux"])
def flow_model(request, tiny_sd3_dir, tiny_flux_dir):
    return request.param, {"sd3": tiny_sd3_dir, "flux": tiny_flux_dir}[request.param]


def test_the_tiny_models_load_as_their_family(tiny_sd3_dir, tiny_flux_dir):
    sd3, flux = load_model(str(tiny_sd3_dir)), load_model(str(tiny_flux_dir))
    assert (sd3.family.name, flux.family.name) == ("sd3", "flux")
    assert [type(e).__name__ for e in sd3.text_encoder_list] == ["CLIPTextModelWithProjection"] * 2 + ["T5EncoderModel"]
    assert [type(e).__name__ for e in flux.text_encoder_list] == ["CLIPTextModel", "T5EncoderModel"]
    assert type(sd3.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and sd3.noise_scheduler.config.shift == 3.0
    assert flux.noise_scheduler.config.use_dynamic_shifting
    assert sd3.vae.config.latent_channels == 16 and flux.vae.config.shift_factor == pytest.approx(0.1159)


@torch.no_grad()
def test_prompt_encoding_is_the_pipelines(flow_model):
    family_name, path = flow_model
    pipe = PIPELINES[family_name].from_pretrained(path)
    parts = load_model(str(path))
    ids = [t[None] for t in parts.family.tokenize(parts.tokenizer_list, "a red circle", 75)]
    ours = parts.family.encode_prompt(parts.text_encoder_list, ids)
    if family_name == "sd3":
        hidden, _, pooled, _ = pipe.encode_prompt("a red circle", "a red circle", "a red circle", do_classifier_free_guidance=False)
        assert hidden.shape[1] == 77 + 256  # the CLIPs' window, then T5's max_sequence_length
    else:
        hidden, pooled, _ = pipe.encode_prompt("a red circle", "a red circle", max_sequence_length=512)
    torch.testing.assert_close(ours.hidden, hidden)
    torch.testing.assert_close(ours.pooled, pooled)


def test_lora_fit_through_the_recipe_and_the_files_load_in_diffusers(flow_model, shapes_dir, tmp_path):
    family_name, path = flow_model
    run = tmp_path / "run"
    fit = sdtune("fit", "--config", RECIPES[family_name], "--model.pretrained", path, "--data.root", shapes_dir,
           "--data.resolution", 64, "--data.buckets", "false", "--data.num_workers", 0, "--trainer.max_steps", 4,
           "--trainer.precision", "32-true", "--model.weight_dtype", "float32", "--trainer.accelerator", "cpu",
           "--model.gradient_checkpointing", "false", "--model.optimizer.init_args.lr", 2e-2,
           "--model.lr_schedule.warmup_steps", 0, "--trainer.default_root_dir", run,
           "--checkpoint.every_n_train_steps", 4, "--samples.steps", 3, "--samples.width", 64, "--samples.height", 64,
           "--model.text_encoder_lora", "{rank: 2, alpha: 2}")  # fmt: skip
    assert (run / "samples" / "step_000004" / "grid.png").is_file()
    # No kohya file beside the adapter: SD3.5 LoRAs are shared in the diffusers format; kohya's Flux naming is read
    # (by diffusers' reader) only at Flux.1's widths, which the run says in one line.
    assert sorted(p.name for p in (run / "adapter").iterdir()) == ["pytorch_lora_weights.safetensors"]
    why = [line for line in (fit.stdout + fit.stderr).splitlines() if "no A1111/ComfyUI file" in line]
    assert len(why) == (family_name == "flux") and all("Flux.1's widths" in line for line in why), why
    tensors = load_file(run / "adapter" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("transformer.single_transformer_blocks") for k in tensors) == (family_name == "flux")
    assert any(".add_q_proj." in k for k in tensors)  # the text stream of the joint blocks
    assert any(k.startswith("text_encoder.") for k in tensors) and not any("text_encoder_3" in k for k in tensors)
    # diffusers' own pipeline with the adapter gives sdtune's transformer output.
    pipe = PIPELINES[family_name].from_pretrained(path)
    probe = Probe.for_pipeline(pipe)
    base = unet_output(pipe, probe)
    pipe.load_lora_weights(str(run / "adapter"))
    loaded = unet_output(pipe, probe)
    ours = load_pipeline(str(path))
    ours.load_lora_weights(str(run / "adapter"), adapter_name="ours")
    assert (loaded - base).abs().max() > 1e-4  # the adapter does something
    torch.testing.assert_close(unet_output(ours, probe), loaded)
    # Exports: each is checked on write by its consumer.
    for fmt in ("diffusers", "peft"):
        sdtune_here("export", run, "--format", fmt, "--out", tmp_path / fmt)
    sdtune_here("export", run, "--merge", "--out", tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "model_index.json").read_text())["_class_name"] == PIPELINES[family_name].__name__


def test_qlora_holds_the_transformer_quantized_and_exports_for_the_unquantized_base(tiny_flux_dir, shapes_dir, tmp_path):
    sizes = {}
    for quantize in (None, "nf4", "int8"):
        module = LoRAFineTune(str(tiny_flux_dir), lora={"rank": 4, "alpha": 4}, quantize=quantize)
        sizes[quantize] = weight_bytes(module.transformer)
        layer = module.transformer.single_transformer_blocks[0].attn.to_q
        assert type(layer.base_layer).__name__ == {None: "Linear", "nf4": "Linear4bit", "int8": "Linear8bitLt"}[quantize]
    assert sizes["nf4"] < 0.35 * sizes[None] and sizes["int8"] < 0.6 * sizes[None]
    with pytest.raises(SdtuneError, match="model.quantize must be one of nf4, int8 or null"):
        LoRAFineTune(str(tiny_flux_dir), quantize="int4")
    run = tmp_path / "run"
    sdtune("fit", "--config", "flux/lora", "--model.pretrained", tiny_flux_dir, "--data.root", shapes_dir,
           "--data.resolution", 64, "--data.buckets", "false", "--data.num_workers", 0, "--trainer.max_steps", 3,
           "--trainer.precision", "32-true", "--model.weight_dtype", "float32", "--trainer.accelerator", "cpu",
           "--model.quantize", "nf4", "--model.optimizer.init_args.lr", 2e-2, "--model.lr_schedule.warmup_steps", 0,
           "--trainer.default_root_dir", run, "--samples.enabled", "false", "--data.cache", "false")  # fmt: skip
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(".lora_" in key for key in checkpoint["state_dict"])  # only the adapter: the quantized base is not saved
    sdtune_here("export", run, "--format", "diffusers", "--out", tmp_path / "exported")  # checked on the bf16/fp32 base


FLUX1_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=[16, 56, 56])  # fmt: skip


def test_kohya_flux_files_read_back_through_diffusers_as_the_same_updates():
    """Flux.1 dev's real module names and widths (built on the meta device), a rank-4 LoRA on the default targets of
    two double and two single blocks: fused into kohya's names, then read by FluxPipeline.lora_state_dict (diffusers'
    kohya-Flux reader, as load_lora_weights runs it); every module's update B·A·alpha/rank comes back the same."""
    from diffusers import FluxTransformer2DModel

    from sdtune.adapters.kohya_flux import fuse

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX1_DEV)
    targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    blocks = ("transformer_blocks.0.", "transformer_blocks.18.", "single_transformer_blocks.0.", "single_transformer_blocks.37.")
    generator = torch.Generator().manual_seed(0)
    layers, widths = [], {}
    for name, module in transformer.named_modules():
        if hasattr(module, "out_features"):
            widths[name] = module.out_features
        if name.startswith(blocks) and name.endswith(targets):
            down = torch.randn(4, module.in_features, generator=generator) / 50
            up = torch.randn(module.out_features, 4, generator=generator) / 50
            layers.append((name, down, up, 2.0))  # alpha 2, rank 4: scale 0.5
    tensors = {f"lora_unet_{k}": v for k, v in fuse(layers, widths).items()}
    assert "lora_unet_double_blocks_18_img_attn_qkv.lora_down.weight" in tensors
    assert tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 3072 + 12288, 16)
    read = FluxPipeline.lora_state_dict(dict(tensors))
    read = read[0] if isinstance(read, tuple) else read
    for name, down, up, alpha in layers:
        theirs = read[f"transformer.{name}.lora_B.weight"] @ read[f"transformer.{name}.lora_A.weight"]
        torch.testing.assert_close(theirs, alpha / 4 * up @ down, rtol=1e-5, atol=1e-7)
    mlp = read["transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"] @ read["transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight"]
    assert not mlp.any()  # the MLP part of linear1 had no adapter: its block is zeros


def test_kohya_export_of_a_flux_of_other_widths_is_one_line(tiny_flux_dir):
    from sdtune.adapters.kohya import TrainingInfo, save_kohya

    module = LoRAFineTune(str(tiny_flux_dir), lora={"rank": 2, "alpha": 2})
    with pytest.raises(SdtuneError, match=r"assumes Flux.1's widths .* this transformer has 32, 128, 1 \+ 2: export --format diffusers"):
        save_kohya("unused.safetensors", module.family, module.transformer, [None, None], TrainingInfo("base", "t"))


def test_a_flux_run_resumed_from_its_checkpoint_ends_where_an_unbroken_one_does(tiny_flux_dir, shapes_dir, tmp_path):
    from functools import partial

    from training import fit, make_data, trainable

    def model():
        torch.manual_seed(0)  # the same initial A in both runs
        return LoRAFineTune(str(tiny_flux_dir), lora={"rank": 4, "alpha": 4}, optimizer=partial(torch.optim.AdamW, lr=1e-2))

    data = lambda: make_data(shapes_dir, tiny_flux_dir, resolution=64)  # noqa: E731
    unbroken = model()
    fit(unbroken, data(), 4, tmp_path)
    first = model()
    fit(first, data(), 2, tmp_path).save_checkpoint(tmp_path / "half.ckpt")
    resumed = model()
    fit(resumed, data(), 4, tmp_path, ckpt_path=str(tmp_path / "half.ckpt"))
    expected, got = trainable(unbroken), trainable(resumed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert any(not torch.equal(expected[k], trainable(first)[k]) for k in expected)  # steps 3 and 4 moved it


def test_a_cached_flux_run_stores_t5_in_half_precision_and_keeps_text_encoders_on_the_cpu(tiny_flux_dir, shapes_dir, tmp_path):
    from training import fit

    from sdtune.data import CaptionDataModule

    def run(cache: bool) -> tuple[LoRAFineTune, list[float]]:
        torch.manual_seed(0)
        module = LoRAFineTune(str(tiny_flux_dir), lora={"rank": 4, "alpha": 4}, cached_text=cache, noise_seed=0)
        losses = []
        module.on_train_batch_end = lambda outputs, batch, index: losses.append(outputs["loss"].item())
        data = CaptionDataModule(str(shapes_dir), resolution=64, batch_size=2, center_crop=True, cache=cache,
                                 cache_dir=str(tmp_path / "cache"), pretrained=str(tiny_flux_dir), seed=0)  # fmt: skip
        fit(module, data, 3, tmp_path)
        return module, losses

    cached, cached_losses = run(True)
    assert "text_encoder_2" not in cached._modules and cached.text_encoder_2.device.type == "cpu"
    assert "text_encoder_2" not in dict(cached.named_children()) and "transformer" in dict(cached.named_children())
    entries = list((tmp_path / "cache").rglob("text/*.safetensors"))
    tensors = load_file(entries[0])
    assert tensors["hidden"].dtype == torch.float16 and tensors["pooled"].dtype == torch.float32
    assert tensors["hidden"].shape == (512, 48)  # T5's 512 tokens × its width
    _, encoded_losses = run(False)
    assert cached_losses == pytest.approx(encoded_losses, rel=2e-3)  # the cache only rounds T5's output to fp16


def test_sampling_a_flow_model_from_the_command_line(flow_model, tmp_path):
    family_name, path = flow_model
    base = ["sample", "--model", path, "--prompt", "a red circle", "--seed", 0, "--steps", 3, "--width", 64, "--height", 64]
    sdtune_here(*base, "--out", tmp_path / "t2i")
    record = json.loads((tmp_path / "t2i" / "samples.json").read_text())
    assert record["settings"]["scheduler"] == "flow_euler" and record["settings"]["scheduler_class"] == "FlowMatchEulerDiscreteScheduler"
    # no --guidance: the pipeline's own default, Flux's embedded 3.5 rather than 7.5
    assert record["settings"]["guidance"] == {"sd3": 7.0, "flux": 3.5}[family_name]
    image = next((tmp_path / "t2i").glob("*.png"))
    sdtune_here(*base, "--init-image", image, "--strength", 0.5, "--out", tmp_path / "i2i")
    assert json.loads((tmp_path / "i2i" / "samples.json").read_text())["mode"] == "image-to-image"
    result = sdtune(*base, "--scheduler", "ddim", "--out", tmp_path / "x", check=False)
    assert result.returncode == 2 and "does not sample a flow-matching model (SD3, Flux); choose one of flow_euler" in result.stderr


def test_preflight_reads_a_flux_model_before_any_weight_loads(tiny_flux_dir, shapes_dir, tmp_path):
    result = sdtune("fit", "--config", "flux/lora", "--model.pretrained", tiny_flux_dir, "--data.root", shapes_dir,
                    "--data.resolution", 66, "--data.buckets", "false", "--model.lora.target_modules", "[to_q, nope]",
                    "--model.objective.min_snr_gamma", 5, "--trainer.default_root_dir", tmp_path, check=False)  # fmt: skip
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("Seed set")]
    assert result.returncode == 2 and all(line.startswith("sdtune: error: ") for line in lines), result.stderr
    assert any("data.resolution 66 is not a multiple of 4, the VAE's downscaling times the transformer's patch" in line for line in lines)
    assert any("model.lora.target_modules: no module named nope in the transformer" in line for line in lines)
    assert any("model.objective.min_snr_gamma is a setting of noise prediction" in line for line in lines)


def test_sigterm_resume_and_the_nan_guard_hold_for_flux(tiny_flux_dir, shapes_dir, tmp_path, capsys):
    # test_checkpointing's runs (7 steps, random crops and flips, checkpoints every 3 steps) on the tiny Flux.
    import signal

    from test_checkpointing import fit, steps
    from test_nonfinite import one_error

    # The recipe's min-SNR is a noise-prediction setting. (`--model.objective.min_snr_gamma null` reaches the class as
    # the string "None" under jsonargparse 4.53, so the whole objective is given.)
    flux = ("--model.objective", '{"min_snr_gamma": null}', "--samples.enabled", "false")
    whole, run = tmp_path / "whole", tmp_path / "stopped"
    fit(tiny_flux_dir, shapes_dir, whole, *flux)
    stopped = fit(tiny_flux_dir, shapes_dir, run, *flux, "--trainer.callbacks.signal_after", 5,
                  "--trainer.callbacks.signal_name", "SIGTERM", check=False)  # fmt: skip
    assert stopped.returncode == 128 + signal.SIGTERM and "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
    assert "SIGTERM: stopped after optimizer step 5 and saved" in stopped.stderr
    fit(tiny_flux_dir, shapes_dir, run, *flux, "--ckpt_path", "last")
    expected, again = steps(whole), steps(run)
    assert [again[s]["loss"] for s in sorted(again)] == [expected[s]["loss"] for s in sorted(expected)]
    adapters = [load_file(r / "adapter" / "pytorch_lora_weights.safetensors") for r in (whole, run)]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])

    # The guard is about the run, not its process: this run is in this process.
    error = one_error(capsys, tiny_flux_dir, shapes_dir, tmp_path / "nan", *flux, "--trainer.callbacks.nan_at", 4,
                      "--nonfinite.max_in_a_row", 2)  # fmt: skip
    assert "after step 4 trained weights are NaN or infinite" in error
    assert f"the newest checkpoint is {tmp_path / 'nan' / 'checkpoints' / 'last.ckpt'} (step 3)" in error
    saved = torch.load(tmp_path / "nan" / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 3 and all(torch.isfinite(t).all() for t in saved["state_dict"].values())

"""`sdtune export` on a real run: every format loads in its consumer (plain diffusers / peft calls, not sdtune's
loaders) and gives the image sdtune's own sampler gives with the adapter; kohya files follow A1111's naming and
carry alpha ≠ rank and the training metadata; a file that fails its check is renamed *.invalid."""

import hashlib
import json
import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_cli import sdtune

from sdtune.cli import main
from sdtune.inference.sampling import Adapter, generate, load_adapters
from sdtune.models.pretrained import load_model, load_pipeline

PROMPT, SEED, STEPS, SIZE = "sks a red circle", 3, 3, 32


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, shapes_dir, tmp_path_factory):
    """A real (short) LoRA run: UNet rank 8 / alpha 4 (the recipe's), text-encoder rank 4 / alpha 8, trigger "sks".
    A large lr makes the adapter change images visibly after 3 steps."""
    run = tmp_path_factory.mktemp("export") / "run"
    sdtune("fit", "--config", "tiny/lora", "--model.pretrained", tiny_model_dir,
           "--data.subsets", json.dumps([{"root": str(shapes_dir), "prefix": "sks"}]),
           "--data.resolution", SIZE, "--data.batch_size", 2, "--trainer.max_steps", 3,
           "--model.optimizer.init_args.lr", 0.05, "--model.lr_schedule.warmup_steps", 0,
           "--model.text_encoder_lora", json.dumps({"rank": 4, "alpha": 8.0}),
           "--samples.enabled", "false", "--trainer.default_root_dir", run)  # fmt: skip
    return run


def export(*args) -> int:
    return main(["export", *map(str, args)])


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def sdtune_image(model_dir, adapter=None, scale=1.0):
    pipe = load_pipeline(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    if adapter is not None:
        load_adapters(pipe, [Adapter(adapter, scale)])
    return pixels(generate(pipe, [PROMPT], [SEED], steps=STEPS, height=SIZE, width=SIZE)[0][0])


def consumer_image(pipe):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(SEED)
    image = pipe(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=generator).images[0]
    return pixels(image)


@pytest.fixture(scope="module")
def images(run_dir, tiny_model_dir):
    """sdtune's sampler: the base model, and the base with the run's adapter."""
    return {"base": sdtune_image(tiny_model_dir), "adapted": sdtune_image(tiny_model_dir, run_dir / "adapter")}


def test_the_adapter_changes_the_image(images):
    assert np.abs(images["adapted"] - images["base"]).mean() > 5  # so "equal to the adapted image" means something


def _diffusers(tiny_model_dir, out):
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    pipe.load_lora_weights(str(out))
    return pipe


def _peft(tiny_model_dir, out):
    from peft import PeftModel

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    PeftModel.from_pretrained(pipe.unet, str(out))
    PeftModel.from_pretrained(pipe.text_encoder, str(out / "text_encoder"))
    return pipe


CONSUMERS = {
    "diffusers": ("out", _diffusers),
    "peft": ("out", _peft),
    "kohya": ("out.safetensors", _diffusers),
}


@pytest.mark.parametrize("fmt", CONSUMERS)
def test_each_format_loads_in_its_consumer_and_gives_sdtunes_image(fmt, run_dir, tiny_model_dir, images, tmp_path):
    name, consumer = CONSUMERS[fmt]
    out = tmp_path / "exports" / name  # parent folders are created
    assert export(run_dir, "--format", fmt, "--out", out) == 0
    image = consumer_image(consumer(tiny_model_dir, out))
    assert np.abs(image - images["adapted"]).mean() <= 1.0  # ≤ 1/255 of the range
    assert not list(out.parent.glob(".*partial*"))


def test_merged_pipeline_is_base_plus_adapter_at_the_scale(run_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "merged"
    assert export(run_dir, "--merge", "--scale", 0.5, "--out", out) == 0
    merged = consumer_image(StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None))
    half = sdtune_image(tiny_model_dir, run_dir / "adapter", scale=0.5)
    assert np.abs(merged - half).mean() <= 1.0
    assert not list(out.glob("**/*lora*"))  # folded in, not an adapter beside the weights
    assert (out / "tokenizer" / "vocab.json").is_file() and (out / "tokenizer" / "merges.txt").is_file()


# --- kohya: names, alpha, metadata ---------------------------------------------------------------------------------

# AUTOMATIC1111's rules (extensions-builtin/Lora) from kohya's diffusers-style names to its LDM module names.
A1111_UNET = [
    (r"lora_unet_conv_in(.*)", lambda m: f"input_blocks_0_0{m[0]}"),
    (r"lora_unet_conv_out(.*)", lambda m: f"out_2{m[0]}"),
    (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"time_embed_{int(m[0]) * 2 - 2}{m[1]}"),
    (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"input_blocks_{1 + int(m[0]) * 3 + int(m[2])}_{1 if m[1] == 'attentions' else 0}_{RESNET.get(m[3], m[3]) if m[1] == 'resnets' else m[3]}"),
    (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"middle_block_{1 if m[0] == 'attentions' else int(m[1]) * 2}_{RESNET.get(m[2], m[2]) if m[0] == 'resnets' else m[2]}"),
    (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"output_blocks_{int(m[0]) * 3 + int(m[2])}_{1 if m[1] == 'attentions' else 0}_{RESNET.get(m[3], m[3]) if m[1] == 'resnets' else m[3]}"),
    (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"input_blocks_{3 + int(m[0]) * 3}_0_op"),
    # (SD1.5 layout: up block 0 has no attention, so its upsampler is the second module of its last output block)
    (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", lambda m: f"output_blocks_{2 + int(m[0]) * 3}_{2 if int(m[0]) > 0 else 1}_conv"),
]  # fmt: skip
RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def a1111_name(key: str) -> str | None:
    for pattern, convert in A1111_UNET:
        match = re.fullmatch(pattern, key)
        if match:
            return "diffusion_model_" + convert(match.groups())
    match = re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    return f"transformer_text_model_encoder_layers_{match[1]}_{match[2]}" if match else None


def ldm_module_names(model_dir) -> set[str]:
    """Module names of the same model in the original layout, as A1111 names its layers (dots → underscores)."""
    from sdtune.export.single_file import ldm_state_dict

    parts = load_model(str(model_dir))
    names = set()
    for key in ldm_state_dict(parts.family, parts.components, parts.noise_scheduler.config):
        module = key.rsplit(".", 1)[0]
        for prefix, name in (("model.diffusion_model.", "diffusion_model."), ("cond_stage_model.", "")):
            if module.startswith(prefix):
                names.add((name + module[len(prefix):]).replace(".", "_"))
    return names


def test_kohya_file_has_a1111_names_alpha_and_training_metadata(run_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "my_lora.safetensors"
    assert export(run_dir, "--format", "kohya", "--dtype", "fp16", "--out", out) == 0
    tensors = load_file(out)
    ldm = ldm_module_names(tiny_model_dir)
    modules = {key.split(".")[0] for key in tensors}
    for module in modules:
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= tensors.keys()
        assert tensors[f"{module}.lora_down.weight"].dtype == torch.float16
        assert a1111_name(module) in ldm, module  # the layer A1111 patches exists in the checkpoint it loads
    unet = [m for m in modules if m.startswith("lora_unet_")]
    te = [m for m in modules if m.startswith("lora_te_text_model_encoder_layers_")]
    assert len(unet) + len(te) == len(modules) and te
    assert {tensors[f"{m}.alpha"].item() for m in unet} == {4.0}  # the recipe's alpha 4 at rank 8
    assert {tensors[f"{m}.lora_down.weight"].shape[0] for m in unet} == {8}
    assert {tensors[f"{m}.alpha"].item() for m in te} == {8.0}
    # A1111's attention layers: to_out_0 maps onto the LDM name it knows.
    assert a1111_name("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0") == (
        "diffusion_model_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0")

    meta = safe_open(str(out), "pt").metadata()
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_resolution"] == f"({SIZE}, {SIZE})" and meta["ss_steps"] == "3"
    assert meta["modelspec.trigger_phrase"] == "sks" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["sdtune_config_sha256"] == hashlib.sha256((run_dir / "config.yaml").read_bytes()).hexdigest()
    assert meta["ss_network_train_unet_only"] == "False"
    assert meta["ss_sd_model_name"] == tiny_model_dir.name  # a local path is not published with the file
    blob = out.read_bytes()
    header = int.from_bytes(blob[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(blob[8 + header :]).hexdigest()  # what A1111 shows


def test_checkpoint_source_exports_the_same_weights_as_the_adapter(run_dir, tmp_path):
    assert export(run_dir / "checkpoints" / "last.ckpt", "--format", "kohya", "--out", tmp_path / "ckpt.safetensors") == 0
    assert export(run_dir / "adapter", "--format", "kohya", "--out", tmp_path / "adapter.safetensors") == 0
    from_ckpt, from_adapter = load_file(tmp_path / "ckpt.safetensors"), load_file(tmp_path / "adapter.safetensors")
    assert from_ckpt.keys() == from_adapter.keys()
    assert all(torch.equal(from_ckpt[k], from_adapter[k]) for k in from_ckpt)


# --- the check -----------------------------------------------------------------------------------------------------


def test_a_file_that_fails_its_check_is_renamed_invalid_and_the_command_fails(run_dir, tmp_path, monkeypatch, capsys):
    from sdtune.export import formats

    write = formats.WRITERS["kohya"]

    def drop_one_layer(adapted, out, dtype):  # the classic "LoRA key not loaded": a layer the reader never sees
        write(adapted, out, dtype)
        tensors = load_file(out)
        victim = next(k.split(".")[0] for k in tensors if "attn2_to_v" in k)
        save_file({k: v for k, v in tensors.items() if not k.startswith(victim + ".")}, str(out))

    monkeypatch.setitem(formats.WRITERS, "kohya", drop_one_layer)
    out = tmp_path / "broken.safetensors"
    assert export(run_dir, "--format", "kohya", "--out", out) == 2
    err = capsys.readouterr().err
    assert "export check failed" in err and "LoRA layers" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and (tmp_path / "broken.safetensors.invalid").is_file()


def test_existing_output_is_kept_unless_forced(run_dir, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    out.write_bytes(b"user data")
    assert export(run_dir, "--format", "kohya", "--out", out) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"user data"
    assert export(run_dir, "--format", "kohya", "--out", out, "--force") == 0
    assert load_file(out)
    (tmp_path / "photos" / "keep.jpg").parent.mkdir()
    (tmp_path / "photos" / "keep.jpg").write_bytes(b"user data")
    assert export(run_dir, "--out", tmp_path / "photos", "--force") == 2  # a folder that is not an export
    assert "only replaces exports" in capsys.readouterr().err and (tmp_path / "photos" / "keep.jpg").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}", "--out", "{tmp}/x"], "does not exist"),
        (["{run}", "--format", "kohya", "--out", "{tmp}/folder"], "must end in .safetensors"),
        (["{run}", "--format", "diffusers", "--out", "{tmp}/x.safetensors"], "writes a folder"),
        (["{run}", "--merge", "--format", "kohya", "--out", "{tmp}/x"], "drop --format"),
        (["{run}", "--format", "single-file", "--out", "{tmp}/x.safetensors"], "add --merge"),
        (["{run}", "--merge", "--format", "single-file", "--out", "{tmp}/x"], "must end in .safetensors"),
        (["{run}", "--scale", "0.5", "--out", "{tmp}/x"], "only applies with --merge"),
        (["{truncated}", "--model", "{model}", "--out", "{tmp}/x"], "truncated or corrupt"),
        (["{notckpt}", "--out", "{tmp}/x"], "not an sdtune training checkpoint"),
        (["{orphan}", "--out", "{tmp}/x"], "pass --model"),
        (["{full}", "--out", "{tmp}/x"], "is a full fine-tune"),
        (["{foreign}", "--out", "{tmp}/x"], "its model class is os.system"),
    ],
)
def test_bad_input_is_one_line(args, message, run_dir, tiny_model_dir, tmp_path, capsys):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((run_dir / "adapter" / "pytorch_lora_weights.safetensors").read_bytes()[:1000])
    notckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, notckpt)
    orphan = tmp_path / "orphan.safetensors"
    orphan.write_bytes((run_dir / "adapter" / "pytorch_lora_weights.safetensors").read_bytes())
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"hyper_parameters": {"_class_path": "os.system"}, "state_dict": {}}, foreign)
    full = tmp_path / "full_run"
    (full / "model").mkdir(parents=True)
    (full / "model" / "model_index.json").write_text("{}")
    (full / "config.yaml").write_text("model: {}")
    values = dict(missing=tmp_path / "nope", run=run_dir, tmp=tmp_path, truncated=truncated, model=tiny_model_dir,
                  notckpt=notckpt, orphan=orphan, full=full, foreign=foreign)  # fmt: skip
    assert main(["export", *[a.format(**values) for a in args]]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "folder").exists()


def test_a_truncated_adapter_is_one_line_without_traceback_from_the_shell(run_dir, tiny_model_dir, tmp_path):
    truncated = tmp_path / "lora.safetensors"
    truncated.write_bytes((run_dir / "adapter" / "pytorch_lora_weights.safetensors").read_bytes()[:1000])
    result = sdtune("export", truncated, "--model", tiny_model_dir, "--format", "kohya", "--out", tmp_path / "o.safetensors", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sdtune: error: SOURCE {truncated}: not a readable .safetensors file"), lines
    assert not (tmp_path / "o.safetensors").exists() and truncated.stat().st_size == 1000  # the input is untouched


def test_a_run_that_did_not_finish_exports_its_last_checkpoint(run_dir, tmp_path, capsys):
    import os
    import shutil

    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir, unfinished)
    last = unfinished / "checkpoints" / "last.ckpt"
    adapter = unfinished / "adapter" / "pytorch_lora_weights.safetensors"
    os.utime(last, (adapter.stat().st_mtime + 600,) * 2)  # training went on long after the adapter was written
    assert export(unfinished, "--format", "kohya", "--out", tmp_path / "a.safetensors") == 0
    assert f"exporting {last}" in capsys.readouterr().out
    shutil.rmtree(unfinished / "adapter")  # killed before it ever wrote one
    assert export(unfinished, "--format", "kohya", "--out", tmp_path / "b.safetensors") == 0
    assert f"exporting {last}" in capsys.readouterr().out
    shutil.copytree(run_dir / "adapter", unfinished / "adapter")  # a finished run: last.ckpt follows the adapter
    os.utime(last, (adapter.stat().st_mtime + 1,) * 2)
    assert export(unfinished, "--format", "kohya", "--out", tmp_path / "c.safetensors") == 0
    assert f"exporting {unfinished / 'adapter'}" in capsys.readouterr().out

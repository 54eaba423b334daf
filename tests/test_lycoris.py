"""LoHa and LoKr adapters: the LyCORIS file sdtune writes is read by the `lycoris-lora` package (the reference
implementation A1111's and ComfyUI's readers follow) onto a fresh UNet, which then gives sdtune's peft output; every
key follows ComfyUI's naming; sdtune reads the file back itself; the refused combinations are one line."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from test_cli import sdtune, sdtune_here

from sdtune.adapters.files import ADAPTER_WEIGHTS, LYCORIS_WEIGHTS
from sdtune.adapters.lora import (
    LoraSettings,
    TextEncoderLora,
    text_encoder_module_prefix,
)
from sdtune.cli import main
from sdtune.errors import SdtuneError
from sdtune.finetune import LoRAFineTune
from sdtune.inference.sampling import Adapter, load_adapters

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]
SETTINGS = {
    "loha": LoraSettings(type="loha", rank=4, alpha=2.0, target_modules=TARGETS),
    "lokr": LoraSettings(type="lokr", rank=2, alpha=3.0, target_modules=TARGETS),  # w2 factored where it is large
    "lokr_full": LoraSettings(type="lokr", rank=64, alpha=3.0, target_modules=TARGETS),  # w1, w2 full: scale 1 in LyCORIS
    "lokr_factor": LoraSettings(type="lokr", rank=2, alpha=2.0, decompose_factor=4, target_modules=TARGETS),
}
# Each variant's keys besides `.alpha`, all among those ComfyUI reads (comfy/weight_adapter/loha.py, lokr.py).
LAYOUTS = {
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
    "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b"},
    "lokr_full": {"lokr_w1", "lokr_w2"},
    "lokr_factor": {"lokr_w1", "lokr_w2_a", "lokr_w2_b"},
}


def randomized(module, std=0.2):
    """As after training: every adapter matrix non-zero (peft starts one of them at zero)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module.eval()


def unet_output(unet):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 32, 32, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 700]), context).sample


@pytest.fixture(scope="module", params=list(SETTINGS))
def written(request, tiny_model_dir, tmp_path_factory):
    """(variant, sdtune's adapted UNet output, the base output, the written file)."""
    module = randomized(LoRAFineTune(str(tiny_model_dir), lora=SETTINGS[request.param]))
    file = module.save_weights(tmp_path_factory.mktemp(request.param))
    assert file.name == LYCORIS_WEIGHTS
    ours = unet_output(module.denoiser)
    module.denoiser.disable_adapters()
    return request.param, ours, unet_output(module.denoiser), file


def with_lycoris(model, file, prefix="lora_unet_"):
    """`model` with the file's layers under `prefix` applied by the lycoris-lora package."""
    from lycoris import create_lycoris_from_weights

    # lycoris' module-level loader names layers `lycoris_<module path>`; the kohya wrapper, which reads `lora_unet_`
    # itself, first builds its default network, which fails on diffusers' UNet (duplicated time_embedding names).
    tensors = {key.replace(prefix, "lycoris_", 1): value for key, value in load_file(file).items() if key.startswith(prefix)}
    network, _ = create_lycoris_from_weights(1.0, "", model, weights_sd=tensors)
    assert len(network.loras) == len({k.split(".")[0] for k in tensors})  # every layer read
    network.apply_to()
    return network


def test_lycoris_package_reproduces_sdtunes_unet(written, tiny_model_dir):
    variant, ours, base, file = written
    unet = StableDiffusionPipeline.from_pretrained(tiny_model_dir).unet
    network = with_lycoris(unet, file)
    theirs = unet_output(unet)
    diff = (theirs - ours).abs().max().item()
    print(f"{variant}: {len(network.loras)} layers, max |lycoris − sdtune| {diff:.2e}, effect {(ours - base).abs().max():.2e}")
    assert (ours - base).abs().max() > 1e-2  # the adapter does something
    assert diff < 1e-4


def test_keys_follow_comfyui_naming(written, tiny_model_dir):
    variant, _, _, file = written
    unet = StableDiffusionPipeline.from_pretrained(tiny_model_dir).unet
    # ComfyUI maps `lora_unet_<diffusers module path, . → _>` to each UNet weight (comfy/lora.py model_lora_keys_unet).
    comfy_keys = {"lora_unet_" + name.removesuffix(".weight").replace(".", "_") for name, _ in unet.named_parameters()
                  if name.endswith(".weight")}  # fmt: skip
    tensors = load_file(file)
    stems = {key.rsplit(".", 1)[0] for key in tensors}
    assert stems <= comfy_keys
    assert {key.rsplit(".", 1)[1] for key in tensors} == LAYOUTS[variant] | {"alpha"}
    assert all(f"{stem}.alpha" in tensors for stem in stems)
    if variant == "lokr_factor":  # decompose_factor 4: W1 is 4×4 wherever both sides divide by 4
        assert all(tuple(v.shape) == (4, 4) for k, v in tensors.items() if k.endswith(".lokr_w1"))


def test_sample_and_evaluate_read_the_lycoris_file_at_any_scale(written, tiny_model_dir):
    _, ours, base, file = written
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    load_adapters(pipe, [Adapter(file.parent)])  # the run's adapter folder, as `sdtune sample --adapter` takes it
    torch.testing.assert_close(unet_output(pipe.unet), ours, atol=1e-5, rtol=1e-4)
    pipe.set_adapters(["a0"], [0.0])
    torch.testing.assert_close(unet_output(pipe.unet), base, atol=1e-5, rtol=1e-4)
    pipe.unload_lora_weights()  # as evaluate does between adapters
    load_adapters(pipe, [Adapter(file, 0.5)])
    half = unet_output(pipe.unet)
    assert (half - base).abs().max() > 1e-3 and (half - ours).abs().max() > 1e-3


def text_output(text_encoder):
    with torch.no_grad():
        return text_encoder(torch.tensor([[0, 1, 2, 3, 4]]))[0]


def test_text_encoder_lokr_goes_into_the_same_file(tiny_model_dir, tmp_path):
    lora = LoraSettings(type="lokr", rank=2, alpha=2.0, target_modules=["to_q", "to_v"])
    module = randomized(LoRAFineTune(str(tiny_model_dir), lora=lora, text_encoder_lora=TextEncoderLora(type="lokr", rank=2, alpha=4.0)))
    file = module.save_weights(tmp_path / "adapter")
    ours_text, ours = text_output(module.text_encoder), unet_output(module.denoiser)
    # ComfyUI's and A1111's SD1 text-encoder names: lora_te_text_model_encoder_layers_N_…, transformers 4's module paths.
    te_keys = {key.rsplit(".", 1)[0] for key in load_file(file) if key.startswith("lora_te_")}
    assert te_keys and all(key.startswith("lora_te_text_model_encoder_layers_") for key in te_keys)

    text_encoder = StableDiffusionPipeline.from_pretrained(tiny_model_dir).text_encoder
    base_text = text_output(text_encoder)
    with_lycoris(text_encoder, file, "lora_te_" + text_encoder_module_prefix(text_encoder).replace(".", "_"))
    diff = (text_output(text_encoder) - ours_text).abs().max().item()
    print(f"text encoder LoKr: {len(te_keys)} layers, max |lycoris − sdtune| {diff:.2e}, effect {(ours_text - base_text).abs().max():.2e}")
    assert (ours_text - base_text).abs().max() > 1e-2 and diff < 1e-4

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    load_adapters(pipe, [Adapter(file.parent)])
    torch.testing.assert_close(text_output(pipe.text_encoder), ours_text, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(unet_output(pipe.unet), ours, atol=1e-5, rtol=1e-4)


def test_transformer_families_are_refused(tiny_sd3_dir):
    with pytest.raises(SdtuneError, match="LoHa/LoKr train on UNet models"):
        LoRAFineTune(str(tiny_sd3_dir), lora=LoraSettings(type="lokr"))


def test_text_encoder_adapter_shares_the_type():
    with pytest.raises(SdtuneError, match="they share a type"):
        LoRAFineTune("unused", lora=LoraSettings(type="loha"), text_encoder_lora=TextEncoderLora(type="lora"))


@pytest.mark.parametrize("settings, message", [
    (dict(type="loha", use_dora=True), "use_dora is a LoRA option"),
    (dict(type="lokr", conv_rank=4), "conv_rank adds LoRA"),
    (dict(type="loha", decompose_factor=4), "decompose_factor is a LoKr option"),
    (dict(type="loha", dropout=0.1), "rank_dropout and module_dropout"),
    (dict(type="lycoris"), "must be one of lora, loha, lokr"),
])  # fmt: skip
def test_settings_that_make_no_sense_are_refused(settings, message):
    with pytest.raises(SdtuneError, match=message):
        LoraSettings(**settings)


def test_fit_trains_a_loha_that_lycoris_reads_and_sdtune_samples_and_exports(tiny_model_dir, shapes_dir, tmp_path, capsys):
    run = tmp_path / "run"
    sdtune("fit", "--config", "tiny/lora", "--model.pretrained", tiny_model_dir, "--data.root", shapes_dir,
           "--trainer.max_steps", 2, "--trainer.default_root_dir", run, "--model.lora.type", "loha",
           "--model.text_encoder_lora.type", "loha", "--model.optimizer.init_args.lr", 1e-2)  # fmt: skip
    file = run / "adapter" / LYCORIS_WEIGHTS
    assert not (run / "adapter" / ADAPTER_WEIGHTS).exists()
    assert any(key.startswith("lora_te_") for key in load_file(file))
    # The file for A1111, Forge and ComfyUI, named after the run, holds the same LyCORIS tensors.
    for_tools = load_file(run / "adapter" / "run.safetensors")
    assert for_tools.keys() == load_file(file).keys() and all(torch.equal(for_tools[k], v) for k, v in load_file(file).items())
    unet = StableDiffusionPipeline.from_pretrained(tiny_model_dir).unet
    base = unet_output(unet)
    with_lycoris(unet, file)
    assert (unet_output(unet) - base).abs().max() > 1e-5  # two steps moved the LoHa off its zero start

    common = ["--model", tiny_model_dir, "--prompt", "a red circle", "--seed", 0, "--steps", 2, "--width", 64, "--height", 64]
    sdtune_here("sample", *common, "--adapter", run / "adapter", "--out", tmp_path / "samples")
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1
    # Each export is checked on write: reloaded, its UNet output compared with the trained adapter's.
    sdtune_here("export", run, "--format", "kohya", "--out", tmp_path / "loha.safetensors")
    assert load_file(tmp_path / "loha.safetensors").keys() == load_file(file).keys()
    sdtune_here("export", run, "--format", "peft", "--out", tmp_path / "peft")
    assert '"peft_type": "LOHA"' in (tmp_path / "peft" / "text_encoder" / "adapter_config.json").read_text()
    sdtune_here("export", run, "--merge", "--out", tmp_path / "merged")
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "merged").unet
    torch.testing.assert_close(unet_output(merged), unet_output(unet), atol=1e-4, rtol=1e-3)
    capsys.readouterr()
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "refused")]) != 0
    assert "load_lora_weights reads LoRA only" in capsys.readouterr().err


def test_sdxl_loha_names_both_text_encoders_and_reads_back(tiny_sdxl_dir, tmp_path):
    from sdtune.models.pretrained import load_pipeline

    lora = LoraSettings(type="loha", rank=2, alpha=2.0, target_modules=["to_q", "to_v"])
    module = randomized(LoRAFineTune(str(tiny_sdxl_dir), lora=lora, text_encoder_lora=TextEncoderLora(type="loha", rank=2)))
    file = module.save_weights(tmp_path / "adapter")
    ours = text_output(module.text_encoder_2)
    assert {key.split("_")[1] for key in load_file(file)} == {"unet", "te1", "te2"}  # kohya's SDXL prefixes

    text_encoder_2 = load_pipeline(str(tiny_sdxl_dir)).text_encoder_2
    assert (text_output(text_encoder_2) - ours).abs().max() > 1e-2  # the adapter does something
    with_lycoris(text_encoder_2, file, "lora_te2_" + text_encoder_module_prefix(text_encoder_2).replace(".", "_"))
    assert (text_output(text_encoder_2) - ours).abs().max() < 1e-4
    pipe = load_pipeline(str(tiny_sdxl_dir))
    load_adapters(pipe, [Adapter(file)])
    torch.testing.assert_close(text_output(pipe.text_encoder_2), ours, atol=1e-5, rtol=1e-4)

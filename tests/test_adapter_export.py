"""The adapter sdtune writes loads in diffusers and reproduces sdtune's own adapted UNet (and text encoder):
alpha ≠ rank, DoRA, conv ranks and text-encoder adapters included."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from training import perturbed

from sdtune.adapters.files import ADAPTER_WEIGHTS
from sdtune.adapters.lora import LoraSettings, TextEncoderLora
from sdtune.finetune import LoRAFineTune


@pytest.fixture(scope="module")
def trained(tiny_model_dir):
    """A module with alpha/rank = 3 on attention, a 1×1 conv and a 3×3 conv."""
    lora = LoraSettings(rank=4, alpha=12.0, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"])
    return perturbed(LoRAFineTune(str(tiny_model_dir), lora=lora), std=0.05).eval()


VARIANTS = {
    "dora": dict(lora=LoraSettings(rank=4, alpha=4.0, use_dora=True)),
    "conv_rank": dict(lora=LoraSettings(rank=4, alpha=2.0, conv_rank=2, conv_alpha=6.0)),
    "text_encoder": dict(lora=LoraSettings(rank=2, alpha=2.0), text_encoder_lora=TextEncoderLora(rank=2, alpha=4.0)),
}


def unet_output(unet, cross_attention_dim):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 32, 32, generator=generator)
    context = torch.randn(2, 77, cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 700]), context).sample


def test_diffusers_load_lora_weights_reproduces_the_adapted_unet(trained, tiny_model_dir, tmp_path):
    path = trained.save_weights(tmp_path / "adapter")
    assert path.name == ADAPTER_WEIGHTS
    ours = unet_output(trained.unet, 32)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    base = unet_output(pipe.unet, 32)
    pipe.load_lora_weights(tmp_path / "adapter")
    theirs = unet_output(pipe.unet, 32)

    assert (ours - base).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def test_adapter_file_has_diffusers_keys_and_alpha_metadata(trained, tmp_path):
    path = trained.save_weights(tmp_path / "adapter")
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        metadata = f.metadata()
    assert keys and all(k.startswith("unet.") for k in keys)
    assert any("resnets" in k and "conv1" in k for k in keys)  # conv targets are exported too
    assert '"unet.lora_alpha": 12.0' in metadata["lora_adapter_metadata"]
    assert '"unet.r": 4' in metadata["lora_adapter_metadata"]


def text_output(text_encoder):
    ids = torch.tensor([[49406, 1, 2, 3, 49407] + [49407] * 72])
    ids = ids.clamp(max=text_encoder.config.vocab_size - 1)
    with torch.no_grad():
        return text_encoder(ids)[0]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_adapter_variants_round_trip_through_diffusers(variant, tiny_model_dir, tmp_path):
    model = perturbed(LoRAFineTune(str(tiny_model_dir), **VARIANTS[variant]), std=0.05).eval()
    model.save_weights(tmp_path / "adapter")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    base_unet, base_text = unet_output(pipe.unet, 32), text_output(pipe.text_encoder)
    pipe.load_lora_weights(tmp_path / "adapter")

    assert (unet_output(model.unet, 32) - base_unet).abs().max() > 1e-2
    torch.testing.assert_close(unet_output(pipe.unet, 32), unet_output(model.unet, 32), atol=1e-5, rtol=1e-4)
    if variant == "text_encoder":
        assert (text_output(model.text_encoder) - base_text).abs().max() > 1e-3
    torch.testing.assert_close(text_output(pipe.text_encoder), text_output(model.text_encoder), atol=1e-5, rtol=1e-4)


def test_conv_rank_applies_to_convolutions_only(tiny_model_dir):
    model = LoRAFineTune(str(tiny_model_dir), lora=LoraSettings(rank=4, conv_rank=2))
    ranks = {name: p.shape[0] for name, p in model.unet.named_parameters() if ".lora_A." in name}
    assert {r for n, r in ranks.items() if ".resnets." in n and (".conv1." in n or ".conv2." in n)} == {2}
    assert {r for n, r in ranks.items() if "downsamplers" in n or "upsamplers" in n} == {2}
    assert {r for n, r in ranks.items() if ".to_q." in n} == {4}
    without = LoRAFineTune(str(tiny_model_dir), lora=LoraSettings(rank=4))
    assert not any("conv" in n for n, p in without.named_parameters() if p.requires_grad)

"""The adapter sdtune writes loads in diffusers and reproduces sdtune's own adapted UNet, alpha ≠ rank included."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from sdtune.finetune import LoRAFineTune
from sdtune.lora import ADAPTER_WEIGHTS, LoraSettings


@pytest.fixture(scope="module")
def trained(tiny_model_dir):
    """A module whose LoRA B matrices are non-zero, as after training (alpha/rank = 3)."""
    lora = LoraSettings(rank=4, alpha=12.0, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"])
    model = LoRAFineTune(str(tiny_model_dir), lora=lora).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.unet.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def unet_output(unet, cross_attention_dim):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 32, 32, generator=generator)
    context = torch.randn(2, 77, cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 700]), context).sample


def test_diffusers_load_lora_weights_reproduces_the_adapted_unet(trained, tiny_model_dir, tmp_path):
    path = trained.save_adapter(tmp_path / "adapter")
    assert path.name == ADAPTER_WEIGHTS
    ours = unet_output(trained.unet, 32)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    base = unet_output(pipe.unet, 32)
    pipe.load_lora_weights(tmp_path / "adapter")
    theirs = unet_output(pipe.unet, 32)

    assert (ours - base).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def test_adapter_file_has_diffusers_keys_and_alpha_metadata(trained, tmp_path):
    path = trained.save_adapter(tmp_path / "adapter")
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        metadata = f.metadata()
    assert keys and all(k.startswith("unet.") for k in keys)
    assert any("resnets" in k and "conv1" in k for k in keys)  # conv targets are exported too
    assert '"unet.lora_alpha": 12.0' in metadata["lora_adapter_metadata"]
    assert '"unet.r": 4' in metadata["lora_adapter_metadata"]

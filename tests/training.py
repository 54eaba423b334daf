"""Helpers the training tests share: a small data module on the generated shapes and a quiet CPU Trainer."""

import lightning as L
import torch
from safetensors.torch import load_file

from sdtune.data import CaptionDataModule


def make_data(root, tiny_model_dir, batch_size=2, resolution=32):
    return CaptionDataModule(
        str(root), resolution=resolution, batch_size=batch_size, center_crop=True, pretrained=str(tiny_model_dir)
    )


def fit(model, data, steps, tmp_path, ckpt_path=None, **trainer):
    options = dict(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    options.update(trainer)
    trainer = L.Trainer(**options)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer


def trainable(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def perturbed(model, std=0.1):
    """As after training: every LoRA B non-zero (normal, `std`), every DoRA magnitude moved by up to 10 %."""
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.rand(param.shape, generator=generator))
    return model


def trained_adapter(tiny_model_dir, out, std=0.1, **settings):
    """A 'trained' adapter folder: a perturbed LoRAFineTune saved in the diffusers format."""
    from sdtune.finetune import LoRAFineTune

    perturbed(LoRAFineTune(str(tiny_model_dir), **settings), std).save_weights(out)
    return out


def write_single_file(model_dir, out):
    """The model in `model_dir` as one original-layout checkpoint, as `sdtune export --merge --format single-file`
    writes it; a `.ckpt` `out` is the {"state_dict": ...} pickle CompVis and A1111 wrote."""
    from sdtune.export.single_file import save_single_file
    from sdtune.models.pretrained import load_model

    parts = load_model(str(model_dir))
    file = out if out.suffix == ".safetensors" else out.with_name(out.name + ".safetensors")
    save_single_file(parts, parts.family, file, torch.float32)
    if file != out:
        torch.save({"state_dict": load_file(file), "global_step": 0}, out)
        file.unlink()
    return out

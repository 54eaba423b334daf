"""Validation loss outside training equals the run's val/loss and depends only on the weights."""

import lightning as L
import pytest
import torch

from sdtune.adapters.lora import LoraSettings
from sdtune.data import CaptionDataModule
from sdtune.finetune import LoRAFineTune
from sdtune.finetune.evaluation import dataset_loss


def test_dataset_loss_matches_validate_and_moves_only_with_the_weights(tiny_model_dir, shapes_dir):
    model = LoRAFineTune(str(tiny_model_dir), lora=LoraSettings(rank=2))
    data = CaptionDataModule(str(shapes_dir), val_root=str(shapes_dir), resolution=32, batch_size=3,
                             pretrained=str(tiny_model_dir))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.validate(model, data, verbose=False)[0]["val/loss"]
    ours = dataset_loss(model, data.val_dataloader())
    assert ours == pytest.approx(logged, rel=1e-5)
    assert dataset_loss(model, data.val_dataloader()) == ours  # fixed draws: the same number twice

    with torch.no_grad():
        for name, param in model.unet.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.05)
    assert dataset_loss(model, data.val_dataloader()) != pytest.approx(ours, rel=1e-4)
    model.train()
    modes = {name: m.training for name, m in model.named_modules()}
    dataset_loss(model, data.val_dataloader())
    assert {name: m.training for name, m in model.named_modules()} == modes  # every submodule as it was
    assert not model.vae.training

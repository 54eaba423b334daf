"""DreamBooth with prior preservation: the loss is instance + λ·prior, class images are generated with the base model
when missing (once), and the `sd15/dreambooth_lora` recipe trains through the CLI into an adapter diffusers loads."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import sdtune
from training import perturbed

from sdtune.adapters.lora import LoraSettings
from sdtune.data import CaptionDataModule
from sdtune.data.batch import collate
from sdtune.errors import SdtuneError
from sdtune.finetune import LoRAFineTune
from sdtune.finetune.objective import Objective


def _batch(tiny_model_dir, shapes_dir, prior):
    dm = CaptionDataModule(str(shapes_dir), resolution=32, batch_size=4, center_crop=True, pretrained=str(tiny_model_dir))
    dm.setup("fit")
    batch = collate([dm._train_dataset()[i] for i in range(4)])
    batch["is_prior"] = torch.tensor(prior)
    return batch


def _part(batch, keep):
    return {k: (v[keep] if isinstance(v, torch.Tensor) else [x for x, m in zip(v, keep) if m]) for k, v in batch.items()}


def test_the_loss_is_instance_plus_lambda_times_prior(tiny_model_dir, shapes_dir):
    module = perturbed(LoRAFineTune(str(tiny_model_dir), lora=LoraSettings(rank=4), noise_seed=0,
                                    objective=Objective(prior_loss_weight=0.3))).eval()  # fmt: skip
    batch = _batch(tiny_model_dir, shapes_dir, [False, True, False, True])
    # Each sample's noise and timestep come from its own key, so the halves draw what they drew in the whole batch.
    whole = module.diffusion_loss(batch, module.step_generator(batch))
    halves = []
    for keep in (~batch["is_prior"], batch["is_prior"]):
        part = {**_part(batch, keep)}
        part.pop("is_prior")
        halves.append(module.diffusion_loss(part, module.step_generator(part)))
    torch.testing.assert_close(whole, halves[0] + 0.3 * halves[1])
    assert abs(halves[1].item() - halves[0].item()) > 1e-4  # the two terms differ, so λ is visible
    only_prior = {**batch, "is_prior": torch.ones(4, dtype=torch.bool)}
    plain = {k: v for k, v in batch.items() if k != "is_prior"}
    torch.testing.assert_close(module.diffusion_loss(only_prior, module.step_generator(batch)),
                               0.3 * module.diffusion_loss(plain, module.step_generator(batch)))  # fmt: skip


def test_class_images_are_generated_once_and_marked_prior(tiny_model_dir, shapes_dir, tmp_path, monkeypatch):
    subsets = [{"root": str(shapes_dir), "default_caption": "a photo of sks circle"},
               {"root": str(tmp_path / "class"), "prior": True, "generate": 3, "default_caption": "a circle"}]  # fmt: skip
    dm = CaptionDataModule(subsets=subsets, resolution=32, batch_size=4, center_crop=True, pretrained=str(tiny_model_dir))
    dm.prepare_data()
    made = sorted(p.name for p in (tmp_path / "class").iterdir())
    assert made == ["class_00000.png", "class_00000.txt", "class_00001.png", "class_00001.txt", "class_00002.png", "class_00002.txt"]
    assert Image.open(tmp_path / "class" / "class_00000.png").size == (32, 32)
    assert (tmp_path / "class" / "class_00001.txt").read_text().strip() == "a circle"
    dm.setup("fit")
    priors = [record.prior for record in dm.train_records]
    assert priors.count(True) == 3 and priors.count(False) == 8
    import sdtune.models.pretrained as pretrained

    monkeypatch.setattr(pretrained, "load_pipeline", None)  # loading the model again would fail the test
    CaptionDataModule(subsets=subsets, resolution=32, pretrained=str(tiny_model_dir)).prepare_data()
    with pytest.raises(SdtuneError, match=r"generate needs the class prompt as default_caption"):
        CaptionDataModule(subsets=[{**subsets[1], "default_caption": ""}], pretrained=str(tiny_model_dir))
    with pytest.raises(SdtuneError, match=r"is for class images only \(prior: true\)"):
        CaptionDataModule(subsets=[{**subsets[1], "prior": False}], pretrained=str(tiny_model_dir))


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def test_dreambooth_recipe_trains_through_the_cli(tiny_model_dir, shapes_dir, tmp_path):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    instance = tmp_path / "instance"
    shutil.copytree(shapes_dir, instance)
    (instance / "metadata.jsonl").unlink()  # uncaptioned photos: each is the instance prompt
    run = tmp_path / "run"
    subsets = (f"[{{root: {instance}, default_caption: a photo of sks shape, repeats: 1}}, "
               f"{{root: {tmp_path / 'class'}, prior: true, generate: 4, default_caption: a shape}}]")  # fmt: skip
    sdtune("fit", "--config", "sd15/dreambooth_lora", "--model.pretrained", tiny_model_dir, "--data.subsets", subsets,
           "--data.resolution", 64, "--data.num_workers", 0, "--trainer.precision", "32-true", "--trainer.max_steps", 6,
           "--trainer.default_root_dir", run, "--model.optimizer.init_args.lr", 2e-2, "--model.lr_schedule.warmup_steps", 0,
           "--samples.prompts", "[a photo of sks shape]", "--samples.seeds", "[0]", "--samples.steps", 4,
           "--samples.width", 64, "--samples.height", 64)  # fmt: skip
    assert len(list((tmp_path / "class").glob("*.png"))) == 4
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(run / "adapter"))
    out = pipe("a photo of sks shape", num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
               generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    final, start = _png(run / "samples" / "step_000006" / "0_s0.png"), _png(run / "samples" / "step_000000" / "0_s0.png")
    assert np.abs(final - start).mean() > 3
    assert np.abs(np.asarray(out, dtype=np.float64) - final).max() <= 1

"""New tokens (textual inversion, and with a LoRA pivotal tuning): only the new rows train, they start from their
init words, they are written for diffusers' `load_textual_inversion` and for A1111, and the `sd15/pivotal_lora`
recipe trains through the CLI into files diffusers loads and that give the run's own images."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import sdtune, sdtune_here
from training import fit

from sdtune.adapters.new_tokens import NewTokens
from sdtune.cli import main
from sdtune.data import CaptionDataModule
from sdtune.errors import SdtuneError
from sdtune.finetune import LoRAFineTune, TextualInversion

TOKENS = {"tokens": ["<sks>"], "init_words": ["circle"], "lr": 5e-2}


def _encode(module, text):
    ids = module.tokenizer([text], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return module.text_encoder(ids)[0]


def test_only_the_new_row_trains_and_it_starts_from_its_init_word(tiny_model_dir, shapes_dir, tmp_path):
    module = TextualInversion(str(tiny_model_dir), new_tokens=TOKENS)
    embedding = module.token_embedding
    base_rows = embedding.weight.detach().clone()
    word_ids = module.tokenizer("circle", add_special_tokens=False).input_ids
    torch.testing.assert_close(embedding.added[0], base_rows[word_ids].mean(0))
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].endswith("embeddings.token_embedding.added")
    plain, with_token = _encode(module, "a red circle"), _encode(module, "a <sks> circle")
    start = embedding.added.detach().clone()
    data = CaptionDataModule(subsets=[{"root": str(shapes_dir), "prefix": "<sks>"}], resolution=32, batch_size=4,
                             center_crop=True, pretrained=str(tiny_model_dir), added_tokens=module.added_tokens)  # fmt: skip
    fit(module, data, 4, tmp_path)
    assert data.tokenizer.convert_tokens_to_ids("<sks>") == len(base_rows)  # the data module tokenized it as one token
    assert torch.equal(embedding.weight, base_rows)  # every base row is the base model's
    assert (embedding.added - start).abs().max() > 1e-3  # the new one learned
    torch.testing.assert_close(_encode(module, "a red circle"), plain, rtol=0, atol=0)
    assert (_encode(module, "a <sks> circle") - with_token).abs().max() > 1e-4


def test_bad_new_tokens_are_one_line(tiny_model_dir, tiny_sdxl_dir):
    cases = [
        (dict(new_tokens={"tokens": ["red"], "init_words": ["blue"]}), "already in the tokenizer's vocabulary"),
        (dict(new_tokens={"tokens": ["<a>", "<b>"], "init_words": ["red"]}), "2 tokens but 1 init_words"),
        (dict(lora=None), "nothing would train"),
    ]
    for kwargs, message in cases:
        with pytest.raises(SdtuneError, match=message):
            LoRAFineTune(str(tiny_model_dir), **kwargs)
    with pytest.raises(SdtuneError, match="new_tokens is not supported for SDXL"):
        LoRAFineTune(str(tiny_sdxl_dir), new_tokens=TOKENS)
    with pytest.raises(SdtuneError, match="has no spaces"):
        NewTokens(tokens=["a b"], init_words=["c"])


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def test_pivotal_recipe_trains_through_the_cli_and_both_embedding_files_load_in_diffusers(tiny_model_dir, shapes_dir, tmp_path, capsys):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    run, prompt = tmp_path / "run", "a photo of <sks>"
    sdtune("fit", "--config", "sd15/pivotal_lora", "--model.pretrained", tiny_model_dir,
           "--data.subsets", f"[{{root: {shapes_dir}, prefix: <sks>}}]", "--data.resolution", 64, "--data.buckets", "false",
           "--data.num_workers", 0, "--trainer.precision", "32-true", "--trainer.max_steps", 6,
           "--trainer.default_root_dir", run, "--model.new_tokens.init_words", "[circle]",
           "--model.optimizer.init_args.lr", 2e-2, "--model.new_tokens.lr", 5e-2, "--model.lr_schedule.warmup_steps", 0,
           "--samples.prompts", f"[{prompt}]", "--samples.seeds", "[0]", "--samples.steps", 4,
           "--samples.width", 64, "--samples.height", 64)  # fmt: skip
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    embedding_keys = [k for k in checkpoint if "token_embedding" in k]
    assert len(embedding_keys) == 1 and embedding_keys[0].endswith(".added") and checkpoint[embedding_keys[0]].shape == (1, 32)
    final, start = _png(run / "samples" / "step_000006" / "0_s0.png"), _png(run / "samples" / "step_000000" / "0_s0.png")
    assert np.abs(final - start).mean() > 3
    for embeddings in ("embeddings", "embeddings_a1111"):
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(run / "adapter"))
        pipe.load_textual_inversion(str(run / "adapter" / embeddings / "sks.safetensors"), token="<sks>")
        out = pipe(prompt, num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
                   generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
        assert np.abs(np.asarray(out, dtype=np.float64) - final).max() <= 1, embeddings
    common = ["--model", tiny_model_dir, "--adapter", run / "adapter", "--prompt", prompt, "--seed", 0, "--steps", 4,
              "--guidance", 7.5, "--scheduler", "dpmpp_2m", "--width", 64, "--height", 64]  # fmt: skip
    sdtune_here("sample", *common, "--embedding", run / "adapter" / "embeddings" / "sks.safetensors", "--out", tmp_path / "ours")
    ours = _png(next((tmp_path / "ours").glob("*.png")))
    assert np.abs(ours - final).max() <= 1
    capsys.readouterr()
    code = main(["sample", *map(str, common), "--embedding", str(run / "adapter" / "pytorch_lora_weights.safetensors"),
                 "--out", str(tmp_path / "wrong")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "not a textual-inversion embedding" in err[-1] and "Traceback" not in "".join(err)


def test_textual_inversion_recipe_writes_embeddings_that_change_diffusers_images(tiny_model_dir, shapes_dir, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    sdtune("fit", "--config", "sd15/textual_inversion", "--model.pretrained", tiny_model_dir,
           "--data.subsets", f"[{{root: {shapes_dir}, prefix: <sks>}}]", "--data.resolution", 64, "--data.buckets", "false",
           "--data.num_workers", 0, "--trainer.precision", "32-true", "--trainer.max_steps", 4,
           "--trainer.default_root_dir", run, "--model.new_tokens.init_words", "[circle]", "--model.new_tokens.lr", 0.1, "--model.lr_schedule.warmup_steps", 0,
           "--samples.enabled", "false")  # fmt: skip
    assert not (run / "adapter" / "pytorch_lora_weights.safetensors").exists()
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def image(prompt):
        out = pipe(prompt, num_inference_steps=4, height=64, width=64, generator=torch.Generator().manual_seed(0))
        return np.asarray(out.images[0], dtype=np.float64)

    init = image("a photo of circle")
    pipe.load_textual_inversion(str(run / "adapter" / "embeddings_a1111" / "sks.safetensors"), token="<sks>")
    assert np.abs(image("a photo of <sks>") - init).mean() > 1  # the learned row is not its init word's any more
    capsys.readouterr()
    assert main(["export", str(run), "--format", "kohya", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "no LoRA to export" in capsys.readouterr().err

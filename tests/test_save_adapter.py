"""SaveAdapter as a Trainer callback: periodic step folders, the final folder, accumulation, full fine-tunes."""

import json
import logging
from functools import partial

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from training import fit, make_data

from sdtune.adapters.files import ADAPTER_WEIGHTS
from sdtune.adapters.lora import LoraSettings
from sdtune.callbacks import SaveAdapter
from sdtune.finetune import FullFineTune, LoRAFineTune, LRSchedule


def make_model(tiny_model_dir):
    return LoRAFineTune(str(tiny_model_dir), lora=LoraSettings(rank=4, alpha=8.0),
                        optimizer=partial(torch.optim.AdamW, lr=1e-3), lr_schedule=LRSchedule(name="constant"))






def count_saves(model):
    saved = []
    original = model.save_weights

    def counting(out_dir):
        saved.append((model.trainer.global_step, str(out_dir)))
        return original(out_dir)

    model.save_weights = counting
    return saved


def step_dirs(folder):
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_"))


def test_saves_every_n_steps_and_at_the_end(tiny_model_dir, shapes_dir, tmp_path):
    model = make_model(tiny_model_dir)
    saved = count_saves(model)
    fit(model, make_data(shapes_dir, tiny_model_dir), 4, tmp_path, callbacks=[SaveAdapter(every_n_train_steps=2)])

    adapter = tmp_path / "adapter"
    assert step_dirs(adapter) == ["step_000002", "step_000004"]
    assert [step for step, _ in saved] == [2, 4, 4]  # two periodic saves, then the final one
    step2, step4, final = (load_file(d / ADAPTER_WEIGHTS) for d in (adapter / "step_000002", adapter / "step_000004", adapter))
    assert set(step2) == set(step4) == set(final) and final
    assert all(torch.equal(step4[k], final[k]) for k in final)  # the last step is what the final folder holds
    assert any(not torch.equal(step2[k], final[k]) for k in final)  # two more steps trained after step 2
    # the final file is the trained adapter, not a stale copy
    lora_b = {k: v for k, v in final.items() if "lora_B" in k}
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b.values())  # B starts at zero
    # beside each, the A1111/ComfyUI file, named after the run and the step so they can share one loras folder
    run = tmp_path.resolve().name
    kohya = {p.relative_to(adapter).as_posix(): p for p in adapter.rglob("*.safetensors") if p.name != ADAPTER_WEIGHTS}
    assert set(kohya) == {f"{run}.safetensors", f"step_000002/{run}-step000002.safetensors",
                          f"step_000004/{run}-step000004.safetensors"}  # fmt: skip
    for name, steps in ((f"{run}-step000002", "2"), (run, "4")):
        with safe_open(str(next(p for p in kohya.values() if p.stem == name)), "pt") as file:
            assert (file.metadata()["ss_output_name"], file.metadata()["ss_steps"]) == (name, steps)
    step2_kohya = load_file(kohya[f"step_000002/{run}-step000002.safetensors"])
    for key, value in step2.items():  # the step's own weights, in kohya's names
        module, part = key.removeprefix("unet.").rsplit(".lora_", 1)
        assert torch.equal(step2_kohya[f"lora_unet_{module.replace('.', '_')}.lora_{'down' if part == 'A.weight' else 'up'}.weight"], value)


def test_an_adapter_kohya_cannot_hold_is_saved_for_diffusers_with_one_line_why(tiny_model_dir, shapes_dir, tmp_path, caplog):
    model = LoRAFineTune(str(tiny_model_dir), lora=LoraSettings(rank=4, use_dora=True),
                         optimizer=partial(torch.optim.AdamW, lr=1e-3), lr_schedule=LRSchedule(name="constant"))  # fmt: skip
    with caplog.at_level(logging.INFO):
        fit(model, make_data(shapes_dir, tiny_model_dir), 1, tmp_path, callbacks=[SaveAdapter()])
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [ADAPTER_WEIGHTS]
    why = [r.getMessage() for r in caplog.records if "no A1111/ComfyUI file" in r.getMessage()]
    assert len(why) == 1 and "DoRA" in why[0] and "--format diffusers" in why[0], why


def test_saves_once_per_optimizer_step_with_gradient_accumulation(tiny_model_dir, shapes_dir, tmp_path):
    model = make_model(tiny_model_dir)
    saved = count_saves(model)
    batches = []
    model.on_train_batch_start = lambda batch, idx: batches.append(idx)
    fit(model, make_data(shapes_dir, tiny_model_dir), 2, tmp_path, accumulate_grad_batches=2,
        callbacks=[SaveAdapter(every_n_train_steps=1)])
    assert batches == [0, 1, 2, 3]  # 4 micro-batches, 2 optimizer steps
    assert step_dirs(tmp_path / "adapter") == ["step_000001", "step_000002"]
    assert [step for step, _ in saved] == [1, 2, 2]  # not once per micro-batch
    assert (tmp_path / "adapter" / "step_000001" / ADAPTER_WEIGHTS).is_file()
    assert (tmp_path / "adapter" / ADAPTER_WEIGHTS).is_file()


def test_full_finetune_saves_a_loadable_pipeline_in_model_dir(tiny_model_dir, shapes_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    model = FullFineTune(str(tiny_model_dir), optimizer=partial(torch.optim.AdamW, lr=1e-3),
                         lr_schedule=LRSchedule(name="constant"))
    initial = {k: v.clone() for k, v in model.unet.state_dict().items()}
    fit(model, make_data(shapes_dir, tiny_model_dir), 2, tmp_path, callbacks=[SaveAdapter(every_n_train_steps=2)])

    assert not (tmp_path / "adapter").exists()
    assert step_dirs(tmp_path / "model") == ["step_000002"]
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "model", safety_checker=None)
    loaded = pipeline.unet.state_dict()
    trained = model.unet.state_dict()
    assert set(loaded) == set(trained)
    for key in trained:
        torch.testing.assert_close(loaded[key], trained[key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(initial[k], trained[k]) for k in trained)  # and it is the trained UNet
    # The tokenizer as SD checkpoints ship it, so transformers 4's CLIPTokenizer (what model_index.json names) reads it.
    saved, shipped = tmp_path / "model" / "tokenizer", tiny_model_dir / "tokenizer"
    assert json.loads((saved / "vocab.json").read_text()) == json.loads((shipped / "vocab.json").read_text())
    assert (saved / "merges.txt").read_text() == (shipped / "merges.txt").read_text()

"""`model.init_adapter`: training starts from an existing LoRA file (diffusers or kohya format) with the same
effective update, whatever alpha the config uses; mismatched files are one-line errors."""

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file
from test_cli import sdtune
from training import fit, make_data, perturbed, trainable, trained_adapter

from sdtune.adapters.files import ADAPTER_WEIGHTS
from sdtune.adapters.lora import LoraSettings, TextEncoderLora, lora_state_dict
from sdtune.cli import main
from sdtune.errors import SdtuneError
from sdtune.finetune import LoRAFineTune

FILE_LORA = dict(lora=LoraSettings(rank=4, alpha=8.0), text_encoder_lora=TextEncoderLora(rank=2, alpha=4.0))


def unet_output(unet):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 32, 32, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 700]), context).sample


def text_output(text_encoder):
    ids = torch.tensor([[0, 5, 9, 13, 2, 1, 1]])
    with torch.no_grad():
        return text_encoder(ids)[0]


def build(tiny_model_dir, init_adapter=None, **settings):
    return LoRAFineTune(str(tiny_model_dir), init_adapter=None if init_adapter is None else str(init_adapter), **settings)


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    """A diffusers-format adapter folder (rank 4, alpha 8 on the UNet; rank 2, alpha 4 on the text encoder)."""
    return trained_adapter(tiny_model_dir, tmp_path_factory.mktemp("init") / "adapter", **FILE_LORA)


def test_init_from_a_diffusers_adapter_reproduces_it_at_another_alpha(adapter, tiny_model_dir):
    file = load_file(str(adapter / ADAPTER_WEIGHTS))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(adapter)  # the file's model, as diffusers runs it

    # Same alpha: the adapter's tensors are the file's.
    same = build(tiny_model_dir, adapter / ADAPTER_WEIGHTS, **FILE_LORA)
    ours = {f"unet.{k}": v for k, v in lora_state_dict(same.unet).items()}
    assert ours and all(torch.equal(v, file[k]) for k, v in ours.items())

    # Half the alpha (scale 1 instead of 2): B doubles and the UNet and text encoder compute what the file's do.
    half = build(tiny_model_dir, adapter, lora=LoraSettings(rank=4, alpha=4.0), text_encoder_lora=TextEncoderLora(rank=2, alpha=2.0))
    for name, tensor in lora_state_dict(half.unet).items():
        expected = file[f"unet.{name}"] * (2.0 if ".lora_B." in name else 1.0)
        torch.testing.assert_close(tensor, expected)
    torch.testing.assert_close(unet_output(half.unet), unet_output(pipe.unet), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(text_output(half.text_encoder), text_output(pipe.text_encoder), atol=1e-5, rtol=1e-4)
    zero = build(tiny_model_dir, lora=LoraSettings(rank=4, alpha=4.0), text_encoder_lora=TextEncoderLora(rank=2, alpha=2.0))
    assert (unet_output(zero.unet) - unet_output(pipe.unet)).abs().max() > 1e-2

    # It stays a normal trainable adapter: float32, the same tensors train as without init_adapter, "default" active.
    assert set(trainable(half)) == set(trainable(zero))
    assert {p.dtype for p in trainable(half).values()} == {torch.float32}
    assert half.unet.active_adapters() == ["default"] and list(half.unet.peft_config) == ["default"]
    assert list(half.text_encoder.peft_config) == ["default"]
    assert half.hparams["init_adapter"] == str(adapter)


def to_kohya(state, prefix, alphas):
    """peft names (`a.b.to_q.lora_A.weight`) → kohya (`<prefix>a_b_to_q.lora_down.weight`, `.lora_up.weight`, `.alpha`)."""
    out = {}
    for key, tensor in state.items():
        module, _, kind = key.partition(".lora_")
        name = prefix + module.replace(".", "_")
        out[f"{name}.lora_down.weight" if kind == "A.weight" else f"{name}.lora_up.weight"] = tensor.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alphas[module])
    return out


def test_init_from_a_kohya_file_with_text_encoder_and_per_module_alphas(tiny_model_dir, tmp_path):
    source = perturbed(build(tiny_model_dir, **FILE_LORA))  # scale alpha/rank = 2 everywhere
    kohya = {}
    for model, prefix, rank in ((source.unet, "lora_unet_", 4), (source.text_encoder, "lora_te_text_model_", 2)):
        state = lora_state_dict(model)
        modules = sorted({key.partition(".lora_")[0] for key in state})
        # Alphas differ between modules (diffusers 0.42 alone would give all of them the most common one); B is
        # rescaled so that every module's update equals the source's.
        alphas = {module: [1.0, 2.0, 8.0][i % 3] * rank / 4 for i, module in enumerate(modules)}
        state = {k: v * (2.0 * rank / alphas[k.partition(".lora_")[0]] if ".lora_B." in k else 1.0) for k, v in state.items()}
        kohya.update(to_kohya(state, prefix, alphas))
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight" in kohya
    save_file(kohya, tmp_path / "kohya.safetensors")

    model = build(tiny_model_dir, tmp_path / "kohya.safetensors", lora=LoraSettings(rank=4, alpha=4.0),
                  text_encoder_lora=TextEncoderLora(rank=2, alpha=2.0))
    torch.testing.assert_close(unet_output(model.unet), unet_output(source.unet), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(text_output(model.text_encoder), text_output(source.text_encoder), atol=1e-5, rtol=1e-4)
    assert (text_output(model.text_encoder) - text_output(build(tiny_model_dir).text_encoder)).abs().max() > 1e-3


def test_init_from_a_dora_adapter_restores_its_magnitudes(tiny_model_dir, tmp_path):
    dora = dict(lora=LoraSettings(rank=4, alpha=8.0, use_dora=True), text_encoder_lora=TextEncoderLora(rank=2, alpha=4.0))
    source = perturbed(build(tiny_model_dir, **dora))
    source.save_weights(tmp_path / "dora")
    model = build(tiny_model_dir, tmp_path / "dora", lora=LoraSettings(rank=4, alpha=2.0, use_dora=True),
                  text_encoder_lora=TextEncoderLora(rank=2, alpha=1.0))
    torch.testing.assert_close(unet_output(model.unet), unet_output(source.unet), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(text_output(model.text_encoder), text_output(source.text_encoder), atol=1e-5, rtol=1e-4)
    with pytest.raises(SdtuneError, match="is a DoRA adapter but model.lora.use_dora is false: set model.lora.use_dora: true$"):
        build(tiny_model_dir, tmp_path / "dora", lora=LoraSettings(rank=4), text_encoder_lora=TextEncoderLora(rank=2))


def test_fit_through_the_cli_starts_from_the_adapter(tiny_model_dir, shapes_dir, tmp_path, capsys):
    # tiny/lora trains rank 8 (alpha 4) on the UNet only: a UNet-only rank-8 file fits it.
    file = trained_adapter(tiny_model_dir, tmp_path / "rank8", lora=LoraSettings(rank=8, alpha=8.0)) / ADAPTER_WEIGHTS
    run = tmp_path / "run"
    sdtune("fit", "--config", "tiny/lora", "--model.pretrained", tiny_model_dir, "--data.root", shapes_dir,
           "--model.init_adapter", file, "--trainer.max_steps", 1, "--samples.enabled", "false",
           "--trainer.default_root_dir", run)
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]["init_adapter"] == str(file)
    start, saved = load_file(str(file)), load_file(str(run / "adapter" / ADAPTER_WEIGHTS))
    # One step (at warmup lr 0) from the file's B, rescaled from alpha 8 to the recipe's alpha 4.
    for key, tensor in saved.items():
        expected = start[key] * (2.0 if ".lora_B." in key else 1.0)
        torch.testing.assert_close(tensor, expected, atol=1e-3, rtol=0)
    assert any(t.abs().max() > 0.05 for k, t in saved.items() if ".lora_B." in k)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    code = main(["fit", "--config", "tiny/lora", "--model.pretrained", str(tiny_model_dir), "--data.root", str(shapes_dir),
                 "--model.init_adapter", str(truncated), "--trainer.default_root_dir", str(tmp_path / "run2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"sdtune: error: model.init_adapter: {truncated} is not a readable .safetensors file")


def test_checkpoint_resume_overrides_the_init_weights(adapter, tiny_model_dir, shapes_dir, tmp_path):
    data = make_data(shapes_dir, tiny_model_dir)
    first = build(tiny_model_dir, **FILE_LORA)
    trainer = fit(first, data, 1, tmp_path)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    resumed = build(tiny_model_dir, adapter, **FILE_LORA)
    fit(resumed, data, 1, tmp_path, ckpt_path=str(tmp_path / "a.ckpt"))  # already at step 1: restores, trains no step
    mine, theirs = trainable(resumed), trainable(first)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(lora=LoraSettings(rank=2, alpha=8.0), text_encoder_lora=FILE_LORA["text_encoder_lora"]),
         r"UNet module \S+ has rank 4 in the file but 2 here: set model.lora.rank: 4"),
        (dict(lora=FILE_LORA["lora"], text_encoder_lora=TextEncoderLora(rank=4)),
         r"text-encoder module encoder\.layers\.\S+ has rank 2 in the file but 4 here: set model.text_encoder_lora.rank: 2"),
        (dict(lora=FILE_LORA["lora"]),
         r"has text-encoder LoRA weights but model.text_encoder_lora is null: set model.text_encoder_lora "
         r"\(e.g. --model.text_encoder_lora.rank 2\)"),
        (dict(lora=LoraSettings(rank=4, target_modules=["to_q", "to_k"]), text_encoder_lora=FILE_LORA["text_encoder_lora"]),
         r"adapts 24 UNet modules that model.lora does not target \(e.g. \S+\): add to_out.0, to_v to model.lora.target_modules"),
        (dict(lora=LoraSettings(rank=4, use_dora=True), text_encoder_lora=FILE_LORA["text_encoder_lora"]),
         "is a plain LoRA .* but model.lora.use_dora is true: set model.lora.use_dora: false"),
    ],
    ids=["unet-rank", "text-encoder-rank", "no-text-encoder-lora", "outside-targets", "dora"],
)
def test_mismatched_files_are_one_line_errors(settings, message, adapter, tiny_model_dir):
    with pytest.raises(SdtuneError, match=f"^model.init_adapter {adapter}: {message}$"):
        build(tiny_model_dir, adapter, **settings)


def test_unreadable_or_foreign_files_are_one_line_errors(tiny_model_dir, tmp_path):
    with pytest.raises(SdtuneError, match=f"^model.init_adapter: {tmp_path / 'nope'} does not exist"):
        build(tiny_model_dir, tmp_path / "nope")
    with pytest.raises(SdtuneError, match=f"has no {ADAPTER_WEIGHTS}"):
        build(tiny_model_dir, tmp_path)
    save_file({"conv_in.weight": torch.zeros(2, 2)}, tmp_path / "full.safetensors")
    with pytest.raises(SdtuneError, match="has no LoRA weights"):
        build(tiny_model_dir, tmp_path / "full.safetensors")
    save_file({"lora_unet_no_such_module.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_no_such_module.lora_up.weight": torch.zeros(8, 4)}, tmp_path / "other.safetensors")
    with pytest.raises(SdtuneError, match="^model.init_adapter .*other.safetensors: could not be loaded into this model's UNet"):
        build(tiny_model_dir, tmp_path / "other.safetensors")


def test_modules_the_file_lacks_start_untrained_with_one_warning(adapter, tiny_model_dir):
    lora = LoraSettings(rank=4, alpha=8.0, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"])
    with pytest.warns(UserWarning, match=r"model.init_adapter: 6 of the 74 adapted modules are not in .* start untrained") as record:
        model = build(tiny_model_dir, adapter, lora=lora, text_encoder_lora=FILE_LORA["text_encoder_lora"])
    assert len([w for w in record if "init_adapter" in str(w.message)]) == 1
    untouched = {n: p for n, p in model.unet.named_parameters() if "proj_in.lora_B" in n}
    assert len(untouched) == 6 and all(not p.any() for p in untouched.values())

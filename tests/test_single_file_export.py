"""`sdtune export --merge --format single-file`: the whole model, adapter folded in, as one checkpoint in the original
(LDM/SGM) layout that A1111, Forge and ComfyUI load. Each file is read back by diffusers' own `from_single_file` and
draws what the base model with the LoRA draws; on full-size SD1.5, SD2.1 and SDXL architectures (built on the meta
device, no weights) diffusers recognises each file's model type from its keys, as it does for a file loaded without
configs, and its converters give back every tensor of the diffusers model."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders import single_file_utils as diffusers_single_file
from safetensors.torch import load_file
from training import trained_adapter

from sdtune.adapters.lora import LoraSettings
from sdtune.cli import main
from sdtune.export.single_file import ldm_state_dict
from sdtune.models.families import family_named

PROMPT, SEED, STEPS, SIZE = "a red circle", 3, 3, 32
PIPELINES = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
# Where each family keeps its text encoders in the file.
TEXT_PREFIXES = {"sd1": ["cond_stage_model.transformer.text_model."], "sd2": ["cond_stage_model.model."],
                 "sdxl": ["conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."]}  # fmt: skip


@pytest.fixture(params=["sd1", "sd2", "sdxl"])
def family_model(request):
    fixture = {"sd1": "tiny_model_dir", "sd2": "tiny_sd2_dir", "sdxl": "tiny_sdxl_dir"}[request.param]
    return request.param, request.getfixturevalue(fixture)


def image(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(SEED)
    out = pipe(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=generator).images[0]
    return np.asarray(out, dtype=np.float32)


def test_the_checkpoint_loads_in_from_single_file_and_draws_base_plus_lora(family_model, tmp_path):
    family, model = family_model
    adapter = trained_adapter(model, tmp_path / "adapter", std=0.05, lora=LoraSettings(rank=4, alpha=4),
                              text_encoder_lora={"rank": 4, "alpha": 4})  # fmt: skip
    out = tmp_path / "merged.safetensors"
    assert main(["export", str(adapter), "--model", str(model), "--merge", "--format", "single-file", "--dtype", "fp16",
                 "--out", str(out)]) == 0  # fmt: skip

    tensors = load_file(out)
    assert {v.dtype for v in tensors.values() if v.is_floating_point()} == {torch.float16}
    for prefix in ["model.diffusion_model.", "first_stage_model.", *TEXT_PREFIXES[family]]:
        assert any(key.startswith(prefix) for key in tensors), prefix
    assert not any("lora" in key for key in tensors)

    cls = PIPELINES[family]
    with_lora = cls.from_pretrained(str(model))
    base = image(with_lora)
    with_lora.load_lora_weights(str(adapter))
    expected = image(with_lora)
    got = image(cls.from_single_file(str(out), config=str(model), torch_dtype=torch.float32))
    assert np.abs(expected - base).mean() > 2  # the LoRA shows in the image (by 3.7 to 12.8 of 255) ...
    assert np.abs(got - expected).mean() <= 0.2  # ... and the checkpoint draws it (0.02 to 0.04: fp16 rounding)


# --- full-size architectures, on the meta device -------------------------------------------------------------------

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
# diffusers' SD2 text encoder: OpenCLIP ViT-H without its last layer (SD2 conditions on the penultimate one).
OPEN_CLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu")
OPEN_CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      hidden_act="gelu", projection_dim=1280)  # fmt: skip
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)  # fmt: skip
# The published configs' settings that differ from UNet2DConditionModel's defaults (SD1.5's layout).
UNETS = {
    "sd1": dict(cross_attention_dim=768),
    "sd2": dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
    "sdxl": dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
}  # fmt: skip
TEXT_ENCODERS = {"sd1": [CLIP_L], "sd2": [OPEN_CLIP_H], "sdxl": [CLIP_L, OPEN_CLIP_BIGG]}


def full_size(family: str) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel(**UNETS[family]), "vae": AutoencoderKL(**SD_VAE)}
        for name, config in zip(family_named(family).text_encoders, TEXT_ENCODERS[family]):
            cls = CLIPTextModelWithProjection if "projection_dim" in config else CLIPTextModel
            parts[name] = cls(CLIPTextConfig(**config))
    return parts


@pytest.mark.parametrize("family, model_type", [("sd1", "v1"), ("sd2", "v2"), ("sdxl", "xl_base")])
def test_full_size_files_are_recognised_and_converted_back_by_diffusers(family, model_type):
    parts = full_size(family)
    state = ldm_state_dict(family_named(family), parts, {"prediction_type": "epsilon"})
    # What from_single_file without config= uses to pick the model's configs (v2: SD 2.1 768-v).
    assert diffusers_single_file.infer_diffusers_model_type(state) == model_type

    def same_tensors(converted, module):
        expected = {key.removeprefix("text_model."): value for key, value in module.state_dict().items()}
        converted = {key.removeprefix("text_model."): value for key, value in converted.items() if "position_ids" not in key}
        assert converted.keys() == expected.keys()
        assert all(converted[key].shape == expected[key].shape for key in expected)

    same_tensors(diffusers_single_file.convert_ldm_unet_checkpoint(state, dict(parts["unet"].config)), parts["unet"])
    same_tensors(diffusers_single_file.convert_ldm_vae_checkpoint(state, dict(parts["vae"].config)), parts["vae"])
    if family == "sd1":
        same_tensors(diffusers_single_file.convert_ldm_clip_checkpoint(state), parts["text_encoder"])
    if family == "sd2":
        same_tensors(diffusers_single_file.convert_open_clip_checkpoint(parts["text_encoder"], state), parts["text_encoder"])
    if family == "sdxl":
        same_tensors(diffusers_single_file.convert_ldm_clip_checkpoint(state), parts["text_encoder"])
        bigg = diffusers_single_file.convert_open_clip_checkpoint(parts["text_encoder_2"], state, "conditioner.embedders.1.model.")
        same_tensors(bigg, parts["text_encoder_2"])
        # A v-prediction SDXL carries the marker ComfyUI reads (SGM files have no other place for it).
        assert "v_pred" not in state and "v_pred" in ldm_state_dict(family_named(family), parts, {"prediction_type": "v_prediction"})


def test_families_without_an_original_layout_are_refused_in_one_line(tiny_sd3_dir, tmp_path, capsys):
    adapter = trained_adapter(tiny_sd3_dir, tmp_path / "adapter", lora=LoraSettings(rank=2))
    out = tmp_path / "sd3.safetensors"
    capsys.readouterr()
    assert main(["export", str(adapter), "--model", str(tiny_sd3_dir), "--merge", "--format", "single-file", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sdtune: error: SD3 has no original single-file layout (SD1, SD2, SDXL have one); export it with --merge as a diffusers folder"]
    assert not list(tmp_path.glob("*.safetensors*"))

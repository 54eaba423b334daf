"""`sdtune inspect`: files written by sdtune's own exporters (kohya, diffusers, peft), hand-built LyCORIS files, a
single-file checkpoint, embeddings, run directories and damaged files. Expected formats, families, ranks and alphas
come from how each file was made."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from training import perturbed, trained_adapter, write_single_file

from sdtune.adapters.lora import LoraSettings, TextEncoderLora
from sdtune.adapters.new_tokens import save_embeddings
from sdtune.cli import main

UNET = LoraSettings(rank=4, alpha=2.0, conv_rank=2, conv_alpha=6.0)
TEXT = TextEncoderLora(rank=2, alpha=4.0)
# (rank, alpha, scale) of the UNet's attention and conv layers, and of the text encoder's.
UNET_PAIRS = {(UNET.rank, UNET.alpha, UNET.alpha / UNET.rank), (UNET.conv_rank, UNET.conv_alpha, UNET.conv_alpha / UNET.conv_rank)}
TEXT_PAIRS = {(TEXT.rank, TEXT.alpha, TEXT.alpha / TEXT.rank)}


@pytest.fixture(scope="module")
def files(tiny_model_dir, tmp_path_factory):
    """One LoCon + text-encoder adapter in the three formats `sdtune export` writes."""
    root = tmp_path_factory.mktemp("inspect")
    adapter = trained_adapter(tiny_model_dir, root / "adapter", std=0.05, lora=UNET, text_encoder_lora=TEXT)
    kohya, peft = root / "lora.safetensors", root / "peft"
    for fmt, out in (("kohya", kohya), ("peft", peft)):
        assert main(["export", str(adapter), "--model", str(tiny_model_dir), "--format", fmt, "--out", str(out)]) == 0
    return {"diffusers": adapter, "kohya": kohya, "peft": peft}


def inspected(path, capsys) -> dict:
    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def by_component(report) -> dict:
    return {part["component"]: part for part in report["adapted"]}


def expected_layers(adapter) -> dict[str, tuple[int, int]]:
    """(layers, conv layers wider than 1×1) per component prefix of the diffusers file, from its own tensors."""
    tensors = load_file(adapter / "pytorch_lora_weights.safetensors")
    out = {}
    for key, value in tensors.items():
        if key.endswith(".lora_A.weight"):
            layers, conv = out.get(key.split(".")[0], (0, 0))
            out[key.split(".")[0]] = (layers + 1, conv + (value.dim() == 4 and value.shape[2:] != (1, 1)))
    return out


def rank_alpha(part) -> set[tuple]:
    return {(p["rank"], p["alpha"], p["scale"]) for p in part["rank_alpha"]}


def test_kohya_locon_export(files, capsys):
    report = inspected(files["kohya"], capsys)
    assert report["format"].startswith("kohya LoCon")
    assert report["family"] == "SD1" and "sd_v1" in report["family_reason"]  # the tiny model's widths are no SD's
    parts, layers = by_component(report), expected_layers(files["diffusers"])
    assert parts["UNet"]["layers"] == layers["unet"][0] and parts["UNet"]["conv_layers"] == layers["unet"][1] > 0
    assert rank_alpha(parts["UNet"]) == UNET_PAIRS
    assert rank_alpha(parts["text encoder"]) == TEXT_PAIRS
    assert parts["text encoder"]["layers"] == layers["text_encoder"][0]
    assert set(parts["UNet"]["blocks"]) == {"down", "mid", "up"}
    assert report["readers"]["A1111 / Forge"].startswith("yes") and report["readers"]["ComfyUI"].startswith("yes")
    assert report["metadata"]["base model version"] == "sd_v1"


def test_diffusers_adapter_says_a1111_and_comfyui_do_not_read_its_unet(files, capsys):
    report = inspected(files["diffusers"], capsys)
    assert report["format"].startswith("diffusers LoRA") and report["dtypes"] == {"F32": sum(n for n, _ in expected_layers(files["diffusers"]).values()) * 2}
    assert report["family"] == "unknown" and "width 32" in report["family_reason"]  # tiny: not 768, 1024 or 2048
    parts, layers = by_component(report), expected_layers(files["diffusers"])
    assert parts["UNet"]["layers"] == layers["unet"][0] and parts["text encoder"]["layers"] == layers["text_encoder"][0]
    assert rank_alpha(parts["UNet"]) == UNET_PAIRS
    assert rank_alpha(parts["text encoder"]) == TEXT_PAIRS
    assert report["readers"]["A1111 / Forge"].startswith("no")
    assert report["readers"]["ComfyUI"].startswith("partly") and "UNet keys are NOT loaded" in report["readers"]["ComfyUI"]
    capsys.readouterr()
    assert main(["inspect", str(files["diffusers"])]) == 0
    text = capsys.readouterr().out
    assert "UNet keys are NOT loaded" in text and f"rank {UNET.rank} alpha {UNET.alpha:g} → scale {UNET.alpha / UNET.rank:g}" in text


def test_peft_folder(files, capsys):
    report = inspected(files["peft"], capsys)
    assert report["format"].startswith("peft adapter") and "folder" in report["format"]
    parts, layers = by_component(report), expected_layers(files["diffusers"])
    assert parts["UNet"]["layers"] == layers["unet"][0] and parts["text encoder"]["layers"] == layers["text_encoder"][0]
    assert rank_alpha(parts["UNet"]) == UNET_PAIRS
    assert rank_alpha(parts["text encoder"]) == TEXT_PAIRS
    assert report["readers"]["peft PeftModel.from_pretrained"].startswith("yes")
    assert report["readers"]["diffusers load_lora_weights"].startswith("no: it takes the file without an error and attaches nothing")


def test_diffusers_attaches_nothing_from_a_peft_file_as_inspect_says(files, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    pipe.load_lora_weights(str(files["peft"]), weight_name="adapter_model.safetensors")
    assert not any("lora_" in name for name, _ in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()])


def test_a_run_directory_reports_its_adapter_and_training(files, tmp_path, capsys):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").write_bytes((files["diffusers"] / "pytorch_lora_weights.safetensors").read_bytes())
    config = {"model": {"class_path": "sdtune.finetune.LoRAFineTune", "init_args": {"pretrained": "some/model"}},
              "data": {"init_args": {"resolution": 48, "subsets": [{"root": "x", "prefix": "sks"}]}}, "trainer": {"max_steps": 7}}  # fmt: skip
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    report = inspected(tmp_path, capsys)
    assert report["format"].startswith("sdtune run directory") and "diffusers LoRA" in report["format"]
    assert report["metadata"]["trigger words"] == "sks" and report["metadata"]["steps"] == "7"
    assert report["metadata"]["base model"] == "some/model" and report["metadata"]["resolution"] == "48"


def lycoris(kind: str, rank: int, alpha: float, width: int = 64, out: int = 320) -> dict[str, torch.Tensor]:
    """A LyCORIS file with its key names: an attention layer of the UNet (`width` → `out`) and one of the text
    encoder (the same shapes)."""
    tensors = {}
    for name in ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", "lora_te_text_model_encoder_layers_0_self_attn_q_proj"):
        if kind == "loha":
            tensors |= {f"{name}.hada_w1_a": torch.randn(out, rank), f"{name}.hada_w1_b": torch.randn(rank, width),
                        f"{name}.hada_w2_a": torch.randn(out, rank), f"{name}.hada_w2_b": torch.randn(rank, width)}  # fmt: skip
        else:
            tensors |= {f"{name}.lokr_w1": torch.randn(4, 4), f"{name}.lokr_w2_a": torch.randn(out // 4, rank),
                        f"{name}.lokr_w2_b": torch.randn(rank, width // 4)}  # fmt: skip
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.bfloat16)
    return tensors


@pytest.mark.parametrize("kind, width, family", [("loha", 768, "SD1"), ("lokr", 1024, "SD2")])
def test_lycoris_files(kind, width, family, tmp_path, capsys):
    path = tmp_path / f"{kind}.safetensors"
    tags = {"10_sks dog": {"sks dog": 20, "outdoors": 3, "grass": 5}}
    meta = {"ss_tag_frequency": json.dumps(tags), "ss_num_epochs": "10", "ss_sd_model_name": "v1-5-pruned.safetensors",
            "ss_training_started_at": "1700000000.5", "ss_learning_rate": "0.0001"}  # fmt: skip
    save_file(lycoris(kind, rank=8, alpha=3.0, width=width), str(path), metadata=meta)
    report = inspected(path, capsys)
    assert report["metadata"]["trigger words"] == "sks dog, grass, outdoors"  # by frequency
    assert report["metadata"]["training started"] == "2023-11-14T22:13:20+00:00" and report["metadata"]["epochs"] == "10"
    assert report["metadata"]["base model"] == "v1-5-pruned.safetensors" and report["metadata"]["learning rate"] == "0.0001"
    assert report["format"].startswith({"loha": "LyCORIS LoHa", "lokr": "LyCORIS LoKr"}[kind])
    if kind == "loha":
        assert report["family"] == family and str(width) in report["family_reason"]
    parts = by_component(report)
    assert set(parts) == {"UNet", "text encoder"} and rank_alpha(parts["UNet"]) == {(8, 3.0, 3.0 / 8)}
    assert parts["UNet"]["layers"] == parts["text encoder"]["layers"] == 1
    assert report["readers"]["diffusers load_lora_weights"].startswith("no")


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_diffusers_refuses_lycoris_files_as_inspect_says(kind, tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    to_k = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k
    save_file(lycoris(kind, rank=2, alpha=2.0, width=to_k.in_features, out=to_k.out_features), str(tmp_path / "l.safetensors"))
    with pytest.raises(ValueError, match="not been correctly renamed"):  # its kohya converter knows LoRA keys only
        pipe.load_lora_weights(str(tmp_path), weight_name="l.safetensors")


@pytest.mark.parametrize("width, family", [(768, "SD1"), (1024, "SD2"), (2048, "SDXL")])
def test_family_from_the_cross_attention_width(width, family, tmp_path, capsys):
    path = tmp_path / "lora.safetensors"
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file({f"{key}.lora_A.weight": torch.zeros(4, width), f"{key}.lora_B.weight": torch.zeros(640, 4)}, str(path))
    report = inspected(path, capsys)
    assert report["family"] == family and f"width {width}" in report["family_reason"]
    assert rank_alpha(by_component(report)["UNet"]) == {(4, None, 1.0)}  # no alpha stored: readers take alpha = rank


def test_sdxl_kohya_export(tiny_sdxl_dir, tmp_path, capsys):
    from sdtune.finetune import LoRAFineTune

    module = LoRAFineTune(str(tiny_sdxl_dir), lora=LoraSettings(rank=4, alpha=8.0), text_encoder_lora=TextEncoderLora(rank=2, alpha=2.0))
    perturbed(module, std=0.05).save_weights(tmp_path / "adapter")
    out = tmp_path / "sdxl.safetensors"
    assert main(["export", str(tmp_path / "adapter"), "--model", str(tiny_sdxl_dir), "--format", "kohya", "--out", str(out)]) == 0
    report = inspected(out, capsys)
    assert report["format"].startswith("kohya LoRA") and report["family"] == "SDXL" and "two text encoders" in report["family_reason"]
    parts = by_component(report)
    assert set(parts) == {"UNet", "text encoder 1", "text encoder 2"}
    assert rank_alpha(parts["UNet"]) == {(4, 8.0, 2.0)} and rank_alpha(parts["text encoder 2"]) == {(2, 2.0, 1.0)}


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_sd1_single_file_checkpoint(suffix, tiny_model_dir, tmp_path, capsys):
    path = write_single_file(tiny_model_dir, tmp_path / f"model{suffix}")
    report = inspected(path, capsys)
    assert report["format"].startswith("single-file checkpoint")
    assert report["family"] == "SD1" and "cond_stage_model.transformer" in report["family_reason"]
    assert report["readers"]["diffusers from_single_file"] == "yes" and report["layers"] == []
    assert report["metadata"]["parts"] == "UNet or transformer, VAE, text encoder(s)"


def test_a_training_checkpoint_is_named_without_unpickling(tmp_path, capsys):
    path = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": {"_class_path": "sdtune.finetune.LoRAFineTune"}, "state_dict": {}, "global_step": 3}, path)
    report = inspected(path, capsys)
    assert report["format"] == "sdtune training checkpoint (LoRAFineTune)"
    assert report["readers"]["sdtune export CKPT"].startswith("yes")


def test_embeddings(tmp_path, capsys):
    written = save_embeddings(tmp_path, ["<sks>"], torch.randn(1, 768))
    for path in written:
        report = inspected(path, capsys)
        assert report["format"] == "textual-inversion embedding" and report["family"] == "SD1"
        assert report["metadata"]["token"] == "<sks>"
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(tmp_path / "xl.safetensors"))
    assert inspected(tmp_path / "xl.safetensors", capsys)["family"] == "SDXL"
    torch.save({"string_to_param": {"*": torch.randn(1, 768)}, "name": "sks"}, tmp_path / "sks.pt")  # A1111's own
    assert inspected(tmp_path / "sks.pt", capsys)["format"].startswith("textual-inversion embedding (A1111 .pt")


def test_a_diffusers_pipeline_folder(tiny_sdxl_dir, capsys):
    report = inspected(tiny_sdxl_dir, capsys)
    assert report["format"].startswith("diffusers pipeline") and report["family"] == "SDXL"


def damaged(tmp_path, adapter):
    whole = (adapter / "pytorch_lora_weights.safetensors").read_bytes()
    cases = {"truncated.safetensors": whole[: len(whole) // 2], "random.safetensors": bytes(range(256)) * 40,
             "image.safetensors": b"\x89PNG\r\n\x1a\n" + bytes(100), "empty.safetensors": b"",
             "text.safetensors": b"hello world, this is not a model", "random.ckpt": bytes(range(256)) * 4}  # fmt: skip
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("no model here")
    return [*cases, "folder", "missing.safetensors"]


def test_unknown_or_damaged_files_are_one_line(files, tmp_path, capsys):
    for name in damaged(tmp_path, files["diffusers"]):
        capsys.readouterr()
        assert main(["inspect", str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("sdtune: error: ") and name in err, err


def test_inspect_reads_headers_without_torch(files):
    """A fresh process answers without importing torch (the file's tensors are never read)."""
    code = f"import sys; from sdtune.cli import main; main(['inspect', {str(files['kohya'])!r}]); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False" and "kohya LoCon" in result.stdout


def test_the_family_comes_from_a_local_base_model_when_the_file_does_not_tell(tiny_sdxl_dir, tmp_path, capsys):
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    (tmp_path / "adapter").mkdir()
    save_file({f"{key}.lora_A.weight": torch.zeros(4, 80), f"{key}.lora_B.weight": torch.zeros(64, 4)},
              str(tmp_path / "adapter" / "pytorch_lora_weights.safetensors"))  # fmt: skip
    (tmp_path / "config.yaml").write_text(json.dumps({"model": {"init_args": {"pretrained": str(tiny_sdxl_dir)}}}))
    assert inspected(tmp_path / "adapter", capsys)["family"] == "unknown"  # width 80 alone says nothing
    report = inspected(tmp_path, capsys)
    assert report["family"] == "SDXL" and "StableDiffusionXLPipeline" in report["family_reason"]


def test_a_kohya_flux_file(tmp_path, capsys):
    """kohya's Flux names (sdtune.adapters.kohya_flux writes them for Flux.1-sized transformers)."""
    from sdtune.adapters.kohya_flux import kohya_name

    tensors = {}
    for module in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.3.proj_out"):
        name = f"lora_unet_{kohya_name(module)[0]}"
        tensors |= {f"{name}.lora_down.weight": torch.zeros(16, 3072), f"{name}.lora_up.weight": torch.zeros(3072, 16),
                    f"{name}.alpha": torch.tensor(8.0)}  # fmt: skip
    save_file(tensors, str(tmp_path / "flux.safetensors"))
    report = inspected(tmp_path / "flux.safetensors", capsys)
    assert report["format"].startswith("kohya Flux LoRA") and report["family"] == "Flux"
    (part,) = report["adapted"]
    assert part["component"] == "transformer" and part["blocks"] == {"double/joint": 1, "single": 1}
    assert rank_alpha(part) == {(16, 8.0, 0.5)} and report["readers"]["A1111"].startswith("no")

"""`sdtune prep caption`: a tiny random BLIP (built here, saved, loaded back through the command's loader) fills
empty captions; existing ones change only with --overwrite; metadata keys and order survive; images are untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_prep import caption as caption_tool
from data_prep.caption import caption_dataset, load_captioner
from sdtune.cli import main

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "cat", "dog", "red", "blue",
         "green", "circle", "square", "triangle", "on", "in", "with", "and", "tree", "car", "house", "sky", "white",
         "black", "small", "big", "sitting", "table", "grass", "field", "man", "woman", "picture"]


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    """A randomly initialised BLIP captioner (hidden 32, 1 layer, 32-px images) with a BERT word-piece tokenizer and
    the PIL image processor (torchvision is not installed), saved the way Hub checkpoints are."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    out = tmp_path_factory.mktemp("models") / "tiny-blip"
    vocab = out.parent / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=BertTokenizer(str(vocab), model_max_length=64),
    )
    text = dict(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=37, max_position_embeddings=64, bos_token_id=2, sep_token_id=3, pad_token_id=0,
                eos_token_id=3)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32,
                  patch_size=16)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def write_dst(root: Path) -> Path:
    """Four images; rows 0 and 2 have empty captions, every row carries build's extra keys."""
    root.mkdir(parents=True)
    rows = []
    for i, (size, text) in enumerate([((64, 48), ""), ((40, 40), "an existing caption"), ((48, 64), "  "),
                                      ((32, 32), "another one")]):
        name = f"img/{i}.png"
        (root / "img").mkdir(exist_ok=True)
        Image.new("RGB", size, (60 * i, 255 - 60 * i, 128)).save(root / name)
        rows.append({"file_name": name, "text": text, "source": f"src/{i}.jpg", "bucket": "512x512",
                     "width": size[0], "height": size[1], "extra": [i, "kept"]})
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def read_rows(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.png")}


def test_loader_reads_back_the_saved_blip(blip_dir):
    processor, model = load_captioner(str(blip_dir), device="cpu")
    assert type(model).__name__ == "BlipForConditionalGeneration" and not model.training
    assert type(processor.image_processor).__name__ == "BlipImageProcessorPil"
    assert processor.tokenizer.convert_ids_to_tokens([9, 10]) == ["cat", "dog"]


def test_cli_fills_only_empty_captions_and_keeps_everything_else(tmp_path, blip_dir, capsys):
    dst = write_dst(tmp_path / "dst")
    before_rows, before_images = read_rows(dst), snapshot(dst)

    code = main(["prep", "caption", str(dst), "--model", str(blip_dir), "--prefix", "sks dog", "--batch-size", "1",
                 "--max-new-tokens", "8", "--device", "cpu"])

    assert code == 0
    assert "filled 2 empty caption(s), replaced 0, skipped 2" in capsys.readouterr().out
    after = read_rows(dst)
    assert [row["file_name"] for row in after] == [row["file_name"] for row in before_rows]  # order kept
    for old, new in zip(before_rows, after):
        assert {k: v for k, v in new.items() if k != "text"} == {k: v for k, v in old.items() if k != "text"}
    for i in (0, 2):
        assert after[i]["text"].startswith("sks dog, ")
        words = after[i]["text"].removeprefix("sks dog, ").split()
        assert words and all(word in WORDS for word in words)  # real generated text from the model's vocabulary
    assert [after[1]["text"], after[3]["text"]] == ["an existing caption", "another one"]
    assert snapshot(dst) == before_images  # images byte-identical
    assert sorted(p.name for p in dst.iterdir()) == ["img", "metadata.jsonl"]  # no temporary file left behind


def test_overwrite_replaces_existing_captions_and_prompt_is_continued(tmp_path, blip_dir):
    dst = write_dst(tmp_path / "dst")
    images = snapshot(dst)

    result = caption_dataset(dst, str(blip_dir), overwrite=True, prompt="a photo of", batch_size=3,
                             max_new_tokens=6, device="cpu", progress=False)

    assert (result.filled, result.replaced, result.skipped, result.failed) == (2, 2, 0, [])
    texts = [row["text"] for row in read_rows(dst)]
    assert all(text.startswith("a photo of") and len(text.split()) > 3 for text in texts)
    assert "an existing caption" not in texts and "another one" not in texts
    assert snapshot(dst) == images


def test_nothing_to_caption_leaves_the_file_alone(tmp_path, blip_dir, monkeypatch):
    dst = write_dst(tmp_path / "dst")
    rows = read_rows(dst)
    rows[0]["text"] = rows[2]["text"] = "done"
    (dst / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    before = (dst / "metadata.jsonl").read_bytes()
    monkeypatch.setattr(caption_tool, "load_captioner", lambda *a: pytest.fail("model loaded for nothing"))

    result = caption_dataset(dst, str(blip_dir), progress=False)

    assert (result.filled, result.skipped) == (0, 4)
    assert (dst / "metadata.jsonl").read_bytes() == before


def test_an_interruption_keeps_the_captions_already_written(tmp_path, blip_dir, monkeypatch):
    dst = write_dst(tmp_path / "dst")
    real = caption_tool.generate_captions
    calls = []

    def generate_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(caption_tool, "generate_captions", generate_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        caption_dataset(dst, str(blip_dir), batch_size=1, max_new_tokens=4, device="cpu", progress=False)

    rows = read_rows(dst)  # still valid JSON lines, all four rows
    assert len(rows) == 4 and rows[0]["text"] and rows[2]["text"] == "  "
    assert sorted(p.name for p in dst.iterdir()) == ["img", "metadata.jsonl"]


def test_missing_model_is_a_one_line_error(tmp_path, capsys):
    dst = write_dst(tmp_path / "dst")
    before = (dst / "metadata.jsonl").read_bytes()

    assert main(["prep", "caption", str(dst), "--model", str(tmp_path / "no-such-model")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sdtune: error: caption --model '{tmp_path / 'no-such-model'}' does not exist (not a local directory nor a Hub id 'org/name')"

    # A Hub id that is not in the cache, with HF_HUB_OFFLINE=1 (set in conftest): one line naming the cause.
    assert main(["prep", "caption", str(dst), "--model", "sdtune-test/not-a-cached-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HF_HUB_OFFLINE" in err and "sdtune-test/not-a-cached-model" in err
    assert (dst / "metadata.jsonl").read_bytes() == before


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit):
        main(["prep", "caption", "--help"])
    out = capsys.readouterr().out
    assert "sdtune prep caption data/my_dog --model" in out and "--overwrite" in out and "--prefix" in out

"""Long prompts: AUTOMATIC1111-style 75-token windows, and the DataModule's truncation warning."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from sdtune.data import CaptionDataModule, Subset
from sdtune.errors import SdtuneError
from sdtune.models.text import tokenize_chunks
from sdtune.models.tiny import write_tokenizer

WORDS = "red circle blue square"  # one token per word in the tiny vocabulary


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> CLIPTokenizer:
    path = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(path)
    return CLIPTokenizer.from_pretrained(path)


def words(count: int) -> str:
    """A caption of exactly `count` tokens."""
    return " ".join((WORDS.split() * count)[:count])


@pytest.mark.parametrize("count", [0, 3, 75, 76, 200])
def test_one_chunk_is_exactly_the_plain_padded_tokenizer_output(tokenizer, count):
    caption = words(count)
    assert len(tokenizer(caption, add_special_tokens=False).input_ids) == count
    ids, truncated = tokenize_chunks(tokenizer, caption, 75)
    expected = tokenizer(caption, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert torch.equal(ids, expected) and truncated == (count > 75)


def test_long_caption_is_split_into_bos_window_eos_rows(tokenizer):
    caption = words(100)
    text = tokenizer(caption, add_special_tokens=False).input_ids
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, truncated = tokenize_chunks(tokenizer, caption, 225)

    assert ids.shape == (3, 77) and not truncated
    assert ids[0].tolist() == [bos, *text[:75], eos]
    assert ids[1].tolist() == [bos, *text[75:], eos] + [pad] * 50
    assert ids[2].tolist() == [bos, eos] + [pad] * 75  # an empty window is still a full row
    assert tokenize_chunks(tokenizer, words(151), 150)[1] and not tokenize_chunks(tokenizer, words(150), 150)[1]


@pytest.mark.parametrize("value", [100, 0, -75])
def test_max_tokens_must_be_a_multiple_of_the_window(tokenizer, value):
    with pytest.raises(SdtuneError) as caught:
        tokenize_chunks(tokenizer, "red", value)
    assert str(caught.value) == f"data.max_token_length must be a multiple of 75 (75, 150, 225), got {value}"


def test_window_follows_the_tokenizer_length(tokenizer):
    tokenizer.model_max_length = 12  # nothing may assume 77
    try:
        ids, truncated = tokenize_chunks(tokenizer, words(25), 20)
        assert ids.shape == (2, 12) and truncated
        with pytest.raises(SdtuneError, match=r"multiple of 10 \(10, 20, 30\), got 75"):
            tokenize_chunks(tokenizer, "red", 75)
    finally:
        tokenizer.model_max_length = 77


def folder(root: Path, token_counts: list[int]) -> Path:
    root.mkdir(parents=True)
    for i, count in enumerate(token_counts):
        Image.new("RGB", (8, 8), "red").save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(words(count))
    return root


def test_datamodule_warns_once_about_long_captions_counting_the_prefix(tmp_path, tiny_model_dir):
    # 74 tokens fit alone, but "sks, " adds two; 140 needs two windows.
    root = folder(tmp_path / "images", [10, 74, 140, 5])
    dm = CaptionDataModule(
        subsets=[Subset(str(root), repeats=3, prefix="sks")], resolution=8, batch_size=12,
        pretrained=str(tiny_model_dir),
    )  # fmt: skip
    with pytest.warns(UserWarning) as caught:
        dm.setup("fit")
    messages = [str(w.message) for w in caught if "captions are longer" in str(w.message)]
    assert messages == [
        f"2 of 4 captions are longer than 75 tokens and will be truncated (first: {root / '1.png'}); "
        "raise data.max_token_length to 150 to keep them whole"
    ]
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (12, 1, 77)


def test_datamodule_with_150_tokens_gives_two_windows_and_no_warning(tmp_path, tiny_model_dir):
    root = folder(tmp_path / "images", [10, 140])
    dm = CaptionDataModule(str(root), resolution=8, batch_size=2, max_token_length=150, pretrained=str(tiny_model_dir))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    assert not [w for w in caught if "captions are longer" in str(w.message)]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 2, 77)
    long_row = batch["input_ids"][[c == words(140) for c in batch["caption"]].index(True)]
    assert long_row[1, 1].item() != dm.tokenizer.eos_token_id  # the second window holds text, not just BOS EOS


def test_datamodule_rejects_a_length_that_is_not_a_multiple(tmp_path, tiny_model_dir):
    dm = CaptionDataModule(str(folder(tmp_path / "images", [3])), max_token_length=100, pretrained=str(tiny_model_dir))
    with pytest.raises(SdtuneError, match=r"^data.max_token_length must be a multiple of 75 \(75, 150, 225\), got 100"):
        dm.setup("fit")

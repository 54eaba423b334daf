"""Tag-style caption augmentation: shuffling, keep_tokens, tag dropout and the subset prefix."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from sdtune.data import CaptionDataset, process_caption
from sdtune.data.records import Record
from sdtune.models.tiny import write_tokenizer

TAGS = [f"tag{i}" for i in range(12)]
CAPTION = ", ".join(TAGS)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("caption", ["A photo of a dog,  on grass ,,", "  spaced   words ", ""])
def test_all_options_off_keeps_the_caption_byte_identical(caption):
    assert process_caption(caption, generator=gen(0)) == caption
    assert process_caption(caption) == caption


def test_prefix_is_the_first_tag_and_survives_shuffle_and_dropout():
    assert process_caption("a dog", prefix="sks", generator=gen(0)) == "sks, a dog"
    assert process_caption("", prefix=" sks ", generator=gen(0)) == "sks"
    for seed in range(20):
        shuffled = process_caption(CAPTION, prefix="sks", shuffle_tags=True, generator=gen(seed))
        assert shuffled.split(", ")[0] == "sks" and sorted(shuffled.split(", ")[1:]) == sorted(TAGS)
        assert process_caption(CAPTION, prefix="sks", tag_dropout=1.0, generator=gen(seed)) == "sks"


def test_shuffle_keeps_the_first_keep_tokens_tags_and_permutes_the_rest():
    results = [
        process_caption(" tag0 ,tag1,, " + ", ".join(TAGS[2:]), shuffle_tags=True, keep_tokens=2, generator=gen(s))
        for s in range(30)
    ]
    for result in results:
        tags = result.split(", ")
        assert tags[:2] == ["tag0", "tag1"] and sorted(tags) == sorted(TAGS)  # stripped, empties dropped
    assert len(set(results)) > 20  # really shuffled, and by the generator
    assert results[3] == process_caption(", ".join(TAGS), shuffle_tags=True, keep_tokens=2, generator=gen(3))


def test_tag_dropout_rate_spares_kept_tags_and_is_independent_of_shuffling():
    dropped = 0
    for seed in range(200):
        plain = process_caption(CAPTION, keep_tokens=3, tag_dropout=0.3, generator=gen(seed)).split(", ")
        shuffled = process_caption(CAPTION, keep_tokens=3, tag_dropout=0.3, shuffle_tags=True, generator=gen(seed))
        order_only = process_caption(CAPTION, keep_tokens=3, shuffle_tags=True, generator=gen(seed)).split(", ")
        assert plain[:3] == TAGS[:3]
        assert plain == [t for t in TAGS if t in plain]  # without shuffling the written order is kept
        # Same generator: shuffling does not change which tags drop, dropout does not change the order.
        assert shuffled.split(", ") == [t for t in order_only if t in plain]
        dropped += len(TAGS) - len(plain)
    assert 0.25 < dropped / (200 * 9) < 0.35


def test_generator_is_required_for_random_options():
    with pytest.raises(ValueError, match="Generator"):
        process_caption(CAPTION, shuffle_tags=True)


def test_dataset_tag_options_change_captions_but_no_image_or_dropout_draw(tmp_path):
    write_tokenizer(tmp_path / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    image = Image.new("RGB", (30, 10))
    image.putdata([(8 * x, 0, 0) for _ in range(10) for x in range(30)])
    image.save(tmp_path / "ramp.png")
    records = [Record(str(tmp_path / "ramp.png"), CAPTION, prefix="sks") for _ in range(40)]

    def samples(**tags) -> list[dict]:
        dataset = CaptionDataset(records, tokenizer, 8, random_flip=True, caption_dropout=0.3, seed=1, **tags)
        return [dataset[(2, i)] for i in range(40)]

    plain, tagged = samples(), samples(shuffle_tags=True, keep_tokens=1, tag_dropout=0.2)
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(plain, tagged))
    assert [a["caption"] == "" for a in plain] == [b["caption"] == "" for b in tagged]
    assert all(a["caption"] in ("", f"sks, {CAPTION}") for a in plain)
    kept = [b["caption"] for b in tagged if b["caption"]]
    assert all(c.startswith("sks, tag0") for c in kept) and len(set(kept)) == len(kept)
    plain_dataset = CaptionDataset(records, tokenizer, 8)
    assert all(torch.equal(b["input_ids"], plain_dataset.tokenize(b["caption"])["input_ids"]) for b in tagged)

"""An image that fails to load during training is replaced by the next readable image of its size, warned about
once and counted; the run goes on (and every batch keeps its size, so DDP ranks stay in step)."""

from __future__ import annotations

import shutil
import warnings

import pytest
from PIL import Image
from test_optimization import make_model
from training import fit, make_data
from transformers import CLIPTokenizer

from sdtune.data import CaptionDataset
from sdtune.data.records import Record
from sdtune.errors import SdtuneError
from sdtune.models.tiny import write_tokenizer


@pytest.fixture
def tokenizer(tmp_path) -> CLIPTokenizer:
    write_tokenizer(tmp_path / "tokenizer")
    return CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")


def truncated_png(path, size=(24, 16)):
    Image.new("RGB", size, "blue").save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header still reads; decoding fails
    return path


def test_an_unreadable_image_is_replaced_by_the_next_one_of_its_size(tmp_path, tokenizer):
    paths = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png", tmp_path / "d.png"]
    Image.new("RGB", (24, 16), "red").save(paths[0])
    truncated_png(paths[1])
    Image.new("RGB", (16, 24), "green").save(paths[2])  # another bucket: not a stand-in for b
    Image.new("RGB", (24, 16), "white").save(paths[3])
    records = [Record(str(p), p.stem) for p in paths]
    buckets = [(16, 8), (16, 8), (8, 16), (16, 8)]
    dataset = CaptionDataset(records, tokenizer, 8, center_crop=True, buckets=buckets)
    sample = dataset[(3, 1)]
    assert sample["path"] == str(paths[3]) and sample["caption"] == "d"
    assert sample["unreadable"].startswith(f"image '{paths[1]}' could not be read")
    assert sample["pixel_values"].shape == (3, 8, 16)
    assert sample["sample_key"] == (3, 1) and dataset[(3, 3)]["sample_key"] == (3, 3)  # d's noise is not reused
    assert "unreadable" not in dataset[(3, 0)]
    alone = CaptionDataset([records[1]], tokenizer, 8)
    with pytest.raises(SdtuneError, match=r"b.png' could not be read .*nor could any other image of its size"):
        alone[0]


def test_training_goes_on_past_an_unreadable_image(tiny_model_dir, shapes_dir, tmp_path):
    data_dir = tmp_path / "shapes"
    shutil.copytree(shapes_dir, data_dir)
    broken = sorted(data_dir.glob("*.png"))[2]
    truncated_png(broken, size=(64, 64))
    dm = make_data(data_dir, tiny_model_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(make_model(tiny_model_dir), dm, 8, tmp_path)  # two epochs of 4 batches
    messages = [str(w.message) for w in caught]
    once = [m for m in messages if m.endswith("trained on the next image of its size instead")]
    assert len(once) == 1 and str(broken) in once[0]
    assert dm.unreadable == {once[0].removesuffix("; trained on the next image of its size instead"): 2}
    assert any(m.startswith("1 image(s) could not be read and were replaced 2 time(s) in all") for m in messages)

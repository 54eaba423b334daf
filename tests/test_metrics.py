"""CLIP score on a tiny random CLIP saved and loaded like a real one."""

import pytest
import torch
from PIL import Image
from tiny_clip import build_tiny_clip

from sdtune.errors import SdtuneError
from sdtune.inference.metrics import clip_scores, load_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return load_clip(str(build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")))


def images():
    return [Image.new("RGB", (48, 48), (255, 0, 0)), Image.effect_noise((48, 48), 60).convert("RGB")]


def test_clip_score_is_100_times_the_models_own_cosine(clip):
    model, processor = clip
    prompts = ["a red circle", "a blue square"]
    scores = clip_scores(model, processor, images(), prompts)
    with torch.no_grad():
        inputs = processor(text=prompts, images=images(), return_tensors="pt", padding=True)
        logits = model(**inputs).logits_per_image / model.logit_scale.exp()  # cosine matrix
    expected = (100 * logits.diagonal().clamp_min(0)).tolist()
    assert scores == pytest.approx(expected, rel=1e-5)
    raw = logits.diagonal()
    assert raw[0] != pytest.approx(raw[1].item())  # the pairs are scored separately
    assert all(s == 0 for s, r in zip(scores, raw) if r < 0)  # negative similarity is clamped to 0


def test_clip_score_is_deterministic_and_checks_its_inputs(clip):
    model, processor = clip
    first = clip_scores(model, processor, images(), ["a red circle"] * 2)
    assert first == clip_scores(model, processor, images(), ["a red circle"] * 2)
    assert all(0 <= s <= 100 for s in first)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        clip_scores(model, processor, images(), ["a red circle"])


def test_missing_clip_model_is_one_line(tmp_path):
    with pytest.raises(SdtuneError, match="--clip-model .* could not be loaded") as error:
        load_clip(str(tmp_path / "nothing"))
    assert "\n" not in str(error.value)

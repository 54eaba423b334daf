"""A tiny random CLIP (model + processor) saved like a real one, for CLIP-score tests."""

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from sdtune.models.tiny import TOKENIZER_FILES


def build_tiny_clip(out: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_FILES)
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(vocab_size=tokenizer.vocab_size, max_position_embeddings=77, **layers),
        vision_config=dict(image_size=32, patch_size=8, **layers),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(out)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out

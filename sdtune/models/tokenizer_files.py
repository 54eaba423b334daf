"""Saving a CLIP tokenizer so that every reader can load it.

transformers ≥ 5 saves only tokenizer.json; transformers 4's CLIPTokenizer (what diffusers pipelines name in
model_index.json) needs vocab.json and merges.txt, as Stable Diffusion checkpoints ship them. Both are written.
"""

from __future__ import annotations

import json
from pathlib import Path


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(str(out_dir))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE":
        return
    vocab = dict(sorted(model["vocab"].items(), key=lambda item: item[1]))
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")

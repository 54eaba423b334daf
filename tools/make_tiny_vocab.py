"""Writes the vocabulary of the tiny CLIP tokenizer shipped in sdtune/models/tiny_tokenizer/.

CLIP's byte-level BPE: the 256 byte symbols, the same with the end-of-word marker, then one merge chain per word
of a small English vocabulary so that those words are single tokens, then the two special tokens. Run it again
only to change the word list: `python tools/make_tiny_vocab.py`.
"""

import json
from pathlib import Path

from sdtune.models.tiny_t5 import WORDS  # the tiny T5 tokenizer has the same words


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


OUT = Path(__file__).resolve().parent.parent / "sdtune" / "models" / "tiny_tokenizer"


def main() -> None:
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            if parts[0] not in vocab:
                vocab.append(parts[0])
    merges = list(dict.fromkeys(merges))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False, indent=0))
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"{len(vocab)} tokens, {len(merges)} merges -> {OUT}")


if __name__ == "__main__":
    main()

"""A tiny T5 text encoder and its tokenizer, built in code, for the tiny SD3 and Flux test models.

The tokenizer is a SentencePiece-style Unigram model (the kind T5's is) over a small English vocabulary: each word
of it is one token ("▁circle"), anything else falls back to single characters, and every sequence ends with </s>,
as T5's does. It is written as tokenizer.json, which `T5TokenizerFast` loads like any T5 checkpoint's.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

# The words of the tiny tokenizers' vocabularies (also the tiny CLIP BPE's: tools/make_tiny_vocab.py).
WORDS = """
a an the of and with in on at photo picture painting drawing style sks ohwx person man woman dog cat
red green blue yellow orange purple pink white black gray brown cyan magenta
circle square triangle cross star ring diamond shape shapes small big large background
""".split()
SPECIAL = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as T5's


def t5_tokenizer(words: Iterable[str] = WORDS, model_max_length: int = 512) -> T5TokenizerFast:
    """A T5 tokenizer whose vocabulary is `words` (one token each) and single characters."""
    pieces = [(token, 0.0) for token in SPECIAL]
    pieces += [(f"▁{word}", -1.0) for word in dict.fromkeys(words)]
    pieces += [(piece, -10.0) for piece in ["▁", *string.ascii_lowercase, *string.digits, *string.punctuation]]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=SPECIAL.index("<unk>"), byte_fallback=False))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    eos = SPECIAL.index("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=model_max_length)  # fmt: skip


def t5_encoder(vocab_size: int, d_model: int, num_layers: int = 2, num_heads: int = 4) -> T5EncoderModel:
    """A random T5 encoder (T5 v1.1's gated GELU feed-forward, as SD3's and Flux's T5-XXL has)."""
    config = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_model // num_heads, d_ff=2 * d_model, num_layers=num_layers,
        num_heads=num_heads, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
        relative_attention_max_distance=32, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
    )  # fmt: skip
    return T5EncoderModel(config)

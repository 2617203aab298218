"""The character tokenizer of evofast's synthetic tasks, as a transformers tokenizer.

One id per character of `CHARS`, then the special tokens:

    <bos> <eos> <unk> <mask>      (mask = the last id; <eos> is also the pad token, as in LLaDA)

It is `evofast.char_tokenizer.char_tokenizer` over these characters (a transformers
tokenizer that `AutoTokenizer.from_pretrained` loads back once saved). Encoding adds
<bos>; decoding joins characters with no spaces.
"""
from __future__ import annotations

__all__ = ["CHARS", "SPECIAL_TOKENS", "make_tokenizer"]

# digits, the arithmetic of the tasks, separators of worked steps, and a few letters
CHARS = "0123456789+-*/()=,;:>. ?abcdefghijklmnopqrstuvwxyz"
SPECIAL_TOKENS = ("<bos>", "<eos>", "<unk>", "<mask>")


def make_tokenizer():
    """A fresh transformers tokenizer over `CHARS` (vocab size len(CHARS) + 4, padding on the left).

    Pad = <eos>, as in LLaDA: a response is followed by <eos> up to the generation
    length both in `evofast.study.pretrain` and in CTS batches (which right-pad with pad)."""
    from ..char_tokenizer import char_tokenizer
    return char_tokenizer(CHARS, SPECIAL_TOKENS)

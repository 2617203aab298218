"""evofast's character tokenizer: one id per character, then four special tokens, as a transformers
tokenizer (`save_pretrained(dir)` writes a tokenizer.json that `AutoTokenizer.from_pretrained(dir)`
loads with no custom code).

    char_tokenizer(chars, specials)   the general one: encoding adds <bos>, decoding joins characters
    tiny_tokenizer()                  the built-in random `tiny` model's: printable ASCII and newline,
                                      then <unk> <bos> <eos> <mask> (100 ids; mask = the last id)
    evofast.tasks.make_tokenizer()    the synthetic tasks': digits, arithmetic, a few letters,
                                      then <bos> <eos> <unk> <mask>

<eos> is also the pad token, as in LLaDA; padding is on the left (prompts).
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["char_tokenizer", "tiny_tokenizer", "TINY_CHARS"]

TINY_CHARS = "".join(chr(c) for c in range(32, 127)) + "\n"


def char_tokenizer(chars: str, specials: Sequence[str] = ("<bos>", "<eos>", "<unk>", "<mask>")):
    """A fresh `PreTrainedTokenizerFast`: ids 0.. for `chars` in order, then `specials` (which must be
    <bos>, <eos>, <unk> and <mask> in some order)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if sorted(specials) != sorted(("<bos>", "<eos>", "<unk>", "<mask>")):
        raise ValueError(f"specials: expected <bos>, <eos>, <unk> and <mask> in some order, got {list(specials)}")
    vocab = {c: i for i, c in enumerate(chars)}
    if len(vocab) != len(chars):
        raise ValueError("chars: every character must appear once")
    for t in specials:
        vocab[t] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # every character is its own word (spaces and newlines included): no normaliser, no merges
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>", unk_token="<unk>",
        mask_token="<mask>", padding_side="left", clean_up_tokenization_spaces=False)
    tok.model_max_length = 1 << 16
    return tok


def tiny_tokenizer():
    """The tokenizer of `evofast generate --model tiny` (`evofast.models.llada.tiny(vocab_size=100)`)."""
    return char_tokenizer(TINY_CHARS, ("<unk>", "<bos>", "<eos>", "<mask>"))

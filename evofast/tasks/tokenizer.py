"""The character tokenizer of evofast's synthetic tasks, as a transformers tokenizer.

One id per character of `CHARS`, then the special tokens:

    <bos> <eos> <unk> <mask>      (mask = the last id; <eos> is also the pad token, as in LLaDA)

It is a `tokenizers` WordLevel model over single characters wrapped in
`transformers.PreTrainedTokenizerFast`, so `save_pretrained(dir)` writes a
`tokenizer.json` that `AutoTokenizer.from_pretrained(dir)` loads with no custom
code. Encoding adds <bos>; decoding joins characters with no spaces.
"""
from __future__ import annotations

__all__ = ["CHARS", "SPECIAL_TOKENS", "make_tokenizer"]

# digits, the arithmetic of the tasks, separators of worked steps, and a few letters
CHARS = "0123456789+-*/()=,;:>. ?abcdefghijklmnopqrstuvwxyz"
SPECIAL_TOKENS = ("<bos>", "<eos>", "<unk>", "<mask>")


def make_tokenizer():
    """A fresh `PreTrainedTokenizerFast` (vocab size len(CHARS) + 4, padding on the left).

    Pad = <eos>, as in LLaDA: a response is followed by <eos> up to the generation
    length both in `evofast.study.pretrain` and in CTS batches (which right-pad with pad)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(CHARS)}
    for t in SPECIAL_TOKENS:
        vocab[t] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # every character is its own word (spaces included): no normaliser, no merges
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    bos = vocab["<bos>"]
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>", unk_token="<unk>",
        mask_token="<mask>", padding_side="left", clean_up_tokenization_spaces=False)
    tok.model_max_length = 1 << 16
    return tok

"""A character tokenizer for the built-in random `tiny` model (`evofast generate --model tiny`).

One id per printable ASCII character and newline, then four special tokens:

    0..94   chr(32)..chr(126)      95  "\\n"
    96      <unk>                  97  <bos>
    98      <eos>  (also pad)      99  <mask>

100 ids in all, the layout `evofast.models.llada.tiny(vocab_size=100)` expects
(mask id = vocab_size - 1, eos / pad = vocab_size - 2). It has the few methods
evofast's command line and trace page use, with transformers' names.
"""
from __future__ import annotations

from typing import Iterable, Union

__all__ = ["CharTokenizer"]

_CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
_SPECIAL = ["<unk>", "<bos>", "<eos>", "<mask>"]


class CharTokenizer:
    """Characters in, ids out; unknown characters become <unk>."""

    chat_template = None
    padding_side = "left"

    def __init__(self):
        self.tokens = _CHARS + _SPECIAL
        self._ids = {t: i for i, t in enumerate(_CHARS)}
        n = len(_CHARS)
        self.unk_token_id, self.bos_token_id, self.eos_token_id, self.mask_token_id = n, n + 1, n + 2, n + 3
        self.pad_token_id = self.eos_token_id
        self.all_special_ids = [self.unk_token_id, self.bos_token_id, self.eos_token_id, self.mask_token_id]

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        ids = [self._ids.get(ch, self.unk_token_id) for ch in text]
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def convert_ids_to_tokens(self, ids: Union[int, Iterable[int]]):
        if isinstance(ids, int):
            return self.tokens[ids] if 0 <= ids < len(self.tokens) else "<unk>"
        return [self.convert_ids_to_tokens(int(i)) for i in ids]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        special = set(self.all_special_ids)
        return "".join(self.convert_ids_to_tokens(int(i)) for i in ids
                       if not (skip_special_tokens and int(i) in special))

    def batch_decode(self, rows, skip_special_tokens: bool = False) -> list:
        return [self.decode(r, skip_special_tokens) for r in rows]

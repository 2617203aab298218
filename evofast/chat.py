"""How a user prompt becomes token ids, the same for generation and CTS training.

With a chat template the template's text already holds the special tokens it
wants (LLaDA's starts with ``<|startoftext|>``), so it is tokenized with
``add_special_tokens=False``: a tokenizer that adds a BOS of its own would put a
second one in front (LLaDA-8B-Instruct's adds none, so for it both calls give the
same ids). Without a template the tokenizer adds its special tokens as usual.
"""
from __future__ import annotations

from typing import List, Optional

__all__ = ["has_template", "prompt_ids", "chat_text", "encode_prompts", "left_pad"]


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_text(tokenizer, prompt: str, response: Optional[str] = None) -> str:
    """The template's text of a one-turn conversation: the user's prompt and the assistant's
    header (``response=None``), or the whole exchange."""
    user = [{"role": "user", "content": prompt}]
    if response is None:
        return tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    return tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)


def prompt_ids(tokenizer, prompt: str, chat: bool = True) -> List[int]:
    """Token ids of `prompt`: through the chat template when `chat` and the tokenizer has one."""
    if chat and has_template(tokenizer):
        return list(tokenizer(chat_text(tokenizer, prompt), add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def left_pad(rows, pad_id: int, device=None):
    """Token id lists -> (B, P) left-padded int64 ids and their attention mask (None when no
    row is padded), on `device`."""
    import torch

    P = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), P), int(pad_id), dtype=torch.long)
    am = torch.zeros(len(rows), P, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, P - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            am[i, P - len(r):] = 1
    return ids.to(device), (None if bool(am.all()) else am.to(device))


def pad_id_of(tokenizer) -> int:
    """The id left padding uses: the tokenizer's pad token, else its EOS, else 0."""
    return next((int(v) for v in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                 if v is not None), 0)


def encode_prompts(tokenizer, prompts, chat: bool = True, device=None):
    """Prompts -> (B, P) left-padded ids and attention mask (None when no row is padded)."""
    return left_pad([prompt_ids(tokenizer, text, chat) for text in prompts], pad_id_of(tokenizer), device)

"""How a user prompt becomes token ids, the same for generation and CTS training.

With a chat template the template's text already holds the special tokens it
wants (LLaDA's starts with ``<|startoftext|>``), so it is tokenized with
``add_special_tokens=False``: tokenizing it with the default would put a second
BOS in front. Without a template the tokenizer adds its special tokens as usual.
"""
from __future__ import annotations

from typing import List, Optional

__all__ = ["has_template", "prompt_ids", "chat_text"]


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

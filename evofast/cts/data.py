"""Training data for CTS: `{"prompt", "response"}` records -> `{"input_ids", "prompt_length"}` examples.

With a chat template (and `chat=True`) the example is the template applied to a
user turn and an assistant turn, and the prompt is the template applied to the
user turn with the generation prompt (as the authors' preprocessing does); the
prompt length is counted on that prefix; the template's text is tokenized without
adding special tokens (it holds its own, see `evofast.chat`). Without one: the
prompt's ids, then the response's ids without special tokens, then eos.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from ..chat import chat_text, has_template, prompt_ids


def load_jsonl(path) -> list:
    """Records of a JSON-lines file; each must be an object with string "prompt" and a non-blank
    string "response"."""
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) \
                    or not isinstance(rec.get("response"), str):
                raise ValueError(f'{path}:{n}: expected an object with string "prompt" and "response"')
            if not rec["response"].strip():
                raise ValueError(f'{path}:{n}: empty "response" (there is nothing to train on)')
            records.append(rec)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _ids(tokenizer, text: str) -> list:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_example(tokenizer, prompt: str, response: str, *, chat: bool = True) -> dict:
    """One `{"input_ids": LongTensor (n,), "prompt_length": int}` example; the prompt's ids are
    those `evofast generate` feeds the model (`evofast.chat.prompt_ids`). A blank response is a ValueError."""
    if not isinstance(response, str) or not response.strip():
        raise ValueError(f"response: expected a non-blank string, got {response!r}")
    p_ids = prompt_ids(tokenizer, prompt, chat)
    if chat and has_template(tokenizer):
        head, full = chat_text(tokenizer, prompt), chat_text(tokenizer, prompt, response)
        if full.startswith(head):
            ids = p_ids + _ids(tokenizer, full[len(head):])
        else:  # a template whose full conversation does not extend the prompt text
            ids = _ids(tokenizer, full)
    else:
        ids = p_ids + _ids(tokenizer, response)
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None:
            ids.append(int(eos))
    return {"input_ids": torch.tensor(ids, dtype=torch.int64), "prompt_length": len(p_ids)}


def encode_examples(tokenizer, records: Iterable[dict], *, chat: bool = True) -> list:
    """Encode records (too long ones are kept: `CTSCollator(max_length=...)` drops and counts them)."""
    return [encode_example(tokenizer, r["prompt"], r["response"], chat=chat) for r in records]

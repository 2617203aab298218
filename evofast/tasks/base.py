"""Tasks: seeded generators of (prompt, response, answer) with exact answers, and their splits.

Split. Whether a problem belongs to the test split is a pure function of its prompt
(a hash), so train and test never share a prompt whatever the seeds: the train
stream rejects test prompts and the test set is drawn from test prompts only.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

__all__ = ["Example", "Task", "in_test_split", "TEST_PERCENT"]

TEST_PERCENT = 10                 # share of the problem space held out for testing


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str                # worked steps and the answer, what the model learns to write
    answer: str                  # the exact answer the checker compares (or the target for countdown)
    meta: Optional[tuple] = None  # task data the checker needs (countdown: the numbers)


def in_test_split(prompt: str, percent: int = TEST_PERCENT) -> bool:
    """True for prompts in the held-out test split (a stable hash of the text)."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return h % 100 < percent


class Task:
    """One synthetic task. Subclasses set `name`, `prompt_length` / `gen_length` (the
    most characters of a prompt without <bos> / of a response, eos included) and
    implement `make(rng) -> Example` and `extract(text) -> answer or None`."""

    name = "task"
    stream_key = None            # seeds the streams instead of `name` (a renamed task keeps its problems)
    prompt_length = 16
    gen_length = 32              # a multiple of 8
    block_length = 8             # so steps = gen/2 and gen/4 both split evenly over the blocks

    def params(self) -> dict:
        """Constructor arguments (saved next to a model so `eval` rebuilds the same task)."""
        return {}

    def spec(self) -> dict:
        return {"task": self.name, **self.params(), "gen_length": self.gen_length,
                "block_length": self.block_length, "test_percent": TEST_PERCENT}

    def make(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def extract(self, example: Optional[Example], text: str) -> Optional[str]:
        """The final answer in a generated response (after the last ';'), or None. (`example` is
        unused here; every task, the paper's too, takes it.)"""
        text = text.split("<")[0]           # '<' only starts a special token (<eos>, <mask>...)
        if ";" not in text:
            return None
        return text.rsplit(";", 1)[1].strip() or None

    def check(self, example: Example, text: str) -> bool:
        """Exact match of the extracted answer."""
        return self.extract(example, text) == example.answer

    # ---- streams and splits
    def stream(self, split: str, seed: int) -> Iterator[Example]:
        """Endless examples of one split ("train" or "test"), the same for the same seed."""
        if split not in ("train", "test"):
            raise ValueError(f"split: must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"{self.stream_key or self.name}:{split}:{seed}")
        want_test = split == "test"
        while True:
            ex = self.make(rng)
            if in_test_split(ex.prompt) == want_test:
                yield ex

    def test_set(self, n: int, seed: int = 0) -> list:
        """`n` distinct test problems (fewer only when the test split has fewer)."""
        if n < 1:
            raise ValueError(f"n: must be >= 1, got {n}")
        seen, out, misses = set(), [], 0
        for ex in self.stream("test", seed):
            if ex.prompt in seen:
                misses += 1
                if misses > 20 * n:            # the space is exhausted
                    break
                continue
            seen.add(ex.prompt)
            out.append(ex)
            if len(out) == n:
                break
        return out

    def write_jsonl(self, path, n: int, seed: int = 0, split: str = "train") -> Path:
        """`n` examples of a split as JSON lines {"prompt", "response"} (the format of
        `evofast train-cts --data`, which appends one <eos> itself).

        The response is padded with <eos> to gen_length - 1 characters, so with train-cts's
        <eos> every sequence is prompt + gen_length tokens: the layout the model was
        pretrained on and is decoded with (LLaDA's SFT pads responses with <eos> the same
        way). Unpadded, the sequences are shorter than any the model has seen, and a
        bidirectional model that learned where the sequence ends gets them badly wrong
        (measured: CTS loss 5.9 instead of 0.65 on the same model)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        it = self.stream(split, seed)
        with path.open("w") as f:
            for _ in range(n):
                ex = next(it)
                pad = "<eos>" * (self.gen_length - 1 - len(ex.response))
                f.write(json.dumps({"prompt": ex.prompt, "response": ex.response + pad}) + "\n")
        return path

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def encode_batch(tok, task, examples: Sequence, with_response: bool = True) -> dict:
    """Token tensors of examples: `input_ids` (B, P [+ G]) with the prompt (and <bos>) left-padded
    to P = task.prompt_length + 1 and, with_response, G = task.gen_length response tokens
    (<eos>-padded); `attention_mask` (1 = token), `position_ids` (from the first real token).
    Responses longer than G are an error (the task's lengths are wrong)."""
    P, G = task.prompt_length + 1, task.gen_length
    pad, eos = tok.pad_token_id, tok.eos_token_id
    B = len(examples)
    L = P + (G if with_response else 0)
    ids = torch.full((B, L), pad, dtype=torch.long)
    am = torch.zeros(B, L, dtype=torch.long)
    # one tokenizer call per batch, not per example (this runs every training step); none for no examples
    prompts = tok([ex.prompt for ex in examples])["input_ids"] if B else []
    if with_response and B:
        responses = tok([ex.response for ex in examples], add_special_tokens=False)["input_ids"]
    for i, (ex, p) in enumerate(zip(examples, prompts)):
        if len(p) > P:
            raise ValueError(f"prompt {ex.prompt!r}: {len(p)} tokens, more than the task's width {P}")
        ids[i, P - len(p):P] = torch.tensor(p)
        am[i, P - len(p):] = 1
        if with_response:
            r = responses[i]
            if len(r) >= G:
                raise ValueError(f"response {ex.response!r}: {len(r)} tokens, no room for <eos> in gen_length {G}")
            ids[i, P:P + len(r)] = torch.tensor(r)
            ids[i, P + len(r):] = eos
    pos = (am.cumsum(dim=1) - 1).clamp_min(0)
    return {"input_ids": ids, "attention_mask": am, "position_ids": pos, "prompt_width": P}

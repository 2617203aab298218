"""Scoring one decoding setting on a fixed problem set, with revisions logged.

    s = Setting(mode="evotoken", tokens_per_step=4, temperature=0.0, alpha=0.7)
    res = score(model, tok, task, examples, s, batch_size=500, seed=0)
    res["correct"]        # (problems,) 0/1, in the order of `examples`
    res["first_correct"]  # the same, scoring each position's first decoded token (before any revision)
    res["revised"]        # (problems,) generated tokens changed after they were first decoded

`RevisionLog` is the `evofast.decode.Observer` that watches tokens change. An answer is
revised right->wrong when its first decoded tokens would have been scored right and the
final ones are not, wrong->right the other way round. (Hard decoding never revises.)

Policies are rows of `POLICIES`: a name and the `evofast.generate` arguments that select
it; a new decoding policy is one more row. A sweep names its points "threshold@0.8" or
"stdd@tau=0.8,lam_s=1" (`policy_kwargs`).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch

from ..decode import Observer
from ..ops import STDD
from ..devices import synchronize

__all__ = ["POLICIES", "policy_kwargs", "Setting", "RevisionLog", "score"]

#: decoding policies: name -> the generate() arguments that select it
POLICIES = {
    "schedule": {},                        # the authors' step schedule: tokens_per_step tokens per forward
    "threshold": {"threshold": 0.9},       # every position at least 90% confident (the most confident always)
    "stdd": {"policy": STDD()},            # a per-position threshold from 0.9, raised where predictions move
}


def policy_kwargs(name: str) -> dict:
    """The generate() arguments of a policy row: a name of `POLICIES`, or a point of a sweep,
    "threshold@0.8" or "stdd@tau=0.8,lam_t=1,lam_s=0" (STDD's fields, the others at their defaults)."""
    base, at, args = name.partition("@")
    if base not in POLICIES or (at and base == "schedule") or (at and not args):
        raise ValueError(f"policy: must be one of {sorted(POLICIES)}, 'threshold@T' or 'stdd@k=v,...', "
                         f"got {name!r}")
    if not at:
        return dict(POLICIES[base])
    if base == "threshold":
        return {"threshold": float(args)}
    fields = {}
    for item in args.split(","):
        key, eq, value = item.partition("=")
        if not eq or key not in STDD.__dataclass_fields__:
            raise ValueError(f"policy: {item!r} in {name!r} is not k=v with k one of "
                             f"{sorted(STDD.__dataclass_fields__)}")
        fields[key] = int(value) if key in ("window", "radius") else float(value)
    return {"policy": STDD(**fields)}


@dataclass(frozen=True)
class Setting:
    """One decoding setting of the study (block length and k_soft are the study's)."""

    mode: str                       # "hard" | "evotoken"
    tokens_per_step: int            # the schedule's tokens per forward (steps = gen_length / this)
    temperature: float = 0.0
    alpha: Optional[float] = None   # evotoken only
    policy: str = "schedule"

    def __post_init__(self):
        policy_kwargs(self.policy)                      # a known policy, or a valid sweep point
        if (self.alpha is None) != (self.mode == "hard"):
            raise ValueError(f"alpha: needed for mode 'evotoken' only, got {self.alpha!r} for {self.mode!r}")

    @property
    def name(self) -> str:
        parts = [self.mode, f"tps{self.tokens_per_step}", f"T{self.temperature:g}", self.policy]
        if self.alpha is not None:
            parts.insert(1, f"a{self.alpha:g}")
        return "-".join(parts)

    def generate_kwargs(self, gen_length: int, block_length: int, k_soft: int) -> dict:
        kw = dict(gen_length=gen_length, block_length=block_length, steps=gen_length // self.tokens_per_step,
                  mode=self.mode, temperature=self.temperature, **policy_kwargs(self.policy))
        if self.mode == "evotoken":
            kw.update(k_soft=k_soft, alpha=self.alpha)
        return kw

    def as_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


class RevisionLog(Observer):
    """Per generation: each generated position's first decoded token (`first`, (B, G)) and how
    many times a decoded token was replaced (`revised`, (B,))."""

    def on_start(self, state) -> None:
        self.P, self.M = state.P, state.mask_id
        self.prev = state.x[:, self.P:].clone()
        self.first = self.prev.clone()
        self.revised = torch.zeros(state.B, dtype=torch.long, device=state.x.device)

    def end_of_step(self, state, step, out) -> None:
        x = state.x[:, self.P:]
        decoded = self.prev != self.M
        self.revised += (decoded & (x != self.prev)).sum(dim=1)
        self.first = torch.where(~decoded & (x != self.M), x, self.first)
        self.prev = x.clone()


def _seed_of(seed: int, name: str, start: int) -> int:
    key = f"{seed}|{name}|{start}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def score(model, tok, task, examples: Sequence, setting: Setting, *, batch_size: int = 500, seed: int = 0,
          k_soft: int = 3, keep_samples: int = 3) -> dict:
    """`setting` on `examples` of a fixed-width synthetic task (every prompt exactly its width, so
    no batch is padded): per-problem correctness before and after revisions, revised tokens and
    forwards, the seconds spent, and a few samples. Sampling draws from a generator seeded by
    `seed`, the setting and the batch."""
    from ..generation import generate
    from ..tasks.base import encode_batch

    device = next(model.parameters()).device
    kw = setting.generate_kwargs(task.gen_length, task.block_length, k_soft)
    correct, first_correct, revised, forwards, samples = [], [], [], [], []
    seconds = 0.0
    for start in range(0, len(examples), batch_size):
        exs = examples[start:start + batch_size]
        batch = encode_batch(tok, task, exs, with_response=False)
        if not bool(batch["attention_mask"].all()):
            raise ValueError(f"task: {task!r} pads some prompts; the study needs a fixed-width task "
                             "(e.g. countdown-synth:aligned=1)")
        ids = batch["input_ids"].to(device)
        gen = torch.Generator().manual_seed(_seed_of(seed, setting.name, start)) if setting.temperature else None
        log, stats = RevisionLog(), {}
        synchronize(device)
        t0 = time.perf_counter()
        out = generate(model, ids, generator=gen, stats=stats, observers=[log], **kw)
        synchronize(device)
        seconds += time.perf_counter() - t0
        P = ids.shape[1]
        texts = tok.batch_decode(out[:, P:].tolist(), skip_special_tokens=False)
        firsts = tok.batch_decode(log.first.tolist(), skip_special_tokens=False)
        for ex, text, first in zip(exs, texts, firsts):
            correct.append(int(task.check(ex, text)))
            first_correct.append(int(task.check(ex, first)))
            if len(samples) < keep_samples:
                samples.append({"prompt": ex.prompt, "output": text.split("<")[0], "correct": bool(correct[-1])})
        revised += log.revised.tolist()
        forwards += stats["row_forwards"]
    n = len(correct)
    return {"setting": setting.as_dict(), "n": n, "correct": correct, "first_correct": first_correct,
            "revised": revised, "accuracy": sum(correct) / n, "forwards_per_problem": sum(forwards) / n,
            "right_to_wrong": sum(f and not c for f, c in zip(first_correct, correct)),
            "wrong_to_right": sum(c and not f for f, c in zip(first_correct, correct)),
            "revised_tokens": sum(revised), "seconds": seconds, "samples": samples}

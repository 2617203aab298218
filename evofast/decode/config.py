"""`DecodeConfig`: every decoding argument, checked once, before any forward.

Each failure is a ValueError whose message starts with the argument's name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..ops import _checks

__all__ = ["DecodeConfig", "MODES", "CACHES", "check_prompt"]

MODES = ("evotoken", "hard")
CACHES = (None, "prefix", "dual")
REMASKING = ("low_confidence", "random", "topk_margin", "entropy")

fail = _checks.fail


@dataclass(frozen=True)
class DecodeConfig:
    """The settings of one `generate` call (see its docstring for each)."""

    gen_length: int = 128
    block_length: int = 32
    steps: int = 64
    mode: str = "evotoken"
    k_soft: int = 3
    alpha: float = 0.7
    temperature: float = 0.0
    remasking: str = "low_confidence"
    threshold: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    policy: Optional[object] = None     # a TransferPolicy or an evofast.ops.STDD (None: from threshold)
    cache: Optional[str] = None
    cache_refresh: Optional[int] = None
    compile: bool = False
    backend: Optional[str] = None

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        if self.mode not in MODES:
            fail("mode", f"must be one of {MODES}, got {self.mode!r}")
        if self.cache not in CACHES:
            fail("cache", f"must be one of {CACHES}, got {self.cache!r}")
        put("k_soft", _checks.integer("k_soft", self.k_soft, 1, 16))
        put("alpha", _checks.real("alpha", self.alpha, 0.0, 1.0, hi_open=True))
        put("temperature", _checks.real("temperature", self.temperature, 0.0))
        if self.remasking not in REMASKING:
            fail("remasking", f"must be one of {REMASKING}, got {self.remasking!r}")
        if self.threshold is not None:
            put("threshold", self._check_tau("threshold", self.threshold))
        top_k, top_p = _checks.sampling_filters(self.top_k, self.top_p)
        put("top_k", top_k)
        put("top_p", top_p)
        self._check_policy()
        for name in ("gen_length", "block_length", "steps"):
            put(name, _checks.integer(name, getattr(self, name), 1))
        if self.gen_length % self.block_length:
            fail("gen_length", f"must be a multiple of block_length={self.block_length}, got {self.gen_length}")
        if self.steps % self.blocks:
            fail("steps", f"must be a multiple of the number of blocks gen_length / block_length = {self.blocks}, "
                          f"got {self.steps}")
        if self.steps > self.gen_length:
            fail("steps", f"must not exceed gen_length={self.gen_length} (at least one token per step), "
                          f"got {self.steps}")
        if self.cache_refresh is not None:
            if self.cache is None:
                fail("cache_refresh", "needs a cache ('prefix' or 'dual'); got cache=None")
            put("cache_refresh", _checks.integer("cache_refresh", self.cache_refresh, 1))
        if not isinstance(self.compile, bool):
            fail("compile", f"expected a bool, got {self.compile!r}")

    def _check_tau(self, name: str, tau) -> float:
        """A global threshold on this remasking's confidences: probabilities for "low_confidence",
        "topk_margin" and "random" (0 keeps every eligible position, a block in one forward; 1
        only the most confident one per forward), the negative entropy (<= 0) for "entropy"."""
        if self.remasking == "entropy":
            return _checks.real(name, tau, hi=0.0)
        return _checks.real(name, tau, 0.0, 1.0)

    def _check_policy(self) -> None:
        from ..ops import STDD
        from .policies import Stdd, Threshold, TransferPolicy

        p = self.policy
        if p is None:
            return
        if not isinstance(p, (STDD, TransferPolicy)):
            fail("policy", f"expected an evofast.ops.STDD or an evofast.decode.TransferPolicy, "
                           f"got {type(p).__name__}")
        if self.threshold is not None:
            fail("threshold", f"cannot be combined with policy={type(p).__name__} (the policy decides what "
                              "is decoded); pass one of them")
        if isinstance(p, Threshold):
            self._check_tau("policy", p.tau)
        stdd = p if isinstance(p, STDD) else p.params if isinstance(p, Stdd) else None
        if stdd is not None and self.remasking == "entropy" and stdd.tau > 0:
            fail("policy", f"STDD's tau={stdd.tau} lies above every remasking='entropy' confidence (they "
                           "are <= 0); lower tau, tau_min and tau_max to at most 0")

    @property
    def blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.blocks

    @property
    def soft(self) -> bool:
        return self.mode == "evotoken"

    def schedule(self) -> list:
        """Tokens to decode at each step of a block: its masks split evenly over the block's
        steps, the remainder one each to the earliest steps (the authors' schedule)."""
        s = self.steps_per_block
        base, extra = divmod(self.block_length, s)
        return [base + (t < extra) for t in range(s)]

    def check_adapter(self, adapter) -> None:
        """What the model must offer for these settings."""
        if self.cache is not None and self.cache not in adapter.cache_kinds:
            have = ", ".join(map(repr, adapter.cache_kinds)) or "no KV cache"
            fail("cache", f"cache={self.cache!r} is not available for {type(adapter.model).__name__} "
                          f"(evofast's {adapter.name} adapter supports {have}); use cache=None")
        E = adapter.input_embeddings().weight
        V, M = int(adapter.vocab_size), int(adapter.mask_id)
        if not 0 <= M < V:
            fail("mask_id", f"the model's mask id {M} lies outside its vocabulary [0, {V})")
        if E.shape[0] < V:
            fail("model", f"its input embedding has {E.shape[0]} rows, fewer than the {V} logits columns "
                          "(soft tokens could name ids it cannot embed)")
        if self.soft and self.k_soft >= V:
            fail("k_soft", f"must be smaller than the vocabulary size {V}, got {self.k_soft}")


def check_prompt(input_ids, attention_mask, device):
    """(input_ids (B, P) int64 on `device`, attention mask or None when no row is padded, pads per row)."""
    if not isinstance(input_ids, Tensor):
        fail("input_ids", f"expected a (B, P) LongTensor, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        fail("input_ids", f"expected shape (B, P), got {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        fail("input_ids", f"expected an integer tensor, got dtype {input_ids.dtype}")
    B, P = input_ids.shape
    if B == 0:
        fail("input_ids", "empty batch")
    if P == 0:
        fail("input_ids", "empty prompt (generation needs at least one prompt token)")
    input_ids = input_ids.to(device=device, dtype=torch.long)
    if attention_mask is None:
        return input_ids, None, [0] * B
    if not isinstance(attention_mask, Tensor):
        fail("attention_mask", f"expected a (B, P) tensor, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (B, P):
        fail("attention_mask", f"expected shape {(B, P)} like input_ids, got {tuple(attention_mask.shape)}")
    am = attention_mask.detach().to("cpu")
    if not bool(((am == 0) | (am == 1)).all()):
        fail("attention_mask", "values must be 0 (pad) or 1 (token)")
    am = am.to(torch.long)
    if bool((am[:, 1:] < am[:, :-1]).any()):
        bad = int((am[:, 1:] < am[:, :-1]).any(dim=1).nonzero()[0])
        fail("attention_mask", f"row {bad} is not left-padded (must be 0...0 1...1, pads first): {am[bad].tolist()}")
    real = am.sum(dim=1)
    if bool((real == 0).any()):
        bad = int((real == 0).nonzero()[0])
        fail("input_ids", f"row {bad} has an empty prompt (its attention_mask is all zeros)")
    pads = (P - real).tolist()
    if not any(pads):
        return input_ids, None, pads
    return input_ids, am.to(device), pads

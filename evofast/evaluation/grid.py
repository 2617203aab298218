"""The configurations of an evaluation grid, each with a stable name.

    configs = expand_grid(mode="evotoken", gen_lengths=[128, 256], steps_factor=0.5, block_length=32,
                          alphas=[0.9, 0.8, 0.7, 0.6, 0.5], k_soft=3, temperature=0.5)
    [c.name for c in configs]   # "gen128-steps64-block32-evotoken-k3-alpha0.9-T0.5", ...

That is the authors' grid (`start_eval.sh`: gen 128 and 256, steps = gen / 2, block 32,
k_soft 3, alpha 0.9 ... 0.5, temperature 0.5): ten configurations per task, run by
`evofast eval` in one model load. A name holds every setting that changes the tokens,
so it names that configuration's result file.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence

from ..decode.config import DecodeConfig
from ..ops import STDD, _checks

__all__ = ["EvalConfig", "expand_grid"]


@dataclass(frozen=True)
class EvalConfig:
    """One decoding configuration of `evofast.generate` (k_soft / alpha only in evotoken mode)."""

    mode: str
    gen_length: int
    steps: int
    block_length: int
    k_soft: Optional[int] = None
    alpha: Optional[float] = None
    temperature: float = 0.0
    cache: Optional[str] = None
    threshold: Optional[float] = None
    remasking: str = "low_confidence"
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    stdd: Optional[STDD] = None          # the STDD transfer policy (generate's policy=)

    @property
    def name(self) -> str:
        parts = [f"gen{self.gen_length}", f"steps{self.steps}", f"block{self.block_length}", self.mode]
        if self.mode == "evotoken":
            parts += [f"k{self.k_soft}", f"alpha{self.alpha:g}"]
        parts.append(f"T{self.temperature:g}")
        if self.cache:
            parts.append(f"cache-{self.cache}")
        if self.threshold is not None:
            parts.append(f"threshold{self.threshold:g}")
        if self.remasking != "low_confidence":
            parts.append(self.remasking)
        if self.top_k is not None:
            parts.append(f"topk{self.top_k}")
        if self.top_p is not None:
            parts.append(f"topp{self.top_p:g}")
        if self.stdd is not None:
            parts.append("stdd-" + "-".join(f"{k}{v:g}" for k, v in asdict(self.stdd).items()))
        return "-".join(parts)

    def generate_kwargs(self) -> dict:
        """Keyword arguments of `evofast.generate` for this configuration."""
        kw = dict(gen_length=self.gen_length, block_length=self.block_length, steps=self.steps, mode=self.mode,
                  temperature=self.temperature, cache=self.cache, threshold=self.threshold, remasking=self.remasking,
                  top_k=self.top_k, top_p=self.top_p, policy=self.stdd)
        if self.mode == "evotoken":
            kw.update(k_soft=self.k_soft, alpha=self.alpha)
        return kw

    def as_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


def expand_grid(*, mode: str = "evotoken", gen_lengths: Sequence[int] = (128,), steps: Optional[Sequence[int]] = None,
                steps_factor: Optional[float] = None, block_length: int = 32, alphas: Iterable[float] = (0.7,),
                k_soft: int = 3, temperature: float = 0.0, cache: Optional[str] = None,
                threshold: Optional[float] = None, remasking: str = "low_confidence", top_k: Optional[int] = None,
                top_p: Optional[float] = None, stdd: Optional[STDD] = None) -> list:
    """Every (gen_length, alpha) configuration, in that order. Steps: `steps` (one value, or one per
    gen length) or `steps_factor` * gen_length (default 0.5, the authors' steps = gen / 2).
    remasking, top_k, top_p and stdd (`generate`'s policy=) as in `evofast.generate`.
    ValueError naming the argument for anything `evofast.generate` would refuse."""
    if mode not in ("evotoken", "hard"):
        _checks.fail("mode", f"must be 'evotoken' or 'hard', got {mode!r}")
    gens = [_checks.integer("gen_length", g, 1) for g in gen_lengths]
    if not gens:
        _checks.fail("gen_length", "needs at least one value")
    if steps is not None and steps_factor is not None:
        _checks.fail("steps", "give steps or steps_factor, not both")
    if steps is None:
        factor = _checks.real("steps_factor", 0.5 if steps_factor is None else steps_factor, 0.0, 1.0)
        steps = [max(1, int(g * factor)) for g in gens]     # the authors: gen * factor, truncated
    steps = [_checks.integer("steps", s, 1) for s in steps]
    if len(steps) == 1:
        steps = steps * len(gens)
    if len(steps) != len(gens):
        _checks.fail("steps", f"give one value or one per gen length ({len(gens)}), got {len(steps)}")
    block_length = _checks.integer("block_length", block_length, 1)
    alphas = [_checks.real("alpha", a, 0.0, 1.0, hi_open=True) for a in alphas] if mode == "evotoken" else [None]
    if not alphas:
        _checks.fail("alpha", "needs at least one value")
    temperature = _checks.real("temperature", temperature, 0.0)
    if cache not in (None, "prefix", "dual"):
        _checks.fail("cache", f"must be None, 'prefix' or 'dual', got {cache!r}")
    if threshold is not None:
        threshold = _checks.real("threshold", threshold)
    configs = []
    for g, s in zip(gens, steps):
        if g % block_length:
            _checks.fail("block_length", f"gen_length {g} is not a multiple of block_length {block_length}")
        if s % (g // block_length) or s > g:
            _checks.fail("steps", f"{s} steps do not split evenly over the {g // block_length} blocks of "
                                  f"gen_length {g} (or exceed it)")
        for a in alphas:
            configs.append(EvalConfig(mode=mode, gen_length=g, steps=s, block_length=block_length,
                                      k_soft=_checks.integer("k_soft", k_soft, 1, 16) if mode == "evotoken" else None,
                                      alpha=a, temperature=temperature, cache=cache, threshold=threshold,
                                      remasking=remasking, top_k=top_k, top_p=top_p, stdd=stdd))
    for config in configs:              # generate's own checks, before any model loads
        DecodeConfig(**config.generate_kwargs())
    return configs

"""Paired comparisons of two decoding arms on the same test problems (scipy does the statistics).

Each arm is a 0/1 matrix `(seeds, problems)`: row s says which problems the arm's model
of fine-tune seed s answered correctly. An arm without fine-tuning (the base model) has
one row, paired with every seed of the other arm.

    mcnemar(a, b)                  exact two-sided McNemar p-value of one pair of rows
    paired_bootstrap(a, b)         mean of b - a over problems, with a percentile interval
    compare(a, b)                  both, pooled over seeds and per seed, and the seeds' spread

The pooled difference averages b - a over seeds first, then resamples problems: the
interval covers the problem sample (the same problems for every arm), and the seeds'
spread is reported next to it (three seeds are too few to resample). A difference counts
as a gain or a loss only when its interval excludes 0.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["mcnemar", "paired_bootstrap", "compare", "verdict"]


def _rows(name: str, x) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] == 0 or not np.isin(a, (0, 1)).all():
        raise ValueError(f"{name}: expected a 0/1 array (problems,) or (seeds, problems), got shape {a.shape}")
    return a.astype(np.int64)


def _pair(a, b) -> tuple:
    a, b = _rows("a", a), _rows("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a, b: must score the same problems, got {a.shape[1]} and {b.shape[1]}")
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise ValueError(f"a, b: one row, or one row per seed each, got {a.shape[0]} and {b.shape[0]}")
    S = max(a.shape[0], b.shape[0])
    return np.broadcast_to(a, (S, a.shape[1])), np.broadcast_to(b, (S, b.shape[1]))


def mcnemar(a, b) -> dict:
    """Exact McNemar test of two arms on the same problems (1-D 0/1 arrays): the discordant
    pairs `a_only` (a right, b wrong) and `b_only`, and the two-sided binomial p-value of
    b_only among them under p = 1/2 (1.0 when there is no discordant pair)."""
    from scipy.stats import binomtest

    a, b = _pair(a, b)
    if a.shape[0] != 1:
        raise ValueError(f"a, b: mcnemar takes one row each, got {a.shape[0]} rows")
    a_only, b_only = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    n = a_only + b_only
    p = 1.0 if n == 0 else float(binomtest(b_only, n, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "p": min(1.0, p)}


def paired_bootstrap(a, b, *, resamples: int = 10000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Mean of b - a (accuracy difference, in [-1, 1]) over the problems, averaged over the
    rows first, with a percentile bootstrap interval over problems (scipy.stats.bootstrap,
    seeded). A constant difference gets a zero-width interval."""
    from scipy.stats import bootstrap

    a, b = _pair(a, b)
    per_problem = (b - a).mean(axis=0)
    diff = float(per_problem.mean())
    if np.all(per_problem == per_problem[0]):            # scipy refuses a degenerate sample
        return {"diff": diff, "ci": [diff, diff]}
    res = bootstrap((per_problem,), np.mean, n_resamples=resamples, confidence_level=confidence,
                    method="percentile", rng=np.random.default_rng(seed))
    return {"diff": diff, "ci": [float(res.confidence_interval.low), float(res.confidence_interval.high)]}


def verdict(ci) -> str:
    """"gain" / "loss" when the interval lies above / below 0, else "no difference shown"."""
    lo, hi = ci
    return "gain" if lo > 0 else "loss" if hi < 0 else "no difference shown"


def compare(a, b, *, resamples: int = 10000, seed: int = 0) -> dict:
    """b against a: the pooled paired difference and interval with its verdict, and per seed
    the difference, its interval and the McNemar test (the seeds share their problems, so
    their discordant pairs are not pooled into one test); `seed_spread` is the per-seed
    differences' min, max and standard deviation (ddof 1; None for one seed)."""
    a, b = _pair(a, b)
    pooled = paired_bootstrap(a, b, resamples=resamples, seed=seed)
    per_seed = []
    for s in range(a.shape[0]):
        one = paired_bootstrap(a[s], b[s], resamples=resamples, seed=seed + 1 + s)
        per_seed.append({**one, **mcnemar(a[s], b[s])})
    diffs = [r["diff"] for r in per_seed]
    spread: Optional[dict] = None
    if len(diffs) > 1:
        spread = {"min": min(diffs), "max": max(diffs), "sd": float(np.std(diffs, ddof=1))}
    return {**pooled, "verdict": verdict(pooled["ci"]), "per_seed": per_seed, "seed_spread": spread,
            "seeds": a.shape[0], "problems": a.shape[1]}

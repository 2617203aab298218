"""`evo_step`: one whole EvoToken decoding step (docs/semantics.md, decoding items 2-7).

Layers: `evo_step` (validation, RNG draws) -> the `evofast::evo_step` custom op
(what torch.compile sees, with a fake implementation) -> one backend:
`reference.evo_step_reference` (torch), `torch.ops.evofast.evo_step_fused`
(cpp on CPU tensors, cuda on GPU tensors) or `triton_evo_step.evo_step_triton`.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from . import _backend, _checks
from .reference import evo_step_reference
from .stdd import STDD


class NonFiniteLogitsError(ValueError):
    """Raised when a logits row the step reads holds NaN or +-inf values that poison the softmax."""


def _evo_step_impl(
    logits: Tensor, x: Tensor, conf: Tensor, num_transfer: Tensor,
    block_start: Tensor, block_end: Tensor, prompt_len: Tensor,
    noise: Optional[Tensor], rand_conf: Optional[Tensor],
    row0: int, mask_id: int, k_soft: int, alpha: float, temperature: float,
    random_remask: bool, threshold: Optional[float], exclude_mask: bool, seed: int, backend: str,
    confidence: str = "prob", top_k: Optional[int] = None, top_p: Optional[float] = None,
    stdd_history: Optional[Tensor] = None, stdd_count: Optional[Tensor] = None,
    stdd_params: Optional[List[float]] = None, stdd_window: int = 0, stdd_radius: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(ids, w, transfer, status, tp, q). STDD is on when stdd_params is given."""
    stdd = None
    if stdd_params is not None:
        tau, lam_t, lam_s, tau_min, tau_max = stdd_params
        stdd = STDD(tau, lam_t, lam_s, tau_min, tau_max, stdd_window, stdd_radius)
    if backend == "torch":
        return evo_step_reference(
            logits, x, conf, num_transfer, block_start, block_end, prompt_len, row0, mask_id,
            k_soft, alpha, temperature, random_remask, threshold, exclude_mask, noise, rand_conf,
            confidence=confidence, top_k=top_k, top_p=top_p, stdd=stdd, stdd_history=stdd_history,
            stdd_count=stdd_count, return_probs=True)
    args = (logits, x, conf, num_transfer, block_start, block_end, prompt_len, row0, mask_id,
            k_soft, alpha, temperature, random_remask,
            0.0 if threshold is None else threshold, threshold is not None, exclude_mask, seed)
    fused_top_k = 0 if (top_k is None or temperature == 0) else top_k
    if backend == "triton":
        from .triton_evo_step import evo_step_triton
        return evo_step_triton(*args, confidence=confidence, top_k=fused_top_k, stdd=stdd,
                               stdd_history=stdd_history, stdd_count=stdd_count, return_probs=True)
    # cpp on CPU tensors, cuda on GPU tensors
    return torch.ops.evofast.evo_step_fused_opt(
        *args, CONFIDENCE_CODES[confidence], fused_top_k, stdd_history, stdd_count,
        [] if stdd is None else stdd.params(), 0 if stdd is None else stdd.radius)


CONFIDENCE_CODES = {"prob": 0, "margin": 1, "entropy": 2}
REMASKING = {"low_confidence": "prob", "topk_margin": "margin", "entropy": "entropy", "random": "prob"}
# Largest top_k the fused backends filter in their single pass; a larger top_k, and any
# top_p, runs the whole step on the torch reference (documented in csrc/README.md).
FUSED_TOP_K = {"cpp": 64, "triton": 64, "cuda": 0}


# What torch.compile sees. Eager calls skip the custom-op wrapper (about 0.2 ms
# of Python per call, as much as a whole GPU step) and run the implementation.
_evo_step_op = torch.library.custom_op(
    "evofast::evo_step", _evo_step_impl, mutates_args=("x", "conf", "stdd_history", "stdd_count"))


@_evo_step_op.register_fake
def _(logits, x, conf, num_transfer, block_start, block_end, prompt_len, noise, rand_conf,
      row0, mask_id, k_soft, alpha, temperature, random_remask, threshold, exclude_mask, seed, backend,
      confidence="prob", top_k=None, top_p=None, stdd_history=None, stdd_count=None, stdd_params=None,
      stdd_window=0, stdd_radius=0):
    B, R, _ = logits.shape
    ids = logits.new_empty((B, R, k_soft + 1), dtype=torch.int64)
    w = logits.new_empty((B, R, k_soft + 1))
    transfer = logits.new_empty((B, R), dtype=torch.bool)
    status = logits.new_empty((1,), dtype=torch.int64)
    tp = logits.new_empty((B, R, k_soft), dtype=torch.float32)
    q = logits.new_empty((B, R), dtype=torch.float64)
    return ids, w, transfer, status, tp, q


def evo_step(
    logits: Tensor, x: Tensor, conf: Tensor, num_transfer, *,
    row0: int = 0, block_start, block_end, prompt_len,
    mask_id: int, k_soft: int = 3, alpha: float = 0.7, temperature: float = 0.0,
    remasking: str = "low_confidence", threshold: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    exclude_mask: bool = True, backend: Optional[str] = None, check_finite: bool = True,
    check_ids: bool = True, top_k: Optional[int] = None, top_p: Optional[float] = None,
    stdd: Optional[STDD] = None, stdd_history: Optional[Tensor] = None,
    stdd_count: Optional[Tensor] = None, return_probs: bool = False,
) -> tuple[Tensor, ...]:
    """One EvoToken decoding step for the sequence rows `[row0, row0 + R)`.

    Args:
        logits: `(B, R, V)` fp32 / fp16 / bf16 logits of those rows; never written.
        x: `(B, L)` int64 token record, updated in place (transfer and revision).
        conf: `(B, L)` float64 confidence record, updated in place: it holds the confidence
            measure of `remasking` (revision compares `q > conf` in that measure).
        num_transfer: `(B,)` integer tensor or int: tokens to decode this step
            (all eligible rows are taken when fewer are eligible; ignored with a threshold
            or STDD).
        row0, block_start, block_end, prompt_len: the window and, per row (int or
            `(B,)` tensor), the current block `[block_start, block_end)` and prompt length.
        mask_id, k_soft (1..16), alpha (the mask weight, in [0, 1)), temperature, threshold,
            generator: docs/semantics.md, decoding.
        remasking: the confidence `q` that ranks positions: "low_confidence" (`p[x0]`),
            "topk_margin" (top-1 minus top-2 probability of `p`), "entropy" (`sum p log p`,
            the negative entropy of `p`) or "random" (uniform).
        top_k, top_p: sampling filters at temperature > 0 (ignored at temperature 0): the
            draw keeps the `top_k` largest logits (ties with the k-th kept) and / or the
            smallest most-probable set whose probability reaches `top_p` (top_p first), of the
            tempered distribution. With a filter, `q` (every remasking but "random") measures
            that filtered, tempered distribution, as Dream does; the soft representation keeps
            the unfiltered `p`. The fused backends filter `top_k <= 64` in their single pass
            (cuda: none yet); a larger `top_k` or any `top_p` runs the torch reference.
        stdd: an `evofast.ops.STDD`: the per-position dynamic threshold replaces the transfer
            rule; needs `stdd_history` `(B, L, stdd.window)` float64 and `stdd_count` `(B, L)`
            int64 (from `evofast.ops.stdd_state`), which the step reads and updates in place
            (the step's q is appended at every eligible row). Reset a block's positions with
            `evofast.ops.stdd_reset` when the block starts.
        exclude_mask: False gives the CTS variant (docs/semantics.md, CTS loss item 4): the mask token is an
            ordinary candidate of argmax / softmax / top-k and a revision may write it.
        backend: force a backend for this call (default: `evofast.set_backend` / auto).
        check_finite: raise `NonFiniteLogitsError` on NaN / inf rows (one host sync);
            False skips the check (for graph capture) and leaves x / conf untouched
            on such rows' steps without telling. A NaN or inf only in the mask
            column, where that column is excluded (temperature 0, exclude_mask),
            is not read: the column counts as -inf either way.
        check_ids: check that x holds token ids in `[0, V)` before any work (one host
            sync on a GPU); False skips it (generate, whose x it built itself).
        return_probs: also return the step's top-k probabilities and confidences.

    Returns:
        ids `(B, R, k_soft + 1)` int64, w `(B, R, k_soft + 1)` in the logits dtype (the
        new soft representation: top-k ids then x, with their weights), transfer
        `(B, R)` bool (rows decoded this step); with `return_probs` also tp
        `(B, R, k_soft)` float32 (the top-k probabilities of `p` behind ids, before the
        mask weight and the renormalisation) and q `(B, R)` float64 (the confidences).

    Sampling (temperature > 0 or remasking="random"): the torch backend draws the
    float64 uniforms of docs/semantics.md from `generator`; the fused backends draw one seed
    from it and use a counter-based RNG, so they match it in distribution, not
    bit for bit. Greedy results are identical across backends except on exact ties.
    """
    lg = _checks.tensor("logits", logits, dim=3, dtypes=_checks.LOGIT_DTYPES)
    dev = lg.device
    B, R, V = lg.shape
    if B == 0 or R == 0 or V == 0:
        _checks.fail("logits", f"every dimension must be non-empty, got shape {tuple(lg.shape)}")
    _checks.tensor("x", x, dim=2, dtypes=(torch.int64,), device=dev)
    _checks.tensor("conf", conf, dim=2, dtypes=(torch.float64,), device=dev)
    if x.shape[0] != B:
        _checks.fail("x", f"batch size {x.shape[0]} does not match logits' {B}")
    if conf.shape != x.shape:
        _checks.fail("conf", f"shape {tuple(conf.shape)} does not match x's {tuple(x.shape)}")
    for name, t in (("x", x), ("conf", conf)):
        if not t.is_contiguous():
            _checks.fail(name, "must be contiguous (it is updated in place)")
    L = x.shape[1]
    mask_id = _checks.integer("mask_id", mask_id, 0, V - 1)
    k_soft = _checks.integer("k_soft", k_soft, 1, 16)
    if k_soft >= V:
        _checks.fail("k_soft", f"must be smaller than the vocabulary size {V}, got {k_soft}")
    alpha = _checks.real("alpha", alpha, 0.0, 1.0, hi_open=True)
    temperature = _checks.real("temperature", temperature, 0.0)
    if remasking not in REMASKING:
        _checks.fail("remasking", f"must be one of {list(REMASKING)}, got {remasking!r}")
    if threshold is not None:
        threshold = _checks.real("threshold", threshold)
    row0 = _checks.integer("row0", row0, 0)
    if row0 + R > L:
        _checks.fail("row0", f"window [{row0}, {row0 + R}) lies outside the sequence of length {L}")
    # checked on the host: no device sync for int arguments
    num_transfer = _checks.per_row("num_transfer", num_transfer, B, 0, None)
    block_start = _checks.per_row("block_start", block_start, B, 0, L)
    block_end = _checks.per_row("block_end", block_end, B, 0, L)
    prompt_len = _checks.per_row("prompt_len", prompt_len, B, 0, L)
    if bool((block_end < block_start).any()):
        _checks.fail("block_end", "must not be smaller than block_start")
    num_transfer, block_start, block_end, prompt_len = _checks.per_rows(
        dev, num_transfer, block_start, block_end, prompt_len)
    if generator is not None and not isinstance(generator, torch.Generator):
        _checks.fail("generator", f"expected a torch.Generator, got {type(generator).__name__}")
    exclude_mask = _checks.boolean("exclude_mask", exclude_mask)
    check_finite = _checks.boolean("check_finite", check_finite)
    return_probs = _checks.boolean("return_probs", return_probs)
    top_k, top_p = _checks.sampling_filters(top_k, top_p)
    _check_stdd(stdd, stdd_history, stdd_count, threshold, B, L, dev)
    if _checks.boolean("check_ids", check_ids) and x.numel():
        lo, hi = (int(v) for v in torch.stack([x.min(), x.max()]).tolist())  # one host sync on a GPU
        if lo < 0 or hi >= V:
            _checks.fail("x", f"token ids must lie in [0, {V}), got min {lo} and max {hi}")

    name = _backend.resolve(dev, backend)
    if temperature > 0 and (top_p is not None or (top_k is not None and top_k > FUSED_TOP_K.get(name, 0))):
        name = "torch"  # filters the fused single pass cannot do
    random_remask = remasking == "random"
    noise = rand_conf = None
    seed = 0
    if name == "torch":
        gen_dev = generator.device if generator is not None else dev
        if temperature > 0:
            noise = torch.rand((B, R, V), dtype=torch.float64, generator=generator, device=gen_dev).to(dev)
        if random_remask:
            rand_conf = torch.rand((B, R), dtype=torch.float64, generator=generator, device=gen_dev).to(dev)
    elif temperature > 0 or random_remask:
        gen_dev = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_dev))
    if lg.stride(-1) != 1:
        lg = lg.contiguous()

    op = _evo_step_op if torch.compiler.is_compiling() else _evo_step_impl
    opts = {}
    if remasking in ("topk_margin", "entropy"):
        opts["confidence"] = REMASKING[remasking]
    if temperature > 0 and (top_k is not None or top_p is not None):
        opts.update(top_k=top_k, top_p=top_p)
    if stdd is not None:
        opts.update(stdd_history=stdd_history, stdd_count=stdd_count, stdd_params=stdd.params(),
                    stdd_window=stdd.window, stdd_radius=stdd.radius)
    ids, w, transfer, status, tp, q = op(
        lg, x, conf, num_transfer, block_start, block_end, prompt_len, noise, rand_conf,
        row0, mask_id, k_soft, alpha, temperature, random_remask, threshold, exclude_mask, seed, name,
        **opts)
    if check_finite:
        bad = int(status[0])
        if bad >= 0:
            raise NonFiniteLogitsError(
                f"logits: row {bad % R} of batch {bad // R} (sequence position {row0 + bad % R}) "
                "holds NaN or infinite values; x and conf were left unchanged")
    return (ids, w, transfer, tp, q) if return_probs else (ids, w, transfer)


def _check_stdd(stdd, history, count, threshold, B: int, L: int, dev) -> None:
    if stdd is None:
        for name, t in (("stdd_history", history), ("stdd_count", count)):
            if t is not None:
                _checks.fail(name, "given without stdd")
        return
    if not isinstance(stdd, STDD):
        _checks.fail("stdd", f"expected an evofast.ops.STDD, got {type(stdd).__name__}")
    if threshold is not None:
        _checks.fail("stdd", "replaces the threshold rule: pass threshold or stdd, not both")
    if history is None or count is None:
        _checks.fail("stdd_history" if history is None else "stdd_count",
                     "is required with stdd (see evofast.ops.stdd_state)")
    _checks.tensor("stdd_history", history, dim=3, dtypes=(torch.float64,), device=dev)
    _checks.tensor("stdd_count", count, dim=2, dtypes=(torch.int64,), device=dev)
    if tuple(history.shape) != (B, L, stdd.window):
        _checks.fail("stdd_history", f"expected shape {(B, L, stdd.window)} (batch, sequence, "
                                     f"stdd.window), got {tuple(history.shape)}")
    if tuple(count.shape) != (B, L):
        _checks.fail("stdd_count", f"expected shape {(B, L)}, got {tuple(count.shape)}")
    for name, t in (("stdd_history", history), ("stdd_count", count)):
        if not t.is_contiguous():
            _checks.fail(name, "must be contiguous (it is updated in place)")

"""`evo_step`: one whole EvoToken decoding step (docs/semantics.md, decoding items 2-7).

Layers: `evo_step` (validation, RNG draws) -> the `evofast::evo_step` custom op
(what torch.compile sees, with a fake implementation) -> one backend:
`reference.evo_step_reference` (torch), `torch.ops.evofast.evo_step_fused`
(cpp on CPU tensors, cuda on GPU tensors) or `triton_evo_step.evo_step_triton`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _backend, _checks
from .reference import evo_step_reference


class NonFiniteLogitsError(ValueError):
    """Raised when a logits row the step reads holds NaN or +-inf values that poison the softmax."""


def _evo_step_impl(
    logits: Tensor, x: Tensor, conf: Tensor, num_transfer: Tensor,
    block_start: Tensor, block_end: Tensor, prompt_len: Tensor,
    noise: Optional[Tensor], rand_conf: Optional[Tensor],
    row0: int, mask_id: int, k_soft: int, alpha: float, temperature: float,
    random_remask: bool, threshold: Optional[float], exclude_mask: bool, seed: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if backend == "torch":
        return evo_step_reference(
            logits, x, conf, num_transfer, block_start, block_end, prompt_len, row0, mask_id,
            k_soft, alpha, temperature, random_remask, threshold, exclude_mask, noise, rand_conf)
    args = (logits, x, conf, num_transfer, block_start, block_end, prompt_len, row0, mask_id,
            k_soft, alpha, temperature, random_remask,
            0.0 if threshold is None else threshold, threshold is not None, exclude_mask, seed)
    if backend == "triton":
        from .triton_evo_step import evo_step_triton
        return evo_step_triton(*args)
    return torch.ops.evofast.evo_step_fused(*args)  # cpp on CPU tensors, cuda on GPU tensors


# What torch.compile sees. Eager calls skip the custom-op wrapper (about 0.2 ms
# of Python per call, as much as a whole GPU step) and run the implementation.
_evo_step_op = torch.library.custom_op("evofast::evo_step", _evo_step_impl, mutates_args=("x", "conf"))


@_evo_step_op.register_fake
def _(logits, x, conf, num_transfer, block_start, block_end, prompt_len, noise, rand_conf,
      row0, mask_id, k_soft, alpha, temperature, random_remask, threshold, exclude_mask, seed, backend):
    B, R, _ = logits.shape
    ids = logits.new_empty((B, R, k_soft + 1), dtype=torch.int64)
    w = logits.new_empty((B, R, k_soft + 1))
    transfer = logits.new_empty((B, R), dtype=torch.bool)
    status = logits.new_empty((1,), dtype=torch.int64)
    return ids, w, transfer, status


def evo_step(
    logits: Tensor, x: Tensor, conf: Tensor, num_transfer, *,
    row0: int = 0, block_start, block_end, prompt_len,
    mask_id: int, k_soft: int = 3, alpha: float = 0.7, temperature: float = 0.0,
    remasking: str = "low_confidence", threshold: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    exclude_mask: bool = True, backend: Optional[str] = None, check_finite: bool = True,
    check_ids: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """One EvoToken decoding step for the sequence rows `[row0, row0 + R)`.

    Args:
        logits: `(B, R, V)` fp32 / fp16 / bf16 logits of those rows; never written.
        x: `(B, L)` int64 token record, updated in place (transfer and revision).
        conf: `(B, L)` float64 confidence record, updated in place.
        num_transfer: `(B,)` integer tensor or int: tokens to decode this step
            (all eligible rows are taken when fewer are eligible; ignored with a threshold).
        row0, block_start, block_end, prompt_len: the window and, per row (int or
            `(B,)` tensor), the current block `[block_start, block_end)` and prompt length.
        mask_id, k_soft (1..16), alpha (the mask weight, in [0, 1)), temperature,
        remasking ("low_confidence" | "random"), threshold, generator: spec 2.2.
        exclude_mask: False gives the CTS variant (spec 3.4): the mask token is an
            ordinary candidate of argmax / softmax / top-k and a revision may write it.
        backend: force a backend for this call (default: `evofast.set_backend` / auto).
        check_finite: raise `NonFiniteLogitsError` on NaN / inf rows (one host sync);
            False skips the check (for graph capture) and leaves x / conf untouched
            on such rows' steps without telling. A NaN or inf only in the mask
            column, where that column is excluded (temperature 0, exclude_mask),
            is not read: the column counts as -inf either way.
        check_ids: check that x holds token ids in `[0, V)` before any work (one host
            sync on a GPU); False skips it (generate, whose x it built itself).

    Returns:
        ids `(B, R, k_soft + 1)` int64, w `(B, R, k_soft + 1)` in the logits dtype (the
        new soft representation: top-k ids then x, with their weights), transfer
        `(B, R)` bool (rows decoded this step).

    Sampling (temperature > 0 or remasking="random"): the torch backend draws the
    spec's float64 uniforms from `generator`; the fused backends draw one seed from
    it and use a counter-based RNG, so they match the spec in distribution, not
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
    if remasking not in ("low_confidence", "random"):
        _checks.fail("remasking", f"must be 'low_confidence' or 'random', got {remasking!r}")
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
    if _checks.boolean("check_ids", check_ids) and x.numel():
        lo, hi = (int(v) for v in torch.stack([x.min(), x.max()]).tolist())  # one host sync on a GPU
        if lo < 0 or hi >= V:
            _checks.fail("x", f"token ids must lie in [0, {V}), got min {lo} and max {hi}")

    name = _backend.resolve(dev, backend)
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
    ids, w, transfer, status = op(
        lg, x, conf, num_transfer, block_start, block_end, prompt_len, noise, rand_conf,
        row0, mask_id, k_soft, alpha, temperature, random_remask, threshold, exclude_mask, seed, name)
    if check_finite:
        bad = int(status[0])
        if bad >= 0:
            raise NonFiniteLogitsError(
                f"logits: row {bad % R} of batch {bad // R} (sequence position {row0 + bad % R}) "
                "holds NaN or infinite values; x and conf were left unchanged")
    return ids, w, transfer

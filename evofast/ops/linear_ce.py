"""`linear_cross_entropy`: the LM head and the cross-entropy in one pass, chunked over rows.

    logits = scale * (hidden @ weight.T + bias)            (N, V), fp32, never all at once
    loss   = sum_i [label_i != ignore] * (logsumexp(logits_i) - logits_i[label_i]) / n

(`n` = number of labelled rows for reduction "mean", 1 for "sum"). The rows are
processed `chunk_size` at a time: one (chunk, V) fp32 logits block is alive at
any moment, not N x V. The gradients are computed in the same pass, while the
block is in hand (softmax minus one-hot, then two matmuls), and kept until
backward, which only scales them by the incoming gradient: the logits are never
recomputed. The weight (and bias) gradient is accumulated in fp32 only when they
require grad (LoRA training leaves the head frozen).

`on_logits(start, stop, logits)` is called with every block (fp32, rows
`[start, stop)` of `hidden`, scale and bias applied) before the loss reads it,
under `torch.no_grad()`; it must not write into the block. CTS training uses it
to run `evo_step` (argmax, float64 confidence, top-k) on the logits it already
has, so the next trajectory step costs no second pass over the vocabulary.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks

#: default bytes of one fp32 logits block (rows x V x 4): chunk_size = max(1, budget // (4 V)); on a GPU
#: 4x more (fuller matmuls, still small beside the model). EVOFAST_CE_CHUNK_MIB overrides both.
_CHUNK_MIB = os.environ.get("EVOFAST_CE_CHUNK_MIB")
CHUNK_BYTES = int(_CHUNK_MIB or 64) << 20
CUDA_CHUNK_BYTES = int(_CHUNK_MIB or 256) << 20

LogitsHook = Callable[[int, int, Tensor], None]


def default_chunk_size(vocab: int, budget_bytes: int = CHUNK_BYTES) -> int:
    return max(1, int(budget_bytes) // (4 * max(1, int(vocab))))


def _forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, scale: float,
             ignore_index: int, reduction: str, chunk: int, on_logits: Optional[LogitsHook],
             need_h: bool, need_w: bool, need_b: bool):
    """-> (loss fp32 scalar, grad_hidden or None, grad_weight or None, grad_bias or None)."""
    N, d = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    valid = labels != ignore_index
    # labelled rows per chunk, on the host (one sync): chunks without any skip the loss and gradient work
    starts = list(range(0, N, chunk))
    per_chunk = (torch.zeros(len(starts), dtype=torch.int64, device=dev).index_add_(
        0, torch.arange(N, device=dev) // chunk, valid.to(torch.int64)).tolist() if N else [])
    n_valid = sum(per_chunk)
    denom = float(n_valid) if reduction == "mean" else 1.0
    need_grad = need_h or need_w or need_b
    total = torch.zeros((), dtype=torch.float64, device=dev)
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = torch.zeros(V, d, dtype=torch.float32, device=dev) if need_w else None
    grad_b = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
    # one (chunk, V) fp32 block reused by every chunk: a fresh one each time costs page faults
    buf = torch.empty(min(chunk, N), V, dtype=torch.float32, device=dev)
    plain = weight.dtype == torch.float32 and hidden.dtype == torch.float32 and not torch.is_autocast_enabled(
        dev.type)
    for c, s in enumerate(starts):
        e = min(N, s + chunk)
        h = hidden[s:e]
        logits = buf[:e - s]                                            # (R, V): the only V-wide block
        if not plain:                                                   # bf16 / autocast: the head's own dtype
            logits.copy_(F.linear(h, weight, bias))
        elif bias is None:
            torch.mm(h, weight.t(), out=logits)
        else:
            torch.addmm(bias, h, weight.t(), out=logits)
        if scale != 1.0:
            logits.mul_(scale)
        if on_logits is not None:
            with torch.no_grad():
                on_logits(s, e, logits)
        if per_chunk[c] == 0:
            continue
        v = valid[s:e]
        tgt = labels[s:e].clamp(0, V - 1)[:, None]                      # ignored rows: any column, masked below
        picked = logits.gather(1, tgt)                                  # (R, 1)
        m = logits.amax(dim=1, keepdim=True)
        probs = logits.sub_(m).exp_()                                   # in place: exp(l - max)
        sumexp = probs.sum(dim=1, keepdim=True)
        row_loss = (m + sumexp.log() - picked).squeeze(1)
        total += torch.where(v, row_loss, torch.zeros_like(row_loss)).sum(dtype=torch.float64)
        if not need_grad:
            continue
        # d loss / d raw logits = scale * (softmax - onehot) / denom on labelled rows, 0 elsewhere
        g = probs.div_(sumexp)
        g.scatter_add_(1, tgt, -torch.ones_like(picked))
        g.mul_((v.to(g.dtype) * (scale / denom))[:, None])
        gc = g.to(weight.dtype)
        if need_h:
            if plain:
                torch.mm(gc, weight, out=grad_h[s:e])
            else:
                grad_h[s:e] = (gc @ weight).to(hidden.dtype)
        if need_w:
            grad_w += (gc.t() @ h.to(weight.dtype)).float()
        if need_b:
            grad_b += g.sum(dim=0)
    loss = (total / denom).float() if n_valid or reduction == "sum" else torch.full((), float("nan"), device=dev)
    return (loss, grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Differentiable in hidden, weight and bias; the gradients are computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, scale, ignore_index, reduction, chunk, on_logits,
                need_h, need_w, need_b):
        loss, gh, gw, gb = _forward(hidden, weight, bias, labels, scale, ignore_index, reduction, chunk,
                                    on_logits, need_h, need_w, need_b)
        ctx.save_for_backward(*(t for t in (gh, gw, gb) if t is not None))
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.which = (gh is not None, gw is not None, gb is not None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_loss.to(torch.float32) if has else None for has in ctx.which]
        grads = [g if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        return (*grads,) + (None,) * 9


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                         scale: Optional[float] = None, ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: Optional[int] = None, on_logits: Optional[LogitsHook] = None) -> Tensor:
    """Cross-entropy of `scale * (hidden @ weight.T + bias)` against `labels`, without N x V logits.

    Args:
        hidden: `(N, d)` (or `(..., d)`, flattened) floating tensor: the LM head's input.
        weight: `(V, d)` output embedding; `bias`: `(V,)` or None; `scale`: logit multiplier.
        labels: `(N,)` (or `(...)`) integer targets in `[0, V)`, `ignore_index` for rows without loss.
        reduction: "mean" (over labelled rows; NaN when there are none, like F.cross_entropy) or "sum".
        chunk_size: rows per logits block (default: a 64 MiB fp32 block, 256 MiB on a GPU).
        on_logits: called as `on_logits(start, stop, logits_block)` with every block, see the module docstring.

    Returns the fp32 scalar loss, differentiable in `hidden`, `weight` and `bias`.
    """
    _checks.tensor("hidden", hidden, dtypes=_checks.WEIGHT_DTYPES)
    dev = hidden.device
    _checks.tensor("weight", weight, dim=2, dtypes=_checks.WEIGHT_DTYPES, device=dev)
    _checks.tensor("labels", labels, dtypes=(torch.int64, torch.int32), device=dev)
    V, d = weight.shape
    if hidden.dim() < 1 or hidden.shape[-1] != d:
        _checks.fail("hidden", f"last dimension must be the weight's d = {d}, got shape {tuple(hidden.shape)}")
    h2 = hidden.reshape(-1, d)
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        _checks.fail("labels", f"shape {tuple(labels.shape)} does not match hidden's rows {tuple(hidden.shape[:-1])}")
    lab = labels.reshape(-1).to(torch.int64)
    if bias is not None:
        _checks.tensor("bias", bias, dim=1, dtypes=_checks.WEIGHT_DTYPES, device=dev)
        if bias.shape[0] != V:
            _checks.fail("bias", f"expected shape ({V},), got {tuple(bias.shape)}")
    scale = 1.0 if scale is None else _checks.real("scale", scale)
    if reduction not in ("mean", "sum"):
        _checks.fail("reduction", f"must be 'mean' or 'sum', got {reduction!r}")
    ignore_index = _checks.integer("ignore_index", ignore_index)
    budget = CUDA_CHUNK_BYTES if dev.type == "cuda" else CHUNK_BYTES
    chunk = default_chunk_size(V, budget) if chunk_size is None else _checks.integer("chunk_size", chunk_size, 1)
    if on_logits is not None and not callable(on_logits):
        _checks.fail("on_logits", f"expected a callable, got {type(on_logits).__name__}")
    kept = lab[lab != ignore_index]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= V):
        _checks.fail("labels", f"values must lie in [0, {V}) or equal ignore_index={ignore_index}, got min "
                               f"{int(kept.min())} and max {int(kept.max())}")
    grad = torch.is_grad_enabled()
    need_h = grad and hidden.requires_grad
    need_w = grad and weight.requires_grad
    need_b = grad and bias is not None and bias.requires_grad
    if not (need_h or need_w or need_b):
        return _forward(h2, weight, bias, lab, scale, ignore_index, reduction, chunk, on_logits,
                        False, False, False)[0]
    return LinearCrossEntropyFunction.apply(h2, weight, bias, lab, scale, ignore_index, reduction, chunk, on_logits,
                                            need_h, need_w, need_b)


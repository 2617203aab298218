"""`soft_embed`: the weighted embedding gather of docs/semantics.md §1.

    out[..., :] = sum_j w'[..., j] * weight[ids[..., j], :],
    w' = clamp(w, min=0) / max(sum_j clamp(w, min=0), 1e-12)

Forward and backward are the custom ops `evofast::soft_embed_fwd` and
`evofast::soft_embed_bwd` (fake implementations for torch.compile), tied
together by `SoftEmbedFunction`, a torch.autograd.Function.

The forward equals the authors' model code bit for bit,
`(w'.unsqueeze(-1) * weight[ids]).sum(-2)` in the product dtype
`promote(w.dtype, weight.dtype)`, cast to weight.dtype: every backend computes
`w'` with torch's own ops (`reference.product_weights`; one ulp in the divisor
is enough to change later tokens of a sharp model), and the kernels only
gather, multiply (rounding each product to the product dtype, as torch does for
bf16 / fp16) and sum. The cpp backend sums with torch's reduction itself;
triton and cuda sum in order j = 0..J-1, which is torch's order wherever torch
sums sequentially (docs/semantics.md, "Exactness").
The backward accumulates in fp32 (float64 weights stay float64); the weight
gradient only touches the rows that `ids` names.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _backend, _checks
from .reference import soft_embed_bwd_reference, soft_embed_fwd_reference


def _soft_embed_fwd_impl(weight: Tensor, ids: Tensor, w: Tensor, backend: str) -> Tensor:
    if backend == "torch":
        return soft_embed_fwd_reference(weight, ids, w)
    if backend == "triton":
        from .triton_soft_embed import soft_embed_fwd_triton
        return soft_embed_fwd_triton(weight, ids, w)
    return torch.ops.evofast.soft_embed_fwd_fused(weight, ids, w)


def _soft_embed_bwd_impl(grad: Tensor, weight: Tensor, ids: Tensor, w: Tensor,
                         need_weight: bool, need_w: bool, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "torch":
        return soft_embed_bwd_reference(grad, weight, ids, w, need_weight, need_w)
    if backend == "triton":
        from .triton_soft_embed import soft_embed_bwd_triton
        return soft_embed_bwd_triton(grad, weight, ids, w, need_weight, need_w)
    return torch.ops.evofast.soft_embed_bwd_fused(grad, weight, ids, w, need_weight, need_w)


# What torch.compile sees. Eager calls skip the custom-op wrapper (a fixed Python
# cost per call that a small decode step notices) and run the implementation.
_soft_embed_fwd = torch.library.custom_op("evofast::soft_embed_fwd", _soft_embed_fwd_impl, mutates_args=())
_soft_embed_bwd = torch.library.custom_op("evofast::soft_embed_bwd", _soft_embed_bwd_impl, mutates_args=())


@_soft_embed_fwd.register_fake
def _(weight, ids, w, backend):
    return weight.new_empty(ids.shape[:-1] + (weight.shape[1],))


@_soft_embed_bwd.register_fake
def _(grad, weight, ids, w, need_weight, need_w, backend):
    gw = weight.new_empty(weight.shape if need_weight else (0,))
    gwt = w.new_empty(w.shape if need_w else (0,))
    return gw, gwt


class SoftEmbedFunction(torch.autograd.Function):
    """Differentiable in `weight` and `w`; `ids` has no gradient."""

    @staticmethod
    def forward(ctx, weight: Tensor, ids: Tensor, w: Tensor, backend: str) -> Tensor:
        ctx.save_for_backward(weight, ids, w)
        ctx.backend = backend
        fwd = _soft_embed_fwd if torch.compiler.is_compiling() else _soft_embed_fwd_impl
        return fwd(weight, ids, w, backend)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, ids, w = ctx.saved_tensors
        need_weight, _, need_w, _ = ctx.needs_input_grad
        if not (need_weight or need_w):
            return None, None, None, None
        bwd = _soft_embed_bwd if torch.compiler.is_compiling() else _soft_embed_bwd_impl
        gw, gwt = bwd(grad.contiguous(), weight, ids, w, need_weight, need_w, ctx.backend)
        return (gw if need_weight else None), None, (gwt if need_w else None), None


def soft_embed(weight: Tensor, ids: Tensor, w: Tensor, *, backend: Optional[str] = None,
               check_ids: bool = True) -> Tensor:
    """Soft input embeddings: `weight (V, d)`, `ids (..., J)` int64, `w (..., J)` -> `(..., d)`.

    `ids` must lie in `[0, V)` (checked unless `check_ids=False`; the check reads
    `ids`, a host sync on GPU). The output has `weight`'s dtype.
    """
    _checks.tensor("weight", weight, dim=2, dtypes=_checks.WEIGHT_DTYPES)
    dev = weight.device
    _checks.tensor("ids", ids, dtypes=(torch.int64, torch.int32), device=dev)
    _checks.tensor("w", w, device=dev)
    if not w.dtype.is_floating_point:
        _checks.fail("w", f"expected a floating dtype, got {w.dtype}")
    if ids.dim() < 1:
        _checks.fail("ids", "expected at least one dimension (the soft-token axis)")
    if w.shape != ids.shape:
        _checks.fail("w", f"shape {tuple(w.shape)} does not match ids' {tuple(ids.shape)}")
    V = weight.shape[0]
    if check_ids and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        _checks.fail("ids", f"values must lie in [0, {V}), got min {int(ids.min())} and max {int(ids.max())}")
    name = _backend.resolve(dev, backend)
    args = (weight.contiguous(), ids.to(torch.int64).contiguous(), w.contiguous(), name)
    if torch.is_grad_enabled() and (weight.requires_grad or w.requires_grad):
        return SoftEmbedFunction.apply(*args)
    # nothing to differentiate (decoding): skip the autograd Function's fixed cost
    return (_soft_embed_fwd if torch.compiler.is_compiling() else _soft_embed_fwd_impl)(*args)

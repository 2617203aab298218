"""Triton backend of `soft_embed` (csrc/README.md).

    out[n] = sum_j wn[n, j] * weight[ids[n, j]],
    wn = c / D,  c = clamp(w, 0),  S = sum_j c_j,  D = max(S, 1e-12)

The forward normalises `w` with torch's own ops (`reference.product_weights`, in
the product dtype), rounds each product to that dtype and sums in order
j = 0..J-1 in fp32 (float64 for float64 products), without fused multiply-adds:
torch's own result wherever torch sums in order (csrc/README.md says where).

Shapes: `weight (V, d)` contiguous fp32 / fp16 / bf16 / float64, `ids (..., J)`
int64, `w (..., J)` floating, `grad (..., d)`; rows `n` are the flattened leading
dimensions. The backward accumulates in fp32 (float64 for float64 weights), as
the reference: `w` is cast to the accumulation dtype first, outputs are cast at
the end.

Kernels:
- `_soft_embed_fwd_kernel`, grid `(N, cdiv(d, BLOCK_D))`: a loop over j, one weight
  row slice of BLOCK_D columns per j.
- `_soft_embed_bwd_kernel`, grid `(N, cdiv(J, BLOCK_J))`, a loop over `d`:
  `grad_weight[ids_j] += wn_j * grad` with `tl.atomic_add` into an fp32 (float64)
  buffer, cast to `weight.dtype` afterwards; and `g_j = <grad, weight[ids_j]>`.
  When J fits one tile (J <= 32, the EvoToken case k + 1 <= 17) the same program
  finishes `grad_w_m = [w_m >= 0] * (g_m / D - [S >= 1e-12] * sum_j g_j c_j / D^2)`;
  otherwise `g` goes to a workspace and `_soft_embed_gradw_kernel` (grid `(N,)`)
  finishes it.

Casts to bf16 round to nearest even in integer arithmetic (`(u + 0x7FFF + ((u >> 16) & 1)) >> 16`
on the fp32 bits): what a GPU's `.to(tl.bfloat16)` does, while the interpreter's
truncates. float64 results go through fp32 first, as torch's `.to()` does.

Launch parameters: BLOCK_J = next_pow2(J) up to 32; BLOCK_D = min(next_pow2(d), 256,
2048 / BLOCK_J) (at least 32) on a GPU, up to 1024 in the interpreter; 4 warps.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _backend
from .reference import product_weights

try:  # see triton_evo_step: the combine functions behind tl.sum
    from triton.language.standard import _sum_combine as _SUM
except ImportError:  # pragma: no cover - other triton versions
    @triton.jit
    def _SUM(a, b):
        return a + b

MAX_BLOCK_J = 32
GPU_BLOCK_D = 256
GPU_TILE = 2048
INTERP_BLOCK_D = 1024


@triton.jit
def _clamped_sum(w_ptr, n, J, ACC: tl.constexpr, BLOCK_J: tl.constexpr):
    """S = sum_j clamp(w[n, j], 0), the denominator max(S, 1e-12), and 1e-12, in ACC."""
    jj = tl.arange(0, BLOCK_J)
    S = tl.full((BLOCK_J,), 0, ACC)
    for j0 in range(0, J, BLOCK_J):
        wv = tl.load(w_ptr + n * J + j0 + jj, mask=j0 + jj < J, other=0.0).to(ACC)
        S += tl.where(wv < 0, 0.0, wv)  # a clamp that keeps NaN, as torch's clamp_min
    S = tl.reduce(S, 0, _SUM)
    eps = tl.full([], 1e-12, ACC)
    return S, tl.where(S < eps, eps, S), eps


@triton.jit
def _bf16_rne(v):
    """fp32 -> bf16 rounding to nearest even (the interpreter's cast truncates; module docstring)."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(v != v, 0x7FC0, rounded)  # NaN stays a quiet NaN, as c10::BFloat16 does
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _soft_embed_fwd_kernel(
    weight_ptr, ids_ptr, wn_ptr, out_ptr, J, D, ACC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = dd < D
    acc = tl.full((BLOCK_D,), 0, ACC)
    for j in range(0, J):  # in order j = 0..J-1 (module docstring)
        f = tl.load(wn_ptr + n * J + j).to(ACC)
        idv = tl.load(ids_ptr + n * J + j)
        p = f * tl.load(weight_ptr + idv * D + dd, mask=dm, other=0.0).to(ACC)
        if wn_ptr.dtype.element_ty == tl.bfloat16:  # each product rounded to the product dtype
            p = _bf16_rne(p).to(ACC)
        elif wn_ptr.dtype.element_ty == tl.float16:
            p = p.to(tl.float16).to(ACC)
        acc += p
    if out_ptr.dtype.element_ty == tl.bfloat16:
        acc = _bf16_rne(acc.to(tl.float32))
    elif out_ptr.dtype.element_ty == tl.float16:
        acc = acc.to(tl.float32)
    tl.store(out_ptr + n * D + dd, acc.to(out_ptr.dtype.element_ty), mask=dm)


@triton.jit
def _soft_embed_bwd_kernel(
    grad_ptr, weight_ptr, ids_ptr, w_ptr, gw_ptr, gwt_ptr, g_ptr, J, D,
    NEED_WEIGHT: tl.constexpr, NEED_W: tl.constexpr, FUSED_W: tl.constexpr,
    ACC: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    jt = tl.program_id(1)
    jj = tl.arange(0, BLOCK_J)
    S, den, eps = _clamped_sum(w_ptr, n, J, ACC, BLOCK_J)
    jo = jt * BLOCK_J + jj
    jm = jo < J
    wv = tl.load(w_ptr + n * J + jo, mask=jm, other=0.0).to(ACC)
    c = tl.where(wv < 0, 0.0, wv)
    wn = c / den
    idv = tl.load(ids_ptr + n * J + jo, mask=jm, other=0)
    g = tl.full((BLOCK_J,), 0, ACC)
    dl = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + dl
        dm = dd < D
        gr = tl.load(grad_ptr + n * D + dd, mask=dm, other=0.0).to(ACC)
        m2 = jm[:, None] & dm[None, :]
        if NEED_WEIGHT:
            tl.atomic_add(gw_ptr + idv[:, None] * D + dd[None, :], wn[:, None] * gr[None, :], mask=m2,
                          sem="relaxed")
        if NEED_W:
            e = tl.load(weight_ptr + idv[:, None] * D + dd[None, :], mask=m2, other=0.0).to(ACC)
            g += tl.reduce(e * gr[None, :], 1, _SUM)
    if NEED_W:
        if FUSED_W:  # the whole J axis is in this tile
            through = tl.reduce(g * c, 0, _SUM) / (den * den) * (S >= eps).to(ACC)
            gwt = (g / den - through) * (wv >= 0).to(ACC)
            if gwt_ptr.dtype.element_ty == tl.bfloat16:
                gwt = _bf16_rne(gwt.to(tl.float32))
            tl.store(gwt_ptr + n * J + jo, gwt.to(gwt_ptr.dtype.element_ty), mask=jm)
        else:
            tl.store(g_ptr + n * J + jo, g, mask=jm)


@triton.jit
def _soft_embed_gradw_kernel(
    w_ptr, g_ptr, gwt_ptr, J, ACC: tl.constexpr, BLOCK_J: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    jj = tl.arange(0, BLOCK_J)
    S, den, eps = _clamped_sum(w_ptr, n, J, ACC, BLOCK_J)
    gc = tl.full((BLOCK_J,), 0, ACC)
    for j0 in range(0, J, BLOCK_J):
        jm = j0 + jj < J
        wv = tl.load(w_ptr + n * J + j0 + jj, mask=jm, other=0.0).to(ACC)
        g = tl.load(g_ptr + n * J + j0 + jj, mask=jm, other=0.0)
        gc += g * tl.where(wv < 0, 0.0, wv)
    through = tl.reduce(gc, 0, _SUM) / (den * den) * (S >= eps).to(ACC)
    for j0 in range(0, J, BLOCK_J):
        jm = j0 + jj < J
        wv = tl.load(w_ptr + n * J + j0 + jj, mask=jm, other=0.0).to(ACC)
        g = tl.load(g_ptr + n * J + j0 + jj, mask=jm, other=0.0)
        gwt = (g / den - through) * (wv >= 0).to(ACC)
        if gwt_ptr.dtype.element_ty == tl.bfloat16:
            gwt = _bf16_rne(gwt.to(tl.float32))
        tl.store(gwt_ptr + n * J + j0 + jj, gwt.to(gwt_ptr.dtype.element_ty), mask=jm)


def _acc(t: torch.Tensor):
    """The accumulation dtype of a weight (backward) or product (forward) dtype."""
    return (torch.float64, tl.float64) if t.dtype == torch.float64 else (torch.float32, tl.float32)


def _blocks(device: torch.device, J: int, D: int):
    """(BLOCK_J, BLOCK_D): a (BLOCK_J, BLOCK_D) tile of at most GPU_TILE elements on a GPU
    (registers), bigger in the interpreter (its cost is per operation)."""
    block_j = min(triton.next_power_of_2(max(J, 1)), MAX_BLOCK_J)
    if device.type == "cpu":
        cap = INTERP_BLOCK_D
    else:
        cap = max(32, min(GPU_BLOCK_D, GPU_TILE // block_j))
    return block_j, min(triton.next_power_of_2(max(D, 1)), cap)


def _check_device(t: torch.Tensor):
    if t.device.type == "cpu" and not _backend.triton_interpreted():
        raise RuntimeError("the triton backend runs CPU tensors only under TRITON_INTERPRET=1")


def soft_embed_fwd_triton(weight: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`soft_embed_fwd_fused`: `(..., J)` ids / w -> `(..., d)` in weight.dtype."""
    _check_device(weight)
    weight, ids = weight.contiguous(), ids.contiguous()
    wn = product_weights(weight, w.contiguous()).contiguous()
    V, D = weight.shape
    J = ids.shape[-1]
    N = ids.numel() // J if J else ids.shape[:-1].numel()
    out = torch.empty(ids.shape[:-1] + (D,), dtype=weight.dtype, device=weight.device)
    if N == 0 or D == 0:
        return out
    if J == 0:
        return out.zero_()
    _, acc = _acc(wn)
    _, BLOCK_D = _blocks(weight.device, 1, D)
    # no fused multiply-add: each product is rounded on its own, as torch's mul then sum
    _soft_embed_fwd_kernel[(N, triton.cdiv(D, BLOCK_D))](
        weight, ids, wn, out, J, D, ACC=acc, BLOCK_D=BLOCK_D, num_warps=4, enable_fp_fusion=False)
    return out


def soft_embed_bwd_triton(grad: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                          need_weight: bool, need_w: bool):
    """`soft_embed_bwd_fused`: (grad_weight (V, d) in weight.dtype, grad_w in w.dtype);
    an output not asked for is an empty tensor."""
    _check_device(weight)
    grad, weight, ids, w = grad.contiguous(), weight.contiguous(), ids.contiguous(), w.contiguous()
    V, D = weight.shape
    J = ids.shape[-1]
    N = ids.numel() // J if J else 0
    acc_t, acc = _acc(weight)
    dev = weight.device
    gw = torch.zeros((V, D), dtype=acc_t, device=dev) if need_weight else None
    gwt = torch.zeros(w.shape, dtype=w.dtype, device=dev) if need_w else None
    if N and D and (need_weight or need_w):
        BLOCK_J, BLOCK_D = _blocks(dev, J, D)
        n_jt = triton.cdiv(J, BLOCK_J)
        fused = n_jt == 1
        g = torch.empty(N * J, dtype=acc_t, device=dev) if (need_w and not fused) else None
        dummy = torch.empty(1, dtype=acc_t, device=dev)  # for pointers a launch does not use
        _soft_embed_bwd_kernel[(N, n_jt)](
            grad, weight, ids, w, dummy if gw is None else gw, dummy if gwt is None else gwt,
            dummy if g is None else g, J, D,
            NEED_WEIGHT=bool(need_weight), NEED_W=bool(need_w), FUSED_W=fused,
            ACC=acc, BLOCK_J=BLOCK_J, BLOCK_D=BLOCK_D, num_warps=4)
        if g is not None:
            _soft_embed_gradw_kernel[(N,)](w, g, gwt, J, ACC=acc, BLOCK_J=BLOCK_J, num_warps=4)
    if gw is None:
        gw = torch.empty((0,), dtype=weight.dtype, device=dev)
    elif gw.dtype != weight.dtype:
        gw = gw.to(weight.dtype)
    if gwt is None:
        gwt = torch.empty((0,), dtype=w.dtype, device=dev)
    return gw, gwt

"""STDD's per-row thresholds on the Triton backend (the definition: evofast/ops/stdd.py).

Two launches before the sequence kernel of triton_evo_step.py, which then transfers every
eligible row with `q >= tau` (or the best one) and records q in the history:

1. `_stdd_gram_kernel`, grid `(B*R,)`, only with a spatial term (`lam_s != 0`, `radius > 0`,
   `R > 1`): the Gram band `G[i, d] = <l_i, l_{i+d}>`, `d = 0..2r`, in float64 over the columns
   except the mask column. A separate pass: each program reads its row and the `2r` rows after
   it, tile by tile, so the logits window is read `2r + 1` times (from L2 mostly) on top of the
   row pass (the cpp backend sums the band inside its single pass).
2. `_stdd_tau_kernel`, grid `(cdiv(B*R, BLOCK),)`: `TV` from the history (and this step's q),
   `SD` from the band, `tau = clamp(tau + lam_t * TV + lam_s * SD, tau_min, tau_max)`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .stdd import STDD

GRAM_BLOCK_GPU = 2048
GRAM_BLOCK_INTERP = 65536
TAU_BLOCK = 128


@triton.jit
def _stdd_gram_kernel(logits_ptr, stride_b, stride_r, R, V, mask_id, gram_ptr,
                      D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    b = i // R
    r = i - b * R
    base = logits_ptr + b.to(tl.int64) * stride_b
    dd = tl.arange(0, DP)
    acc = tl.zeros((DP,), tl.float64)
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        m = (offs < V) & (offs != mask_id)
        a = tl.load(base + r.to(tl.int64) * stride_r + offs, mask=m, other=0.0).to(tl.float64)
        for d in tl.static_range(D + 1):
            inside = (offs * 0 + r + d) < R  # a block, not a scalar bool (the interpreter's masks)
            nb = tl.load(base + (r + d).to(tl.int64) * stride_r + offs, mask=m & inside,
                         other=0.0).to(tl.float64)
            acc = tl.where(dd == d, acc + tl.sum(a * nb, 0), acc)
    tl.store(gram_ptr + i.to(tl.int64) * (D + 1) + dd, acc, mask=dd <= D)


@triton.jit
def _band(gram_ptr, b, u, v, R, rm, D: tl.constexpr):
    """G(u, v) of window rows u, v (|u - v| <= D) of batch rows b."""
    lo = tl.minimum(u, v)
    d = tl.maximum(u, v) - lo
    ok = rm & (lo >= 0) & (tl.maximum(u, v) < R)
    return tl.load(gram_ptr + (b.to(tl.int64) * R + lo) * (D + 1) + d, mask=ok, other=0.0)


@triton.jit(do_not_specialize=["row0", "tau_bits", "lam_t_bits", "lam_s_bits", "lo_bits", "hi_bits"])
def _stdd_tau_kernel(q_ptr, hist_ptr, count_ptr, gram_ptr, tau_ptr, BR, R, L, row0,
                     tau_bits, lam_t_bits, lam_s_bits, lo_bits, hi_bits,
                     W: tl.constexpr, RADIUS: tl.constexpr, TV_ON: tl.constexpr, SD_ON: tl.constexpr,
                     BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rm = rows < BR
    b = rows // R
    r = rows - b * R
    q = tl.load(q_ptr + rows, mask=rm, other=0.0)
    t = tl.cast(tau_bits, tl.int64).to(tl.float64, bitcast=True) + tl.zeros((BLOCK,), tl.float64)
    if TV_ON:  # population std of the last W values, this q included, oldest first
        lam_t = tl.cast(lam_t_bits, tl.int64).to(tl.float64, bitcast=True)
        cnt = tl.maximum(tl.load(count_ptr + b.to(tl.int64) * L + row0 + r, mask=rm, other=0), 0)
        n = tl.minimum(cnt + 1, W)
        first = cnt + 1 - n
        hrow = hist_ptr + (b.to(tl.int64) * L + row0 + r) * W
        acc = tl.zeros((BLOCK,), tl.float64)
        for j in tl.static_range(W):
            sq = first + j
            v = tl.where(sq == cnt, q, tl.load(hrow + sq % W, mask=rm & (j < n) & (sq != cnt), other=0.0))
            acc += tl.where(j < n, v, 0.0)
        mean = acc / n.to(tl.float64)
        acc2 = tl.zeros((BLOCK,), tl.float64)
        for j in tl.static_range(W):
            sq = first + j
            v = tl.where(sq == cnt, q, tl.load(hrow + sq % W, mask=rm & (j < n) & (sq != cnt), other=0.0))
            dv = v - mean
            acc2 += tl.where(j < n, dv * dv, 0.0)
        tv = tl.where(n >= 2, tl.sqrt(acc2 / n.to(tl.float64)), 0.0)
        t = t + lam_t * tv
    if SD_ON:  # 1 - cos(l_i, mean of the neighbours), from the Gram band
        lam_s = tl.cast(lam_s_bits, tl.int64).to(tl.float64, bitcast=True)
        D: tl.constexpr = 2 * RADIUS
        dot = tl.zeros((BLOCK,), tl.float64)
        nm = tl.zeros((BLOCK,), tl.float64)
        has = r < 0
        for ia in tl.static_range(2 * RADIUS + 1):
            a = ia - RADIUS
            if a != 0:
                va = (r + a >= 0) & (r + a < R)
                has = has | va
                dot += tl.where(va, _band(gram_ptr, b, r, r + a, R, rm, D), 0.0)
                for ic in tl.static_range(2 * RADIUS + 1):
                    c = ic - RADIUS
                    if c != 0:
                        vc = (r + c >= 0) & (r + c < R)
                        nm += tl.where(va & vc, _band(gram_ptr, b, r + a, r + c, R, rm, D), 0.0)
        ni = _band(gram_ptr, b, r, r, R, rm, D)
        den = tl.sqrt(ni) * tl.sqrt(nm)
        cos = dot / tl.where(den > 0.0, den, 1.0)  # den 0: no neighbour or a zero row (SD 0 below)
        fin = (ni == ni) & (ni < float("inf")) & (nm == nm) & (nm < float("inf")) & (cos == cos) & \
            (cos < float("inf")) & (cos > float("-inf"))
        ok = has & (ni > 0.0) & (nm > 0.0) & fin
        sd = tl.where(ok, tl.minimum(tl.maximum(1.0 - cos, 0.0), 2.0), 0.0)
        t = t + lam_s * sd
    lo = tl.cast(lo_bits, tl.int64).to(tl.float64, bitcast=True)
    hi = tl.cast(hi_bits, tl.int64).to(tl.float64, bitcast=True)
    tl.store(tau_ptr + rows, tl.minimum(tl.maximum(t, lo), hi), mask=rm)


def stdd_thresholds(logits: torch.Tensor, q: torch.Tensor, history: torch.Tensor, count: torch.Tensor,
                    stdd: STDD, row0: int, mask_id: int, f64_bits) -> torch.Tensor:
    """tau per window row, flat (B*R,) float64, for this step's q (flat (B*R,))."""
    B, R, V = logits.shape
    L = count.shape[1]
    dev = logits.device
    sd_on = stdd.lam_s != 0 and stdd.radius > 0 and R > 1
    D = 2 * stdd.radius
    gram = torch.empty(B * R * (D + 1) if sd_on else 1, dtype=torch.float64, device=dev)
    if sd_on:
        block = GRAM_BLOCK_INTERP if dev.type == "cpu" else GRAM_BLOCK_GPU
        _stdd_gram_kernel[(B * R,)](logits, logits.stride(0), logits.stride(1), R, V, mask_id, gram,
                                    D=D, DP=triton.next_power_of_2(D + 1),
                                    BLOCK=min(block, triton.next_power_of_2(V)), num_warps=4)
    tau = torch.empty(B * R, dtype=torch.float64, device=dev)
    _stdd_tau_kernel[(triton.cdiv(B * R, TAU_BLOCK),)](
        q, history, count, gram, tau, B * R, R, L, row0,
        f64_bits(stdd.tau), f64_bits(stdd.lam_t), f64_bits(stdd.lam_s), f64_bits(stdd.tau_min),
        f64_bits(stdd.tau_max), W=stdd.window, RADIUS=stdd.radius, TV_ON=stdd.lam_t != 0, SD_ON=sd_on,
        BLOCK=TAU_BLOCK, num_warps=4)
    return tau

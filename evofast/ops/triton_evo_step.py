"""Triton backend of `evo_step` (csrc/README.md; docs/semantics.md, decoding items 2-7).

`evo_step_triton` returns `(ids, w, transfer, status)` with the contract of
`evo_step_fused`. Three launches; each logits row is read once (the merge re-reads
k + 1 scalars per row):

1. `_evo_chunk_kernel`, grid `(cdiv(B*R, ROWS), NC)`: a `(ROWS, BLOCK_V)` tile, the
   vocabulary chunk `[c*BLOCK_V, (c+1)*BLOCK_V)` of ROWS rows (ROWS > 1 only when V
   is small). Per row it writes partials: chunk max `m_c` (fp32),
   `s_c = sum exp(l - m_c)` (float64; NaN when the chunk holds a NaN), the chunk
   top-k and, when sampling, the chunk's Gumbel argmax. Order is carried by packed
   integer keys: a monotone integer image of the value above the reversed index,
   so one integer max picks the larger value and, on ties, the smaller index, and
   k iterations of max + remove give the top-k. In the chunk the key is built
   from the logits' own bits (16-bit dtypes pack key and local index into an
   int32, fp32 into an int64); across chunks it is an int64 with the global index.
2. `_evo_merge_kernel`, grid `(cdiv(B*R, ROWS_M),)`: log-sum-exp merge in float64
   (`mx = max m_c`, `s = sum s_c exp(m_c - mx)`), top-k over the `NC*k`
   candidates, `x0`, `q = exp(l[x0] - mx) / s`, `tp = exp(l - mx) / s` (float64),
   the top-k ids straight into `ids[..., :k]`, `cand = q` on eligible rows
   (`x == M` and `pos < block_end`, read before any write) else -1, and
   `status = min(b*R + r)` over non-finite rows (atomic min into a buffer that
   starts at the sentinel `B*R`).
3. `_evo_seq_kernel`, grid `(B, cdiv(R, BLOCK_I))`: transfer, revision, `ids[..., k]`,
   `w`, and the in-place `x` / `conf` stores. Without a threshold row i is
   transferred when it is eligible and
   `rank_i = #{j: cand_j > cand_i or (cand_j == cand_i and j < i)} < num_transfer[b]`
   (counted over the whole window in BLOCK_J tiles, so the row tiles need no
   communication; ineligible rows hold -1 and never count); with a threshold when
   `cand_i >= threshold` or i is the best row (largest q, smallest position).
   Every program reads `status`: when any row is non-finite nothing is written to
   `x` / `conf`. Program (0, 0) turns the sentinel into -1.

Sampling (temperature > 0): `x0 = argmax_v(l_v - T * log(E_v))` over the
columns (M excluded with exclude_mask), `E_v = -log(u_v)`, `u_v = 1 - a_v`,
`a_v = (r + 0.5) 2^-32` with r the Philox-4x32-10 word `v % 4` of the counter
`(v // 4, pos, b, 0)` under `seed`; `E_v` is computed in fp32 as `-log1p(-a_v)`,
which resolves the upper Gumbel tail. Random remasking: `q` is a float64 uniform
in (0, 1) from 52 bits of the counter `(0, pos, b, 1)`. Both match the reference's
float64 draws in distribution, not bit for bit (the torch backend draws from
the torch.Generator); a draw depends on (seed, b, pos, v) only, not on the tiling.

Per-step options (csrc/README.md, evo_step_fused_opt): the margin takes the top-2 of the
merged candidates (the chunk lists keep max(k, 2) entries); the entropy adds a chunk
partial `sum exp(l - m_c) (l - m_c)` merged as `exp(m_c - mx) (e_c + (m_c - mx) s_c)`;
the top_k filter keeps, per chunk, its top_k sampled columns with their Gumbel scores
and the count / best score of the columns tied with its last value, and the merge takes
the global top_k-th value, the kept candidates, x0 and q on the filtered distribution;
STDD's thresholds come from triton_stdd.py and the sequence kernel selects and records
the history. Ineligible rows carry q = -inf in `cand` (q itself may be negative).

Greedy results equal the torch reference except on exact ties, where this
backend follows csrc/README.md (smaller index / position first) while
`torch.topk` may order ties otherwise (frequent with bf16 logits).

Launch parameters (`_config`): on a GPU `BLOCK_V = min(4096, next_pow2(V))` and
ROWS = 4096 / BLOCK_V rows per chunk program (8 warps for 4096-element tiles),
merge tiles of about 2048 candidates (4 warps), `BLOCK_I = 64`, `BLOCK_J = 32`
(4 warps). Under TRITON_INTERPRET=1 (CPU tensors) the cost is per operation,
not per element, so tiles are 64K elements (`BLOCK_V` up to 65536); `block_v=`
overrides the chunk (tests use small ones to run the split-V merge).
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from . import _backend
from .triton_soft_embed import _bf16_rne

try:  # the combine functions behind tl.max / tl.min / tl.sum: reducing with them
    # directly is the same code on a GPU, and the interpreter runs them as numpy
    # reductions without re-patching triton.language for each nested jit call
    from triton.language.standard import _elementwise_max as _MAX
    from triton.language.standard import _elementwise_min as _MIN
    from triton.language.standard import _sum_combine as _SUM
except ImportError:  # pragma: no cover - other triton versions
    @triton.jit
    def _MAX(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _MIN(a, b):
        return tl.minimum(a, b)

    @triton.jit
    def _SUM(a, b):
        return a + b

GPU_BLOCK_V = 4096       # vocabulary chunk of one program
GPU_CHUNK_WARPS = 8
GPU_TILE = 4096          # elements per program tile (several rows per program when V is small)
INTERP_BLOCK_V = 65536
INTERP_TILE = 65536
BLOCK_I = 64
BLOCK_J = 32

def _sortable(bits: int, nbits: int) -> int:
    """The monotone integer image of a float's signed bit pattern (as the kernels compute it)."""
    return bits ^ ((1 << (nbits - 1)) - 1) if bits < 0 else bits


# sortable key of -inf in each logits dtype: the key of the excluded mask column
_NEG_INF_KEY = {
    torch.float32: _sortable(struct.unpack("<i", struct.pack("<f", float("-inf")))[0], 32),
    torch.bfloat16: _sortable(struct.unpack("<h", b"\x80\xff")[0], 16),
    torch.float16: _sortable(struct.unpack("<h", b"\x00\xfc")[0], 16),
}


def _f64_bits(v: float) -> int:
    """float64 bit pattern as a signed int: float scalars reach kernels as fp32 otherwise."""
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


# values that change from call to call are not specialised on (no recompiles)
@triton.jit(do_not_specialize=["row0", "seed"])
def _evo_chunk_kernel(
    logits_ptr, stride_b, stride_r, BR, R, V, mask_id, row0, seed, temperature,
    part_m_ptr, part_s_ptr, part_top_ptr, part_arg_ptr, NC,
    part_e_ptr, part_ftop_ptr, part_fsc_ptr, part_fovc_ptr, part_fovb_ptr,
    KT: tl.constexpr, KP: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
    KEY16: tl.constexpr, NEG_INF_KEY: tl.constexpr,
    EXCL: tl.constexpr, SAMPLE: tl.constexpr, SAMPLE_EXCL: tl.constexpr,
    ENT: tl.constexpr, FK: tl.constexpr, FKP: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # flat rows b * R + r
    c = tl.program_id(1)
    rm = rows < BR
    b = rows // R
    r = rows - b * R
    roff = b.to(tl.int64) * stride_b + r.to(tl.int64) * stride_r
    start = c * BLOCK_V
    lidx = tl.arange(0, BLOCK_V)[None, :]
    offs = start + lidx
    inb = rm[:, None] & (offs < V)
    raw = tl.load(logits_ptr + roff[:, None] + offs, mask=inb, other=0.0)
    l = raw.to(tl.float32)
    isnan = l != l
    if EXCL:  # temperature 0 with exclude_mask: column M is -inf for everything
        isnan = isnan & (offs != mask_id)
        l = tl.where(offs == mask_id, float("-inf"), l)
    l = tl.where(inb, l, float("-inf"))
    has_nan = tl.reduce(isnan.to(tl.int32), 1, _MAX)

    # softmax partials (float64)
    m = tl.reduce(l, 1, _MAX)
    # an all -inf chunk sums exp(-inf) = 0; a +inf one sums inf (the row is non-finite)
    m_ref = tl.where((m == float("-inf")) | (m == float("inf")), 0.0, m)
    s = tl.reduce(tl.exp(l.to(tl.float64) - m_ref.to(tl.float64)[:, None]), 1, _SUM)
    s = tl.where(has_nan > 0, float("nan"), s)
    pofs = rows.to(tl.int64) * NC + c
    tl.store(part_m_ptr + pofs, m, mask=rm)
    tl.store(part_s_ptr + pofs, s, mask=rm)
    if ENT:  # sum exp(d) d, d = l - m: the entropy's numerator (0 where exp(d) is 0)
        d = tl.where(l == float("-inf"), 0.0, l.to(tl.float64) - m_ref.to(tl.float64)[:, None])
        tl.store(part_e_ptr + pofs, tl.reduce(tl.where(l == float("-inf"), 0.0, tl.exp(d) * d), 1, _SUM),
                 mask=rm)

    # top-k of the chunk over packed keys (value, then smaller index)
    if KEY16:
        bits = raw.to(tl.int16, bitcast=True).to(tl.int32)
        key = tl.where(bits < 0, bits ^ 0x7FFF, bits)
        PK_MIN: tl.constexpr = -2147483648
    else:
        bits = raw.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        PK_MIN: tl.constexpr = -9223372036854775808
    key = tl.where(l == 0.0, 0, key)  # -0.0 ties with +0.0
    if EXCL:
        key = tl.where(offs == mask_id, NEG_INF_KEY, key)
    if KEY16:
        pk0 = key * 65536 + (65535 - lidx)
    else:
        pk0 = key.to(tl.int64) * 65536 + (65535 - lidx)
    pk0 = tl.where(inb, pk0, PK_MIN)
    pk = pk0
    kk = tl.arange(0, KP)[None, :]
    tk = tl.full((ROWS, KP), PK_MIN, pk.dtype)
    for j in tl.static_range(KT):
        best = tl.reduce(pk, 1, _MAX)
        tk = tl.where(kk == j, best[:, None], tk)
        pk = tl.where(pk == best[:, None], PK_MIN, pk)
    gidx = start + (65535 - (tk & 65535))
    packed = (tk >> 16).to(tl.int64) * 4294967296 + (4294967295 - gidx.to(tl.int64))
    packed = tl.where(tk == PK_MIN, -9223372036854775808, packed)  # chunk shorter than k
    tl.store(part_top_ptr + pofs[:, None] * KT + kk, packed, mask=rm[:, None] & (kk < KT))

    if SAMPLE:  # Gumbel-max: argmax of l - T * log(E), E ~ Exp(1) from Philox
        BV4: tl.constexpr = BLOCK_V // 4
        zero = tl.full((ROWS, BV4), 0, tl.uint32)
        ctr = zero + (start // 4 + tl.arange(0, BV4)).to(tl.uint32)[None, :]
        pos = zero + (row0 + r).to(tl.uint32)[:, None]
        bb = zero + b.to(tl.uint32)[:, None]
        r0, r1, r2, r3 = tl.philox(seed, ctr, pos, bb, zero)
        sel = tl.arange(0, 4)[None, None, :]
        word = tl.where(sel == 0, r0[:, :, None], tl.where(sel == 1, r1[:, :, None],
                        tl.where(sel == 2, r2[:, :, None], r3[:, :, None])))
        word = tl.reshape(word, (ROWS, BLOCK_V))  # element v <- word v % 4 of counter v // 4
        wu = (word.to(tl.float32) + 0.5) * 2.3283064365386963e-10
        wu = tl.minimum(wu, 0.99999994)
        u = 1.0 - wu
        e = tl.where(u == 1.0, wu, -tl.log(u) * (wu / (1.0 - u)))  # -log1p(-wu), accurate near 0
        score = l - temperature * tl.log(e)
        if SAMPLE_EXCL:
            score = tl.where(offs == mask_id, float("-inf"), score)
        sb = score.to(tl.int32, bitcast=True)
        skey = tl.where(sb < 0, sb ^ 0x7FFFFFFF, sb)
        skey = tl.where(score == 0.0, 0, skey)
        sp = skey.to(tl.int64) * 4294967296 + (4294967295 - offs.to(tl.int64))
        sp = tl.where(inb, sp, -9223372036854775808)
        if FK > 0:
            _filter_chunk(pk0, score, sp, offs, mask_id, start, pofs, rm, part_ftop_ptr, part_fsc_ptr,
                          part_fovc_ptr, part_fovb_ptr, ROWS, FK, FKP, SAMPLE_EXCL, PK_MIN)
        else:
            tl.store(part_arg_ptr + pofs, tl.reduce(sp, 1, _MAX), mask=rm)


@triton.jit
def _filter_chunk(pk, score, sp, offs, mask_id, start, pofs, rm, part_ftop_ptr, part_fsc_ptr,
                  part_fovc_ptr, part_fovb_ptr,
                  ROWS: tl.constexpr, FK: tl.constexpr, FKP: tl.constexpr, SAMPLE_EXCL: tl.constexpr,
                  PK_MIN: tl.constexpr):
    """The top_k filter in a chunk: its FK largest sampled columns (packed keys) with their
    scores, and the columns left over that equal the FK-th value (count, best packed score)."""
    if SAMPLE_EXCL:
        pk = tl.where(offs == mask_id, PK_MIN, pk)
    ff = tl.arange(0, FKP)[None, :]
    ftk = tl.full((ROWS, FKP), PK_MIN, pk.dtype)
    fsc = tl.full((ROWS, FKP), float("-inf"), tl.float32)
    for j in tl.static_range(FK):
        best = tl.reduce(pk, 1, _MAX)
        ftk = tl.where(ff == j, best[:, None], ftk)
        hit = pk == best[:, None]
        fsc = tl.where(ff == j, tl.reduce(tl.where(hit, score, float("-inf")), 1, _MAX)[:, None], fsc)
        pk = tl.where(hit, PK_MIN, pk)
    last = tl.reduce(tl.where(ff == FK - 1, ftk, PK_MIN), 1, _MAX)
    ovf = (pk != PK_MIN) & ((pk >> 16) == (last >> 16)[:, None]) & (last != PK_MIN)[:, None]
    tl.store(part_fovc_ptr + pofs, tl.reduce(ovf.to(tl.int64), 1, _SUM), mask=rm)
    tl.store(part_fovb_ptr + pofs, tl.reduce(tl.where(ovf, sp, -9223372036854775808), 1, _MAX), mask=rm)
    gidx = start + (65535 - (ftk & 65535))
    packed = (ftk >> 16).to(tl.int64) * 4294967296 + (4294967295 - gidx.to(tl.int64))
    packed = tl.where(ftk == PK_MIN, -9223372036854775808, packed)
    fm = rm[:, None] & (ff < FK)
    tl.store(part_ftop_ptr + pofs[:, None] * FK + ff, packed, mask=fm)
    tl.store(part_fsc_ptr + pofs[:, None] * FK + ff, fsc, mask=fm)


@triton.jit
def _score_key(score, idx):
    """A float32 score and its column packed into one int64: larger score, then smaller index."""
    sb = score.to(tl.int32, bitcast=True)
    skey = tl.where(sb < 0, sb ^ 0x7FFFFFFF, sb)
    skey = tl.where(score == 0.0, 0, skey)
    return skey.to(tl.int64) * 4294967296 + (4294967295 - idx.to(tl.int64))


@triton.jit
def _filter_merge(logits_ptr, roff, rows64, rm, ci, cm, NC, temperature,
                  part_ftop_ptr, part_fsc_ptr, part_fovc_ptr, part_fovb_ptr,
                  ROWS: tl.constexpr, FK: tl.constexpr, NCFKP: tl.constexpr, CONF: tl.constexpr):
    """x0 and q of the top_k filter (csrc/README.md): the global FK-th value over the chunks'
    candidates, the kept columns (candidates at or above it, and the chunks' left-over ties),
    the Gumbel argmax among them and q on the filtered distribution at the temperature.
    Returns (x0, q, bad)."""
    I64_MIN: tl.constexpr = -9223372036854775808
    t2 = tl.arange(0, NCFKP)[None, :]
    tm = rm[:, None] & (t2 < NC * FK)
    cand = tl.load(part_ftop_ptr + rows64[:, None] * (NC * FK) + t2, mask=tm, other=I64_MIN)
    work = cand
    top0 = tl.full((ROWS,), I64_MIN, tl.int64)
    top1 = tl.full((ROWS,), I64_MIN, tl.int64)
    kth = tl.full((ROWS,), I64_MIN, tl.int64)
    for j in tl.static_range(FK):
        best = tl.reduce(work, 1, _MAX)
        if j == 0:
            top0 = best
        if j == 1:
            top1 = best
        if j == FK - 1:
            kth = best
        work = tl.where(work == best[:, None], I64_MIN, work)
    full = kth != I64_MIN  # fewer than FK sampled columns: every candidate is kept
    valid = cand != I64_MIN
    kept = valid & (((cand >> 32) >= (kth >> 32)[:, None]) | (full == 0)[:, None])
    gidx = 4294967295 - (cand & 4294967295)
    lv = tl.load(logits_ptr + roff[:, None] + gidx, mask=kept, other=float("-inf")).to(tl.float32)
    i0 = 4294967295 - (top0 & 4294967295)
    mxf = tl.load(logits_ptr + roff + i0, mask=rm & (top0 != I64_MIN), other=float("-inf")).to(tl.float32)
    ik = 4294967295 - (kth & 4294967295)
    tval = tl.load(logits_ptr + roff + ik, mask=rm & full, other=float("-inf")).to(tl.float32)
    bad = rm & ((top0 == I64_MIN) | (mxf == float("-inf")))
    mx64 = tl.where(bad | (rm == 0), 0.0, mxf.to(tl.float64))
    # the chunks whose own FK-th value is the global one add their left-over ties
    clast = tl.load(part_ftop_ptr + rows64[:, None] * (NC * FK) + ci * FK + (FK - 1), mask=cm, other=I64_MIN)
    on = cm & full[:, None] & (clast != I64_MIN) & ((clast >> 32) == (kth >> 32)[:, None])
    novf = tl.reduce(tl.where(on, tl.load(part_fovc_ptr + rows64[:, None] * NC + ci, mask=cm, other=0), 0), 1, _SUM)
    obest = tl.reduce(tl.where(on, tl.load(part_fovb_ptr + rows64[:, None] * NC + ci, mask=cm, other=I64_MIN),
                               I64_MIN), 1, _MAX)
    a = tl.where(kept, (lv.to(tl.float64) - mx64[:, None]) / temperature, float("-inf"))
    w = tl.exp(a)
    a = tl.where(w > 0.0, a, 0.0)  # exp(a) a is 0 where exp(a) is (no -inf * 0)
    at = tl.where(novf > 0, (tval.to(tl.float64) - mx64) / temperature, 0.0)
    wt = tl.where(novf > 0, tl.exp(at), 0.0)
    sf = tl.reduce(tl.where(kept, w, 0.0), 1, _SUM) + novf.to(tl.float64) * wt
    sf = tl.where(bad | (rm == 0), 1.0, sf)
    fsc = tl.load(part_fsc_ptr + rows64[:, None] * (NC * FK) + t2, mask=tm, other=float("-inf"))
    sbest = tl.maximum(tl.reduce(tl.where(kept, _score_key(fsc, gidx), I64_MIN), 1, _MAX), obest)
    x0 = 4294967295 - (sbest & 4294967295)
    if CONF == 1:  # margin: the second kept value (a tie left over when FK is 1)
        i1 = 4294967295 - (top1 & 4294967295)
        l1 = tl.load(logits_ptr + roff + i1, mask=rm & (top1 != I64_MIN), other=float("-inf")).to(tl.float32)
        w2 = tl.where(top1 != I64_MIN, tl.exp((l1.to(tl.float64) - mx64) / temperature), 0.0)
        if FK == 1:
            w2 = wt
        q = 1.0 / sf - w2 / sf
    elif CONF == 2:  # entropy
        ef = tl.reduce(w * a, 1, _SUM) + novf.to(tl.float64) * (wt * at)
        q = ef / sf - tl.log(sf)
    else:
        lx = tl.load(logits_ptr + roff + x0, mask=rm & (bad == 0), other=0.0).to(tl.float32)
        q = tl.exp((lx.to(tl.float64) - mx64) / temperature) / sf
    return x0, q, bad


@triton.jit(do_not_specialize=["row0", "seed"])
def _evo_merge_kernel(
    logits_ptr, stride_b, stride_r, x_ptr, L, block_end_ptr, BR, R, V, mask_id, row0, seed, temperature,
    part_m_ptr, part_s_ptr, part_top_ptr, part_arg_ptr, NC,
    part_e_ptr, part_ftop_ptr, part_fsc_ptr, part_fovc_ptr, part_fovb_ptr,
    x0_ptr, q_ptr, cand_ptr, tp_ptr, ids_ptr, status_ptr,
    K: tl.constexpr, KT: tl.constexpr, KP: tl.constexpr, ROWS: tl.constexpr, NCP: tl.constexpr,
    NCKP: tl.constexpr, EXCL: tl.constexpr, SAMPLE: tl.constexpr, RANDQ: tl.constexpr,
    CONF: tl.constexpr, FK: tl.constexpr, NCFKP: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rm = rows < BR
    b = rows // R
    r = rows - b * R
    pos = row0 + r
    roff = b.to(tl.int64) * stride_b + r.to(tl.int64) * stride_r
    rows64 = rows.to(tl.int64)

    # log-sum-exp merge (float64)
    ci = tl.arange(0, NCP)[None, :]
    cm = rm[:, None] & (ci < NC)
    pm = tl.load(part_m_ptr + rows64[:, None] * NC + ci, mask=cm, other=float("-inf"))
    ps = tl.load(part_s_ptr + rows64[:, None] * NC + ci, mask=cm, other=0.0)
    mx = tl.reduce(pm, 1, _MAX)
    mx64 = mx.to(tl.float64)
    # chunks with m_c = -inf add s_c * 0 (a NaN s_c stays NaN); an all -inf row sums to 0
    inf_mx = (mx == float("-inf")) | (mx == float("inf"))
    s = tl.reduce(ps * tl.exp(pm.to(tl.float64) - tl.where(inf_mx, 0.0, mx64)[:, None]), 1, _SUM)
    bad = rm & ((mx != mx) | inf_mx | (s != s) | (s == float("inf")))
    # outputs of bad rows are unspecified: keep their arithmetic finite
    s = tl.where(bad | (rm == 0), 1.0, s)
    mx64 = tl.where(bad | (rm == 0), 0.0, mx64)

    # top-k over the NC*KT chunk candidates
    t = tl.arange(0, NCKP)[None, :]
    cand_k = tl.load(part_top_ptr + rows64[:, None] * (NC * KT) + t, mask=rm[:, None] & (t < NC * KT),
                     other=-9223372036854775808)
    kk = tl.arange(0, KP)[None, :]
    tk = tl.full((ROWS, KP), -9223372036854775808, tl.int64)
    for j in tl.static_range(KT):
        best = tl.reduce(cand_k, 1, _MAX)
        tk = tl.where(kk == j, best[:, None], tk)
        cand_k = tl.where(cand_k == best[:, None], -9223372036854775808, cand_k)
    ti = 4294967295 - (tk & 4294967295)
    km = rm[:, None] & (kk < KT) & (ti < V)
    lt = tl.load(logits_ptr + roff[:, None] + ti, mask=km, other=float("-inf")).to(tl.float32)
    if EXCL:
        lt = tl.where(ti == mask_id, float("-inf"), lt)
    tp = tl.exp(lt.to(tl.float64) - mx64[:, None]) / s[:, None]
    tl.store(tp_ptr + rows64[:, None] * K + kk, tp, mask=rm[:, None] & (kk < K))
    tl.store(ids_ptr + rows64[:, None] * (K + 1) + kk, ti, mask=rm[:, None] & (kk < K))

    # x0 and q
    if FK > 0:
        x0, q, fbad = _filter_merge(logits_ptr, roff, rows64, rm, ci, cm, NC, temperature,
                                    part_ftop_ptr, part_fsc_ptr, part_fovc_ptr, part_fovb_ptr,
                                    ROWS, FK, NCFKP, CONF)
        bad = bad | fbad
    else:
        if SAMPLE:
            sp = tl.load(part_arg_ptr + rows64[:, None] * NC + ci, mask=cm, other=-9223372036854775808)
            x0 = 4294967295 - (tl.reduce(sp, 1, _MAX) & 4294967295)
        else:
            x0 = tl.reduce(tl.where(kk == 0, ti, -1), 1, _MAX)
        x0 = tl.minimum(tl.maximum(x0, 0), V - 1)
        if CONF == 1:  # margin: p of the top-1 minus p of the top-2
            q = tl.reduce(tl.where(kk == 0, tp, 0.0), 1, _SUM) - tl.reduce(tl.where(kk == 1, tp, 0.0), 1, _SUM)
        elif CONF == 2:  # entropy: E / s - log s, E = sum exp(l - mx) (l - mx)
            pe = tl.load(part_e_ptr + rows64[:, None] * NC + ci, mask=cm, other=0.0)
            dm = tl.where(pm == float("-inf"), 0.0, pm.to(tl.float64) - mx64[:, None])
            ent = tl.reduce(tl.where(pm == float("-inf"), 0.0, tl.exp(dm) * (pe + dm * ps)), 1, _SUM)
            q = ent / s - tl.log(s)
        else:
            lx = tl.load(logits_ptr + roff + x0, mask=rm, other=float("-inf")).to(tl.float32)
            if EXCL:
                lx = tl.where(x0 == mask_id, float("-inf"), lx)
            q = tl.exp(lx.to(tl.float64) - mx64) / s
    x0 = tl.minimum(tl.maximum(x0, 0), V - 1)
    if RANDQ:  # float64 uniform in (0, 1) from 52 random bits: odd multiples of 2^-53
        zero = tl.full((ROWS,), 0, tl.uint32)
        h0, h1, h2, h3 = tl.philox(seed, zero, zero + pos.to(tl.uint32), zero + b.to(tl.uint32), zero + 1)
        u52 = (h0.to(tl.uint64) << 20) | (h1.to(tl.uint64) >> 12)
        q = ((u52 << 1) | 1).to(tl.float64) * 1.1102230246251565e-16

    xb = tl.load(x_ptr + b.to(tl.int64) * L + pos, mask=rm, other=-1)
    be = tl.load(block_end_ptr + b, mask=rm, other=0)
    elig = (xb == mask_id) & (pos < be)
    tl.store(x0_ptr + rows64, x0, mask=rm)
    tl.store(q_ptr + rows64, q, mask=rm)
    tl.store(cand_ptr + rows64, tl.where(elig, q, float("-inf")), mask=rm)
    tl.atomic_min(status_ptr + rows64 * 0, rows64, mask=bad, sem="relaxed")


@triton.jit
def _stdd_select(cand_ptr, tau_ptr, b, R, ri, rowi, im, ci, elig, BLOCK_J: tl.constexpr):
    """STDD's transfer of rows ri: q >= tau when any eligible row of batch row b passes, else
    the one eligible row first in the order (q - tau desc, q desc, position asc)."""
    jj = tl.arange(0, BLOCK_J)
    any_pass = tl.full([], 0, tl.int32)
    best_d = tl.full([], float("-inf"), tl.float64)
    best_q = tl.full([], float("-inf"), tl.float64)
    best_i = tl.full([], -1, tl.int32)
    for j0 in range(0, R, BLOCK_J):
        rj = j0 + jj
        jm = rj < R
        cj = tl.load(cand_ptr + b.to(tl.int64) * R + rj, mask=jm, other=float("-inf"))
        tj = tl.load(tau_ptr + b.to(tl.int64) * R + rj, mask=jm, other=0.0)
        ej = cj > float("-inf")
        any_pass = tl.maximum(any_pass, tl.reduce((ej & (cj >= tj)).to(tl.int32), 0, _MAX))
        dj = tl.where(ej, cj - tj, float("-inf"))
        tmax_d = tl.reduce(dj, 0, _MAX)
        qj = tl.where(ej & (dj == tmax_d), cj, float("-inf"))
        tmax_q = tl.reduce(qj, 0, _MAX)
        tidx = tl.reduce(tl.where(ej & (dj == tmax_d) & (qj == tmax_q), rj, 2147483647), 0, _MIN)
        take = (tmax_d > best_d) | ((tmax_d == best_d) & (tmax_q > best_q))
        best_i = tl.where(take, tidx, best_i)
        best_d = tl.where(take, tmax_d, best_d)
        best_q = tl.where(take, tmax_q, best_q)
    ti = tl.load(tau_ptr + rowi, mask=im, other=0.0)
    return elig & tl.where(any_pass > 0, ci >= ti, ri == best_i)


@triton.jit(do_not_specialize=["row0", "alpha_bits", "thr_bits"])
def _evo_seq_kernel(
    x_ptr, conf_ptr, L, B, R, row0, mask_id,
    num_transfer_ptr, block_start_ptr, prompt_len_ptr,
    x0_ptr, q_ptr, cand_ptr, tp_ptr, ids_ptr, w_ptr, transfer_ptr, status_ptr,
    alpha_bits, thr_bits, tau_ptr, hist_ptr, count_ptr,
    K: tl.constexpr, KP1: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    USE_THR: tl.constexpr, EXCLM: tl.constexpr, STDD: tl.constexpr, W: tl.constexpr,
):
    b = tl.program_id(0)
    it = tl.program_id(1)
    ri = it * BLOCK_I + tl.arange(0, BLOCK_I)
    im = ri < R
    # status as a block (the same address in every lane): -1 or the sentinel B*R
    # mean every row is finite
    st = tl.load(status_ptr + ri * 0)
    ok = (st < 0) | (st >= B * R)
    lane0 = (ri + b) == 0  # program (0, 0), lane 0 (no scalar bool & block: the interpreter mis-splats it)
    tl.store(status_ptr + ri * 0, tl.full((BLOCK_I,), -1, tl.int64), mask=lane0 & (st >= B * R))
    rowi = b.to(tl.int64) * R + ri
    # cand: q on eligible rows, -inf elsewhere (q itself may be negative: entropy)
    ci = tl.load(cand_ptr + rowi, mask=im, other=float("-inf"))
    elig = ci > float("-inf")
    jj = tl.arange(0, BLOCK_J)
    if STDD:
        transfer = _stdd_select(cand_ptr, tau_ptr, b, R, ri, rowi, im, ci, elig, BLOCK_J)
    elif USE_THR:
        thr = tl.cast(thr_bits, tl.int64).to(tl.float64, bitcast=True)
        best_v = tl.full([], float("-inf"), tl.float64)
        best_i = tl.full([], 0, tl.int32)
        for j0 in range(0, R, BLOCK_J):
            rj = j0 + jj
            cj = tl.load(cand_ptr + b.to(tl.int64) * R + rj, mask=rj < R, other=float("-inf"))
            tmax = tl.reduce(cj, 0, _MAX)
            tidx = tl.reduce(tl.where(cj == tmax, rj, 2147483647), 0, _MIN)
            take = tmax > best_v
            best_i = tl.where(take, tidx, best_i)
            best_v = tl.where(take, tmax, best_v)
        transfer = elig & ((ci >= thr) | (ri == best_i))
    else:
        nt = tl.load(num_transfer_ptr + b)
        rank = tl.full((BLOCK_I,), 0, tl.int32)
        for j0 in range(0, R, BLOCK_J):
            rj = j0 + jj
            cj = tl.load(cand_ptr + b.to(tl.int64) * R + rj, mask=rj < R, other=float("-inf"))
            ahead = (cj[None, :] > ci[:, None]) | ((cj[None, :] == ci[:, None]) & (rj[None, :] < ri[:, None]))
            rank += tl.reduce(ahead.to(tl.int32), 1, _SUM)
        transfer = elig & (rank.to(tl.int64) < nt)

    pos = row0 + ri
    xoff = b.to(tl.int64) * L + pos
    xo = tl.load(x_ptr + xoff, mask=im, other=0)
    co = tl.load(conf_ptr + xoff, mask=im, other=0.0)
    x0 = tl.load(x0_ptr + rowi, mask=im, other=0)
    q = tl.load(q_ptr + rowi, mask=im, other=0.0)
    xn = tl.where(transfer, x0, xo)
    cn = tl.where(transfer, q, co)
    frozen_end = tl.maximum(tl.load(block_start_ptr + b), tl.load(prompt_len_ptr + b))
    revise = (pos >= frozen_end) & (xn != mask_id) & (q > cn)
    if EXCLM:
        revise = revise & (x0 != mask_id)
    xn = tl.where(revise, x0, xn)
    cn = tl.where(revise, q, cn)
    upd = (transfer | revise) & im & ok
    tl.store(x_ptr + xoff, xn, mask=upd)
    tl.store(conf_ptr + xoff, cn, mask=upd)
    if STDD:  # record q in the ring buffer of every eligible row
        rec = elig & im & ok
        cnt = tl.maximum(tl.load(count_ptr + xoff, mask=rec, other=0), 0)
        tl.store(hist_ptr + xoff * W + cnt % W, q, mask=rec)
        tl.store(count_ptr + xoff, cnt + 1, mask=rec)
    tl.store(transfer_ptr + rowi, transfer, mask=im)
    tl.store(ids_ptr + rowi * (K + 1) + K, xn, mask=im)

    # new representation: w = [tp, e] / sum, [0..0, 1] on decoded rows
    alpha = tl.cast(alpha_bits, tl.int64).to(tl.float64, bitcast=True)
    kk = tl.arange(0, KP1)[None, :]
    tp = tl.load(tp_ptr + rowi[:, None] * K + kk, mask=im[:, None] & (kk < K), other=0.0)
    tsum = tl.reduce(tp, 1, _SUM)
    e = tl.where(xn == mask_id, tsum / (1.0 - alpha) * alpha, 0.0)
    den = tl.where(im & ok, tsum + e, 1.0)  # (lanes past R, unspecified outputs: no 0/0)
    wv = tl.where(kk < K, tp, e[:, None]) / den[:, None]
    decoded = (pos < frozen_end)[:, None]
    wv = tl.where(decoded, tl.where(kk == K, 1.0, 0.0), wv)
    # float64 -> float32 -> logits dtype (round to nearest even twice, as torch's .to()); bf16
    # in integers: the interpreter truncates in .to(tl.bfloat16), a GPU rounds the same way
    wv = wv.to(tl.float32)
    if w_ptr.dtype.element_ty == tl.bfloat16:
        wv = _bf16_rne(wv)
    wv = wv.to(w_ptr.dtype.element_ty)
    tl.store(w_ptr + rowi[:, None] * (K + 1) + kk, wv, mask=im[:, None] & (kk <= K))


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def _config(device: torch.device, BR: int, V: int, K: int, block_v: int | None, FK: int = 0):
    """(BLOCK_V, chunk rows, chunk warps, merge rows): tiles of about 4K elements on a
    GPU; under the interpreter, whose cost is per operation, tiles of about 64K."""
    interp = device.type == "cpu"
    budget = INTERP_TILE if interp else GPU_TILE
    if block_v is None:
        block_v = INTERP_BLOCK_V if interp else GPU_BLOCK_V
    block_v = max(16, min(block_v, _pow2(V)))
    assert block_v & (block_v - 1) == 0 and block_v <= 65536, "BLOCK_V: a power of two <= 65536"
    rows = max(1, min(_pow2(BR), budget // block_v))
    warps = 4 if interp else (GPU_CHUNK_WARPS if rows * block_v >= 4096 else 4)
    nckp = _pow2(triton.cdiv(V, block_v) * max(K, FK))
    merge_rows = max(1, min(_pow2(BR), (budget // 2) // nckp))
    return block_v, rows, warps, merge_rows


CONFIDENCE = {"prob": 0, "margin": 1, "entropy": 2}


def evo_step_triton(logits, x, conf, num_transfer, block_start, block_end, prompt_len,
                    row0: int, mask_id: int, k_soft: int, alpha: float, temperature: float,
                    random_remask: bool, threshold: float, use_threshold: bool,
                    exclude_mask: bool, seed: int, *, block_v: int | None = None,
                    confidence: str = "prob", top_k: int = 0, stdd=None, stdd_history=None,
                    stdd_count=None, return_probs: bool = False):
    """The `evo_step_fused_opt` contract of csrc/README.md; returns (ids, w, transfer, status),
    with return_probs also (tp float32, q float64). `top_k` (<= 64, temperature > 0) is the
    sampling filter, `stdd` an `evofast.ops.STDD` with its history tensors.

    `block_v` overrides the vocabulary chunk (a power of two; tests use small ones).
    """
    if logits.device.type == "cpu" and not _backend.triton_interpreted():
        raise RuntimeError("the triton backend runs CPU tensors only under TRITON_INTERPRET=1")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, R, V = logits.shape
    K = int(k_soft)
    L = x.shape[1]
    dev = logits.device
    BR = B * R
    sample = temperature > 0
    FK = int(top_k) if sample else 0
    assert 0 <= FK <= 64, "top_k: the Triton filter takes at most 64"
    CONF = CONFIDENCE[confidence]
    KT = max(K, 2) if CONF == 1 and FK == 0 else K  # the margin needs the top-2 of p
    BLOCK_V, ROWS, chunk_warps, MROWS = _config(dev, BR, V, KT, block_v, FK)
    NC = triton.cdiv(V, BLOCK_V)
    excl = bool(exclude_mask) and not sample
    ent = CONF == 2 and FK == 0

    f64 = dict(dtype=torch.float64, device=dev)
    i64 = dict(dtype=torch.int64, device=dev)
    part_m = torch.empty(BR * NC, dtype=torch.float32, device=dev)
    part_s = torch.empty(BR * NC, **f64)
    part_top = torch.empty(BR * NC * KT, **i64)
    part_arg = torch.empty(BR * NC if sample and not FK else 1, **i64)
    part_e = torch.empty(BR * NC if ent else 1, **f64)
    part_ftop = torch.empty(BR * NC * FK if FK else 1, **i64)
    part_fsc = torch.empty(BR * NC * FK if FK else 1, dtype=torch.float32, device=dev)
    part_fovc = torch.empty(BR * NC if FK else 1, **i64)
    part_fovb = torch.empty(BR * NC if FK else 1, **i64)
    x0 = torch.empty(BR, **i64)
    q = torch.empty(BR, **f64)
    cand = torch.empty(BR, **f64)
    tp = torch.empty(BR * K, **f64)
    ids = torch.empty((B, R, K + 1), **i64)
    w = torch.empty((B, R, K + 1), dtype=logits.dtype, device=dev)
    transfer = torch.empty((B, R), dtype=torch.bool, device=dev)
    status = torch.full((1,), BR, **i64)
    KP = _pow2(KT)

    _evo_chunk_kernel[(triton.cdiv(BR, ROWS), NC)](
        logits, logits.stride(0), logits.stride(1), BR, R, V, mask_id, row0, seed, float(temperature),
        part_m, part_s, part_top, part_arg, NC, part_e, part_ftop, part_fsc, part_fovc, part_fovb,
        KT=KT, KP=KP, ROWS=ROWS, BLOCK_V=BLOCK_V, KEY16=logits.dtype != torch.float32,
        NEG_INF_KEY=_NEG_INF_KEY[logits.dtype], EXCL=excl, SAMPLE=sample,
        SAMPLE_EXCL=bool(exclude_mask) and sample, ENT=ent, FK=FK, FKP=_pow2(FK), num_warps=chunk_warps)
    _evo_merge_kernel[(triton.cdiv(BR, MROWS),)](
        logits, logits.stride(0), logits.stride(1), x, L, block_end, BR, R, V, mask_id, row0, seed,
        float(temperature), part_m, part_s, part_top, part_arg, NC,
        part_e, part_ftop, part_fsc, part_fovc, part_fovb,
        x0, q, cand, tp, ids, status,
        K=K, KT=KT, KP=KP, ROWS=MROWS, NCP=_pow2(NC), NCKP=_pow2(NC * KT),
        EXCL=excl, SAMPLE=sample, RANDQ=bool(random_remask), CONF=CONF, FK=FK, NCFKP=_pow2(NC * FK),
        num_warps=4)
    if stdd is not None:
        from .triton_stdd import stdd_thresholds
        tau = stdd_thresholds(logits, q, stdd_history, stdd_count, stdd, row0, mask_id, _f64_bits)
        hist, count, W = stdd_history, stdd_count, stdd.window
    else:
        tau = hist = count = q  # unused
        W = 1
    _evo_seq_kernel[(B, triton.cdiv(R, BLOCK_I))](
        x, conf, L, B, R, row0, mask_id, num_transfer, block_start, prompt_len,
        x0, q, cand, tp, ids, w, transfer, status,
        _f64_bits(alpha), _f64_bits(threshold if use_threshold else 0.0), tau, hist, count,
        K=K, KP1=_pow2(K + 1), BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J,
        USE_THR=bool(use_threshold), EXCLM=bool(exclude_mask), STDD=stdd is not None, W=W, num_warps=4)
    if return_probs:
        return ids, w, transfer, status, tp.view(B, R, K).float(), q.view(B, R)
    return ids, w, transfer, status

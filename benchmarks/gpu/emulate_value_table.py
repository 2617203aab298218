"""CPU emulation of evo_row_kernel's row pass (csrc/cuda/evo_row.cuh), bf16 logits,
greedy (SAMPLE=false): the default path (TABLE=false) and the value-table path
(TABLE=true), for one row (or one split-V chunk + evo_merge). It checks the
algorithm, not the CUDA code: keep it in step with consume_table / fold_table.
Besides errors against a float64 reference it counts how often a whole warp
stays on the table's fast path (a lane on consume() holds its warp there).

Faithful to the per-thread algorithm: 256 threads, thread t takes groups
g = t, t + 256, ... of 8 columns (the kernel's loop takes them two per iteration,
g and g + nt, then g += 2 nt: per thread the order is simply increasing g), the
scalar tail by thread 0 after its groups, fold_table per thread, then the warp
butterflies of combine_ms (xor 16..1), warp 0's butterfly over the 8 warp
results, the exact top-k merge, finalize_row; split-V: per-chunk partial
records folded by evo_merge_kernel's lane loop + butterfly.

exp_nonpos / libdevice exp are emulated by numpy's exp (<= 1 ulp); with
NOISE > 0 every per-column exp, table entry and rescale factor gets a random
relative error of up to NOISE ulp (exp_nonpos is documented "about 2 ulp").

Run: python benchmarks/gpu/emulate_value_table.py [NOISE_ULP]   (about 10 s)
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch

NT = 256           # kRowThreads
WARP = 32
N = 8              # bf16 columns per group (16 bytes)
NO_INDEX = 0x7FFFFFFF
LO_EXP = 127 - 12   # kTableLoExp
HALF = 20 * 128    # kTableHalf
TABLE_REF = 256.0
TABLE_MIN_COLS = 32768
NOISE = 0.0        # ulps of random error on every exp (set by main)
RNG = np.random.default_rng(12345)

np.seterr(all="ignore")


def xexp(x):
    """exp with an optional emulated error of up to NOISE ulp."""
    r = np.exp(x)
    if NOISE:
        r = r * (1.0 + NOISE * 2.0 ** -53 * RNG.uniform(-1.0, 1.0, np.shape(r)))
    return r


def table_values():
    j = np.arange(2 * HALF, dtype=np.uint32)
    neg = (j >= HALF).astype(np.uint32)
    r = j - neg * np.uint32(HALF)
    u = (neg << 31) | (((r >> 7) + LO_EXP) << 23) | ((r & 0x7F) << 16)
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


TABLE_V = table_values()


def make_table():
    return xexp(TABLE_V - TABLE_REF)


# ------------------------------------------------------------------ per-thread state
class Acc:
    def __init__(self, n, K):
        self.m = np.full(n, -np.inf)          # float values (exact in float64)
        self.s = np.zeros(n)
        self.st = np.zeros(n)
        self.tv = np.full((n, K), -np.inf)
        self.ti = np.full((n, K), NO_INDEX, dtype=np.int64)
        self.K = K


def better(a, ia, b, ib):
    return (a > b) | ((a == b) & (ia < ib))


def topk_insert(acc, rows, nv, ni):
    """TopK::push for threads `rows` (admits + sorted insertion)."""
    K = acc.K
    adm = better(nv, ni, acc.tv[rows, K - 1], acc.ti[rows, K - 1])
    if not adm.any():
        return
    r = rows[adm]
    nv, ni = nv[adm], ni[adm]
    v = np.concatenate([acc.tv[r], nv[:, None]], axis=1)
    i = np.concatenate([acc.ti[r], ni[:, None]], axis=1)
    order = np.lexsort((i, -v), axis=-1)[:, :K]   # value desc, index asc (no NaN here)
    acc.tv[r] = np.take_along_axis(v, order, 1)
    acc.ti[r] = np.take_along_axis(i, order, 1)


def consume(acc, rows, f, base, skip):
    """consume<N, K, false> for the threads `rows`; f (n, N) float values, base (n,)."""
    if len(rows) == 0:
        return
    f = f.copy()
    n, NN = f.shape
    cols = base[:, None] + np.arange(NN)[None, :]
    f[cols == skip] = -np.inf
    vmax = np.full(n, -np.inf)
    for e in range(NN):
        vmax = np.where(f[:, e] > vmax, f[:, e], vmax)  # NaN never becomes the max
    gate = vmax >= acc.tv[rows, acc.K - 1]
    if gate.any():
        gr = rows[gate]
        for e in range(NN):
            topk_insert(acc, gr, f[gate, e], cols[gate, e])
    up = vmax > acc.m[rows]
    if up.any():
        ru = rows[up]
        acc.s[ru] = acc.s[ru] * xexp(acc.m[ru] - vmax[up])
        acc.m[ru] = vmax[up]
    m = acc.m[rows]
    t = np.zeros(n)
    for e in range(NN):
        t = t + np.where(f[:, e] == -np.inf, 0.0, xexp(f[:, e] - m))
    acc.s[rows] = acc.s[rows] + t


def consume_table(acc, rows, w, base, skip, table):
    """consume_table: w (n, 4) uint32 words; returns the mask of threads that took it."""
    n = len(rows)
    out = np.zeros(n, dtype=np.uint32)
    binv = np.zeros((n, 8), dtype=np.uint32)
    fl = np.zeros((n, 8))
    for e in range(8):
        b = (w[:, e >> 1] >> np.uint32(16)) if (e & 1) else w[:, e >> 1]   # literal: even keeps the high half
        r = ((b & np.uint32(0x7FFF)) - np.uint32(LO_EXP << 7)).astype(np.uint32)  # wraps like unsigned
        out = np.maximum(out, r)
        binv[:, e] = r + ((b >> np.uint32(15)) & np.uint32(1)) * np.uint32(HALF)
        fl[:, e] = ((b & np.uint32(0xFFFF)) << np.uint32(16)).astype(np.uint32).view(np.float32)
    vmax = np.fmax.reduce(fl, axis=1)
    ok = out < np.uint32(HALF)
    ok &= ~(((skip - base) & 0xFFFFFFFF) < 8)
    if ok.any():
        r_ok = rows[ok]
        # top-k: as consume() (gate, then per-column push)
        gate = vmax[ok] >= acc.tv[r_ok, acc.K - 1]
        if gate.any():
            gr = r_ok[gate]
            cols = base[ok][gate][:, None] + np.arange(8)[None, :]
            for e in range(8):
                topk_insert(acc, gr, fl[ok][gate, e], cols[:, e])
        up = vmax[ok] > acc.m[r_ok]
        if up.any():
            ru = r_ok[up]
            acc.s[ru] = acc.s[ru] * xexp(acc.m[ru] - vmax[ok][up])
            acc.m[ru] = vmax[ok][up]
        u = table[binv[ok].astype(np.int64)]
        a01, a23, a45, a67 = u[:, 0] + u[:, 1], u[:, 2] + u[:, 3], u[:, 4] + u[:, 5], u[:, 6] + u[:, 7]
        acc.st[r_ok] += (a01 + a23) + (a45 + a67)
    return ok


def words_of(bits16):
    """(n, 8) uint16 patterns -> (n, 4) uint32 words, column 2i low half (load_words, both VEC)."""
    b = bits16.astype(np.uint32)
    return b[:, 0::2] | (b[:, 1::2] << np.uint32(16))


def scan_block(bits, c0, c1, skip, K, use_table, stats):
    """evo_row_kernel for columns [c0, c1) of the row: per-thread scan (+ fold)."""
    acc = Acc(NT, K)
    table = make_table() if use_table else None
    p = bits[c0:c1]
    length = c1 - c0
    vals = p.astype(np.uint32) << np.uint32(16)
    vals = vals.view(np.float32).astype(np.float64)
    ng = length // N
    tids = np.arange(NT)
    j = 0
    while True:
        g = tids + j * NT
        act = g < ng
        if not act.any():
            break
        rows = tids[act]
        gg = g[act]
        idx = gg[:, None] * N + np.arange(N)[None, :]
        base = c0 + gg * N
        if use_table:
            w = words_of(p[idx])
            took = consume_table(acc, rows, w, base, skip, table)
            stats["groups"] += len(rows)
            stats["fast"] += int(took.sum())
            # warp steps in which every active lane took the fast path (no divergence into consume)
            wid = rows // WARP
            for wv in np.unique(wid):
                stats["wsteps"] += 1
                stats["wfast"] += int(took[wid == wv].all())
            rest = ~took
            # words_to_float gives the same floats as the bf16 values
            consume(acc, rows[rest], vals[idx[rest]], base[rest], skip)
        else:
            consume(acc, rows, vals[idx], base, skip)
        j += 1
    # scalar tail by thread 0
    for col in range(ng * N, length):
        consume(acc, np.array([0]), vals[col:col + 1][None, :], np.array([c0 + col]), skip)
    if use_table:  # fold_table
        nz = acc.st != 0.0
        acc.s[nz] = acc.s[nz] + acc.st[nz] * xexp(TABLE_REF - acc.m[nz])
        acc.st[:] = 0.0
    return acc


def combine_ms(m, s, m2, s2):
    mn = np.where(m > m2, m, m2)
    t1 = np.where(s == 0.0, 0.0, s * xexp(m - mn))
    t2 = np.where(s2 == 0.0, 0.0, s2 * xexp(m2 - mn))
    return mn, t1 + t2


def butterfly(m, s):
    """warp_reduce_row's (m, s) part over 32 lanes; returns lane 0's result."""
    m, s = m.copy(), s.copy()
    lanes = np.arange(WARP)
    for o in (16, 8, 4, 2, 1):
        m2, s2 = m[lanes ^ o], s[lanes ^ o]
        m, s = combine_ms(m, s, m2, s2)
    return m[0], s[0]


def block_reduce(acc, rounds):
    wm, ws = np.zeros(NT // WARP), np.zeros(NT // WARP)
    for wi in range(NT // WARP):
        sl = slice(wi * WARP, (wi + 1) * WARP)
        wm[wi], ws[wi] = butterfly(acc.m[sl], acc.s[sl])
    m0 = np.full(WARP, -np.inf)
    s0 = np.zeros(WARP)
    m0[:len(wm)], s0[:len(ws)] = wm, ws
    m, s = butterfly(m0, s0)
    # top-k: the merges keep the exact `rounds` best of the union
    v, i = acc.tv.ravel(), acc.ti.ravel()
    order = np.lexsort((i, -v))[:rounds]
    return m, s, v[order], i[order]


def emulate_row(bits, skip, k, splits=1, use_table=True, force_table=False):
    """Whole row -> (status_ok, x0, q, tp, ti, stats)."""
    V = len(bits)
    K = 4 if k <= 4 else 16
    rounds = max(k, 1)
    if splits <= 1 or V <= 256:
        chunk, ns = V, 1
    else:
        chunk = -(-(-(-V // splits)) // 256) * 256
        ns = -(-V // chunk)
        if ns <= 1:
            chunk, ns = V, 1
    table_on = use_table and (force_table or chunk >= TABLE_MIN_COLS)
    stats = dict(groups=0, fast=0, wsteps=0, wfast=0, table=table_on, splits=ns)
    parts = []
    for sp in range(ns):
        c0, c1 = sp * chunk, min(sp * chunk + chunk, V)
        acc = scan_block(bits, c0, c1, skip, K, table_on, stats)
        parts.append(block_reduce(acc, rounds))
    if ns == 1:
        m, s, tv, ti = parts[0]
    else:  # evo_merge_kernel: lane sp takes partials sp, sp + 32, ...
        lm, ls = np.full(WARP, -np.inf), np.zeros(WARP)
        for sp, (pm, ps, _, _) in enumerate(parts):
            lm[sp % WARP], ls[sp % WARP] = combine_ms(lm[sp % WARP], ls[sp % WARP], pm, ps)
        m, s = butterfly(lm, ls)
        v = np.concatenate([p[2] for p in parts])
        i = np.concatenate([p[3] for p in parts])
        order = np.lexsort((i, -v))[:rounds]
        tv, ti = v[order], i[order]
    ok = bool(np.isfinite(m) and np.isfinite(s))
    q = math.exp(tv[0] - m) / s if ok else float("nan")
    tp = np.exp(tv[:k] - m) / s
    return ok, int(ti[0]), q, tp, ti[:k], m, s, stats


def reference(bits, skip, k):
    l = (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    if skip >= 0:
        l[skip] = -np.inf
    mx = np.max(l)
    if np.isnan(l).any() or not np.isfinite(mx):
        return False, None, None, None, None, None, None
    s = math.fsum(np.exp(l - mx))
    order = np.argsort(-l, kind="stable")
    x0 = int(order[0])
    q = math.exp(l[x0] - mx) / s
    ti = order[:k]
    tp = np.exp(l[ti] - mx) / s
    return True, x0, q, tp, ti, mx, s


# ------------------------------------------------------------------ test rows
def bf16_bits(x):
    t = torch.as_tensor(np.asarray(x, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16).copy()


def rows(V, seed):
    g = np.random.default_rng(seed)
    base = g.standard_normal(V).astype(np.float32) * 3
    out = {}
    out["randn*3"] = base.copy()
    # the GPU test's rows (tests/test_cuda.py::test_evo_step_bf16_value_table)
    pick = g.random(V)
    def decorate(x, shift=0.0):
        x = x.copy() + shift
        x[pick < 0.01] = 0.0
        sel = (pick >= 0.01) & (pick < 0.02)
        x[sel] *= 1e-3
        big = (pick >= 0.02) & (pick < 0.021)
        x[big] = 300.0 + 100 * pick[big]
        x[(pick >= 0.021) & (pick < 0.022)] = -np.inf
        return x
    out["test-mix"] = decorate(base)
    out["test-row2(-200,then big)"] = decorate(base, -200.0)
    out["test-row1(mix-200)"] = decorate(base) - 200.0
    one = np.full(V, -np.inf, dtype=np.float32)
    one[5] = 1.0
    out["one finite"] = one
    out["all in range -200"] = np.clip(base, -50, 50) - 200.0
    out["max ~ -255"] = np.clip(base, -1, 1) - 254.0
    out["ints(ties)"] = np.round(base / 2)
    t = np.round(base / 2)
    t[: V // 2 * 2: 2] = t[1: V // 2 * 2: 2]
    out["pair ties"] = t
    out["tiny only"] = base * 1e-4
    out["zeros+in-range"] = np.where(g.random(V) < 0.3, 0.0, base).astype(np.float32)
    out["huge max 1e4"] = np.where(np.arange(V) == V // 3, 1e4, base).astype(np.float32)
    out["max 745+"] = np.where(np.arange(V) == 7, 1000.0, base * 10).astype(np.float32)
    out["subnormals"] = np.where(g.random(V) < 0.5, np.float32(1e-40), base).astype(np.float32)
    out["-0.0 mix"] = np.where(g.random(V) < 0.5, np.float32(-0.0), base).astype(np.float32)
    out["big only >=256"] = 256.0 + np.abs(base) * 10
    x = base.copy(); x[V // 2] = np.nan
    out["nan"] = x
    x = base.copy(); x[V // 2] = np.inf
    out["+inf"] = x
    out["all -inf"] = np.full(V, -np.inf, dtype=np.float32)
    # increasing ramp: every group is a new max -> generic path only
    out["ramp"] = np.linspace(-100, 100, V).astype(np.float32)
    out["decreasing ramp"] = np.linspace(100, -100, V).astype(np.float32)
    return out


def main():
    global NOISE
    NOISE = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
    configs = [  # (V, skip, k, splits, force)
        (126464, 126336, 3, 1, False),
        (126464, 126336, 3, 3, False),
        (126464, 0, 8, 1, False),
        (126464, 126463, 16, 3, False),
        (126464, -1, 1, 1, False),
        (126464, 126336, 3, 7, True),    # chunks of 18176: GPU would not use the table; forced
        (1003, 1000, 3, 1, True),        # forced: skip column in the scalar tail
        (1003, 5, 16, 1, True),          # forced
        (50257, 50254, 3, 1, True),      # forced (GPU: chunk < 32768)
        (32775, 32772, 4, 1, False),
    ]
    worst = dict(s_ref=0.0, q_ref=0.0, tp_ref=0.0, s_def=0.0, q_def=0.0, q_tab_vs_def=0.0)
    mism = []
    fast_tot = [0, 0, 0, 0]
    for V, skip, k, splits, force in configs:
        for name, x in rows(V, V + k + splits).items():
            bits = bf16_bits(x)
            ref = reference(bits, skip, k)
            tab = emulate_row(bits, skip, k, splits, use_table=True, force_table=force)
            dft = emulate_row(bits, skip, k, splits, use_table=False)
            st = tab[7]
            fast_tot[0] += st["fast"]
            fast_tot[1] += st["groups"]
            fast_tot[2] += st["wfast"]
            fast_tot[3] += st["wsteps"]
            tag = f"V={V} skip={skip} k={k} splits={splits}{' forced' if force else ''} [{name}]"
            if not (tab[0] == dft[0] == ref[0]):
                mism.append(f"{tag}: status table={tab[0]} default={dft[0]} ref={ref[0]}")
                continue
            if not ref[0]:
                continue
            if tab[1] != ref[1] or dft[1] != ref[1]:
                mism.append(f"{tag}: x0 table={tab[1]} default={dft[1]} ref={ref[1]}")
            if not (np.array_equal(tab[4], ref[4]) and np.array_equal(dft[4], ref[4])):
                mism.append(f"{tag}: top-k ids table={tab[4]} default={dft[4]} ref={ref[4]}")
            if tab[5] != ref[5] or dft[5] != ref[5]:
                mism.append(f"{tag}: max table={tab[5]} default={dft[5]} ref={ref[5]}")
            rel = lambda a, b: abs(a - b) / abs(b)
            es, eq = rel(tab[6], ref[6]), rel(tab[2], ref[2])
            etp = float(np.max(np.abs(tab[3] - ref[3]) / ref[3])) if k else 0.0
            worst["s_ref"] = max(worst["s_ref"], es)
            worst["q_ref"] = max(worst["q_ref"], eq)
            worst["tp_ref"] = max(worst["tp_ref"], etp)
            worst["s_def"] = max(worst["s_def"], rel(dft[6], ref[6]))
            worst["q_def"] = max(worst["q_def"], rel(dft[2], ref[2]))
            worst["q_tab_vs_def"] = max(worst["q_tab_vs_def"], rel(tab[2], dft[2]))
            if eq > 1e-13:
                mism.append(f"{tag}: q rel err {eq:.3e}")
            print(f"{tag:70s} table={st['table']!s:5} fast={st['fast']}/{st['groups']} "
                  f"warp-all-fast={st['wfast']}/{st['wsteps']} s_err={es:.2e} q_err={eq:.2e} def_q_err={rel(dft[2], ref[2]):.2e}")
    print()
    print(f"NOISE={NOISE} ulp; fast-path groups {fast_tot[0]}/{fast_tot[1]}; warp steps with no lane in consume() {fast_tot[2]}/{fast_tot[3]}")
    for kk, v in worst.items():
        print(f"max rel err {kk:14s} {v:.3e}")
    print("mismatches:", len(mism))
    for m in mism:
        print("  ", m)
    return 1 if mism else 0


if __name__ == "__main__":
    sys.exit(main())

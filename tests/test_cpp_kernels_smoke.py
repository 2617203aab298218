"""Smoke tests of the C++ CPU kernels (evofast._C) called directly through
torch.ops.evofast.*: greedy equality with the torch reference, accuracy of q
against an exactly summed softmax, the sampling paths, non-finite rows,
argument errors, every instruction-set variant (EVOFAST_CPU_ISA), and the
soft-embedding forward / backward."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

_C = pytest.importorskip("evofast._C", reason="evofast._C is not built")

from evofast.ops.reference import (  # noqa: E402
    evo_step_reference,
    soft_embed_bwd_reference,
    soft_embed_fwd_reference,
    soft_embed_spec,
)

evo_op = torch.ops.evofast.evo_step_fused
fwd_op = torch.ops.evofast.soft_embed_fwd_fused
bwd_op = torch.ops.evofast.soft_embed_bwd_fused

LLADA_V, LLADA_M = 126464, 126336


def _step_args(B, R, L, V, M, gen, row0):
    x = torch.randint(0, V, (B, L), generator=gen)
    x[torch.rand(B, L, generator=gen) < 0.6] = M
    conf = torch.rand(B, L, generator=gen, dtype=torch.float64) * 0.5
    conf[x == M] = 0
    nt = torch.randint(0, R + 2, (B,), generator=gen)
    bs = torch.randint(0, L, (B,), generator=gen)
    be = torch.clamp(bs + torch.randint(0, L, (B,), generator=gen), max=L)
    pl = torch.randint(0, row0 + R + 1, (B,), generator=gen)
    return x, conf, nt, bs, be, pl


def _compare_greedy(lg, x, conf, nt, bs, be, pl, row0, M, k, threshold, exclude_mask, alpha=0.7):
    x1, c1, x2, c2 = x.clone(), conf.clone(), x.clone(), conf.clone()
    ref = evo_step_reference(lg, x1, c1, nt, bs, be, pl, row0, M, k, alpha, 0.0, False, threshold,
                             exclude_mask, None, None)
    got = evo_op(lg, x2, c2, nt, bs, be, pl, row0, M, k, alpha, 0.0, False,
                 0.0 if threshold is None else threshold, threshold is not None, exclude_mask, 0)
    assert torch.equal(got[3], ref[3]), "status"
    assert torch.equal(x2, x1), "x"
    assert torch.equal(got[2], ref[2]), "transfer"
    # torch's own float64 softmax is off by up to ~1e-13 at V = 126464 (its summation)
    torch.testing.assert_close(c2, c1, rtol=1e-12, atol=0)
    # ids: torch.topk orders ties arbitrarily, so compare the logits the ids point at
    assert torch.equal(got[0][..., -1], ref[0][..., -1]), "ids[..., k] (x)"
    assert torch.equal(lg.gather(-1, got[0][..., :-1]), lg.gather(-1, ref[0][..., :-1])), "top-k ids"
    assert got[1].dtype == lg.dtype
    tol = dict(rtol=1e-6, atol=1e-7) if lg.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(got[1].float(), ref[1].float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 3, 16])
@pytest.mark.parametrize("threshold", [None, 0.3])
@pytest.mark.parametrize("exclude_mask", [True, False])
@pytest.mark.parametrize("ties", [False, True])
def test_evo_step_greedy_matches_reference(dtype, k, threshold, exclude_mask, ties):
    gen = torch.Generator().manual_seed(k * 100 + (threshold is None) * 10 + exclude_mask * 2 + ties)
    for B, R, V in [(1, 1, 50), (3, 7, 1000), (2, 40, 1000)]:
        M = int(torch.randint(0, V, (1,), generator=gen))
        row0 = int(torch.randint(0, 5, (1,), generator=gen))
        L = row0 + R + 2
        lg = torch.randn(B, R, V, generator=gen) * 3
        if ties:
            lg = (lg * 2).round() / 2
        if R > 2:
            lg[0, 1, M] = lg[0, 1].max() + 1  # M is the argmax of a row
        lg = lg.to(dtype)
        _compare_greedy(lg, *_step_args(B, R, L, V, M, gen, row0), row0, M, k, threshold, exclude_mask)


def test_evo_step_llada_vocab_noncontiguous_window():
    gen = torch.Generator().manual_seed(3)
    B, R, L, row0 = 2, 5, 12, 4
    full = torch.randn(B, L, LLADA_V + 8, generator=gen) * 3
    lg = full[:, row0:row0 + R, 3:3 + LLADA_V]  # strided in B and R, contiguous last dim
    assert lg.stride(-1) == 1 and not lg.is_contiguous()
    for exclude_mask in (True, False):
        _compare_greedy(lg, *_step_args(B, R, L, LLADA_V, LLADA_M, gen, row0), row0, LLADA_M, 3, None,
                        exclude_mask)


def _exact_q(row):
    l = row.double()
    mx = l.max()
    return 1.0 / math.fsum(torch.exp(l - mx).tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ties", [False, True])
def test_q_is_accurate_at_llada_vocab(dtype, ties):
    gen = torch.Generator().manual_seed(11)
    R = 3
    lg = torch.randn(1, R, LLADA_V, generator=gen) * 3
    if ties:
        lg = (lg * 2).round() / 2
    lg = lg.to(dtype)
    x = torch.full((1, R), 5)
    conf = torch.zeros(1, R, dtype=torch.float64)
    z = torch.zeros(1, dtype=torch.long)
    evo_op(lg, x, conf, torch.tensor([R]), z, torch.tensor([R]), z, 0, 5, 3, 0.7, 0.0, False, 0.0, False,
           False, 0)
    for r in range(R):
        q = _exact_q(lg[0, r])
        assert abs(conf[0, r].item() - q) <= 2e-15 * q


def _run(lg, M, T, exclude_mask, seed, random_remask=False, k=3):
    B, R, _ = lg.shape
    x = torch.full((B, R), M)
    conf = torch.zeros(B, R, dtype=torch.float64)
    z = torch.zeros(B, dtype=torch.long)
    out = evo_op(lg, x, conf, torch.full((B,), R), z, torch.full((B,), R), z, 0, M, k, 0.7, T, random_remask,
                 0.0, False, exclude_mask, seed)
    return x, conf, out


@pytest.mark.parametrize("T,exclude_mask", [(1.0, True), (0.5, False), (2.0, True)])
def test_gumbel_sampling_distribution(T, exclude_mask):
    V, R, M = 6, 40000, 2
    logit = torch.tensor([1.0, 0.5, 2.0, -1.0, 0.0, 1.5])
    lg = logit.expand(1, R, V).contiguous()
    x, conf, (ids, w, transfer, status) = _run(lg, M, T, exclude_mask, seed=1234)
    assert int(status) == -1 and bool(transfer.all())
    lt = logit / T
    if exclude_mask:
        lt[M] = -math.inf
    p = torch.softmax(lt.double(), -1)
    freq = torch.bincount(x[0], minlength=V).double() / R
    assert (freq - p).abs().max() < 0.015
    if exclude_mask:
        assert not bool((x == M).any())
    # q is the softmax (over all columns at T > 0) at the sampled token
    torch.testing.assert_close(conf[0], torch.softmax(logit.double(), -1)[x[0]], rtol=1e-14, atol=0)
    # top-k includes M at T > 0 (only the argmax excludes it)
    assert ids[0, 0, :3].tolist() == [2, 5, 0]


def test_sampling_is_deterministic_per_seed():
    lg = torch.randn(2, 50, 1000, generator=torch.Generator().manual_seed(0))
    a = _run(lg, 7, 1.0, True, 99)[0]
    b = _run(lg, 7, 1.0, True, 99)[0]
    c = _run(lg, 7, 1.0, True, 100)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_remask():
    gen = torch.Generator().manual_seed(1)
    lg = torch.randn(1, 5000, 30, generator=gen)
    x, conf, _ = _run(lg, 3, 0.0, True, 5, random_remask=True)
    assert float(conf.min()) > 0 and float(conf.max()) < 1
    assert abs(float(conf.mean()) - 0.5) < 0.02 and abs(float(conf.var()) - 1 / 12) < 0.005
    lm = lg.clone()
    lm[..., 3] = -math.inf
    assert torch.equal(x, lm.argmax(-1))  # x0 is still the greedy argmax
    x2, conf2, _ = _run(lg, 3, 0.0, True, 5, random_remask=True)
    assert torch.equal(conf, conf2)


@pytest.mark.parametrize("what,bad_row", [("nan", 6), ("inf", 3), ("all_neg_inf", 4), ("nan_at_excluded_M", -1),
                                          ("some_neg_inf", -1)])
def test_non_finite_rows(what, bad_row):
    lg = torch.randn(2, 4, 40, generator=torch.Generator().manual_seed(2))
    M = 5
    if what == "nan":
        lg[1, 2, 7] = float("nan")
        lg[1, 3, 0] = float("nan")
    elif what == "inf":
        lg[0, 3, 9] = float("inf")
    elif what == "all_neg_inf":
        lg[1, 0] = -float("inf")
    elif what == "nan_at_excluded_M":
        lg[0, 1, M] = float("nan")  # column M is -inf for everything at temperature 0
    else:
        lg[0, 1, :30] = -float("inf")
    x0 = torch.full((2, 6), M)
    c0 = torch.zeros(2, 6, dtype=torch.float64)
    x, c = x0.clone(), c0.clone()
    z = torch.zeros(2, dtype=torch.long)
    nt, be = torch.full((2,), 4), torch.full((2,), 6)
    *_, status = evo_op(lg, x, c, nt, z, be, z, 1, M, 3, 0.7, 0.0, False, 0.0, False, True, 0)
    assert int(status) == bad_row
    if bad_row >= 0:
        assert torch.equal(x, x0) and torch.equal(c, c0)
    x1, c1 = x0.clone(), c0.clone()
    ref = evo_step_reference(lg, x1, c1, nt, z, be, z, 1, M, 3, 0.7, 0.0, False, None, True, None, None)
    assert int(ref[3]) == bad_row and torch.equal(x, x1)


def test_evo_step_argument_errors():
    lg = torch.randn(1, 3, 40)

    def call(**kw):
        a = dict(x=torch.full((1, 3), 5), conf=torch.zeros(1, 3, dtype=torch.float64),
                 nt=torch.ones(1, dtype=torch.long), bs=torch.zeros(1, dtype=torch.long),
                 be=torch.ones(1, dtype=torch.long), pl=torch.zeros(1, dtype=torch.long), row0=0, M=5, k=3)
        a.update(kw)
        return evo_op(lg, a["x"], a["conf"], a["nt"], a["bs"], a["be"], a["pl"], a["row0"], a["M"], a["k"], 0.7,
                      0.0, False, 0.0, False, True, 0)

    for kw, word in [(dict(k=17), "k_soft"), (dict(k=0), "k_soft"), (dict(row0=1), "row0"), (dict(M=40), "mask_id"),
                     (dict(conf=torch.zeros(1, 3)), "conf"), (dict(be=torch.ones(2, dtype=torch.long)), "block_end"),
                     (dict(x=torch.full((1, 3), 5, dtype=torch.int32)), "x")]:
        with pytest.raises(RuntimeError, match=word):
            call(**kw)


_ISA_SCRIPT = textwrap.dedent("""
    import json, torch, evofast._C
    op = torch.ops.evofast.evo_step_fused
    g = torch.Generator().manual_seed(0)
    for T in (0.0, 1.0):
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            lg = (torch.randn(2, 9, 5000, generator=g) * 3).to(dt)
            x = torch.full((2, 12), 17); conf = torch.zeros(2, 12, dtype=torch.float64)
            nt = torch.tensor([3, 9]); bs = torch.tensor([2, 2]); be = torch.tensor([12, 8]); pl = torch.tensor([2, 3])
            ids, w, tr, st = op(lg, x, conf, nt, bs, be, pl, 1, 17, 3, 0.7, T, False, 0.0, False, True, 7)
            print(json.dumps(dict(ids=ids.tolist(), tr=tr.tolist(), x=x.tolist(), w=w.double().tolist(),
                                  conf=conf.flatten().tolist())))
""")


def test_every_isa_variant_agrees():
    """EVOFAST_CPU_ISA caps the instruction set: every variant gives the same step
    (q may differ in the last bits between variants, the tokens may not)."""
    outs = {}
    env = dict(os.environ)
    for isa in ("default", "avx2", "avx512"):
        env["EVOFAST_CPU_ISA"] = isa
        res = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr
        outs[isa] = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(outs["default"]) == 6
    for isa in ("avx2", "avx512"):
        for a, b in zip(outs["default"], outs[isa]):
            for key in ("ids", "tr", "x"):
                assert a[key] == b[key], f"{isa}: {key} differs"
            torch.testing.assert_close(torch.tensor(b["conf"]), torch.tensor(a["conf"]), rtol=1e-14, atol=0)
            torch.testing.assert_close(torch.tensor(b["w"]), torch.tensor(a["w"]), rtol=1e-2, atol=0)


# ---------------------------------------------------------------------------
# soft embedding

_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("wdt", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("wtdt", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 5, 4), (3, 17), (2, 3, 2, 4)])
def test_soft_embed_matches_reference(wdt, wtdt, shape):
    gen = torch.Generator().manual_seed(len(shape))
    V, d = 300, 70
    weight = torch.randn(V, d, generator=gen).to(wdt)
    ids = torch.randint(0, V, shape, generator=gen)
    ids.view(-1)[::3] = 4  # one id used many times
    w = torch.randn(shape, generator=gen).to(wtdt)
    w[0] = -w[0].abs()  # rows with no positive weight (S = 0)
    w.view(-1)[1::5] = 0.0
    grad = torch.randn(shape[:-1] + (d,), generator=gen).to(wdt)
    out = fwd_op(weight, ids, w)
    ref = soft_embed_fwd_reference(weight, ids, w)
    assert out.dtype == wdt and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)   # torch's own products and sum
    tol = _TOL[wdt]
    for need_weight, need_w in [(True, True), (True, False), (False, True)]:
        got = bwd_op(grad, weight, ids, w, need_weight, need_w)
        exp = soft_embed_bwd_reference(grad, weight, ids, w, need_weight, need_w)
        for a, b in zip(got, exp):
            assert a.dtype == b.dtype and a.shape == b.shape
            t = max(tol, _TOL[a.dtype])
            # fp32 dot products summed in another order, amplified by 1 / D (D = 1e-12 on rows with S = 0)
            scale = max(1.0, float(b.double().abs().max())) if b.numel() else 1.0
            torch.testing.assert_close(a.double(), b.double(), rtol=t, atol=10 * t * scale)


def test_soft_embed_float64_matches_autograd_of_spec():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(13, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    ids = torch.randint(0, 13, (2, 3, 4), generator=gen)
    ids[0, 0, :2] = 7
    w = torch.rand(2, 3, 4, dtype=torch.float64, generator=gen) + 0.1
    w[1, 1, 0] = -0.3
    w[1, 2, 1] = 0.0
    w.requires_grad_()
    spec = soft_embed_spec(weight, ids, w)
    out = fwd_op(weight.detach(), ids, w.detach())
    torch.testing.assert_close(out, spec.detach(), rtol=0, atol=0)
    go = torch.randn(spec.shape, dtype=torch.float64, generator=gen)
    gw_ref, gwt_ref = torch.autograd.grad(spec, (weight, w), go)
    gw, gwt = bwd_op(go, weight.detach(), ids, w.detach(), True, True)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(gwt, gwt_ref, rtol=1e-13, atol=1e-13)


def test_soft_embed_bad_ids():
    weight = torch.randn(13, 5)
    for bad in (13, -1):
        ids = torch.tensor([[0, bad]])
        with pytest.raises(RuntimeError, match=f"ids must lie in \\[0, 13\\), got {bad}"):
            fwd_op(weight, ids, torch.ones(1, 2))
        with pytest.raises(RuntimeError, match="ids"):
            bwd_op(torch.randn(1, 5), weight, ids, torch.ones(1, 2), True, True)

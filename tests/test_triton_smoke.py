"""The Triton kernels against the torch reference (TRITON_INTERPRET=1 on CPU tensors
without a GPU). Direct calls of evofast.ops.triton_* with small vocabulary chunks, so
that the split-V merge runs at small V; the backend-vs-reference tests through the
public API live in test_evo_step.py / test_soft_embed.py.

Ties: csrc/README.md orders them by the smaller index / position; torch.topk does
not promise an order, so the reference runs here with a stable top-k.
"""
import contextlib
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from evofast.ops import _backend  # noqa: E402
from evofast.ops.reference import (  # noqa: E402
    evo_step_reference, soft_embed_bwd_reference, soft_embed_fwd_reference)

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not _backend.usable("triton", DEV), reason="triton not usable here")


def _stable_topk(x, k, dim=-1, largest=True, sorted=True):
    v, i = torch.sort(x, dim=dim, descending=True, stable=True)
    return torch.return_types.topk((v.narrow(dim, 0, k), i.narrow(dim, 0, k)))


@contextlib.contextmanager
def stable_topk():
    orig = torch.topk
    torch.topk = _stable_topk
    try:
        yield
    finally:
        torch.topk = orig


def make_state(B, R, V, *, row0=3, dtype=torch.float32, ties=False, seed=0, n_transfer=2,
               prompt=5, block=8):
    g = torch.Generator().manual_seed(seed)
    L = row0 + R + 2
    M = V - 3
    if ties:
        logits = torch.randint(-2, 3, (B, R, V), generator=g).float()
    else:
        logits = torch.randn(B, R, V, generator=g) * 3
    logits = logits.to(dtype)
    x = torch.randint(0, V, (B, L), generator=g)
    x[x == M] = 0
    P = torch.randint(1, prompt + 1, (B,), generator=g)
    bs = torch.clamp(P + torch.randint(0, 4, (B,), generator=g), max=L)
    be = torch.clamp(bs + block, max=L)
    conf = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        x[b, bs[b]:] = M
        done = torch.rand(L, generator=g) < 0.3
        done[: bs[b]] = False
        x[b, done] = torch.randint(0, V - 4, (int(done.sum()),), generator=g)
        conf[b, P[b]:] = torch.rand(L - int(P[b]), dtype=torch.float64, generator=g)
        x[b, int(torch.randint(0, int(P[b]), (1,), generator=g))] = M  # a mask inside the prompt
    conf[x == M] = 0
    nt = torch.randint(0, n_transfer + 1, (B,), generator=g)
    return dict(logits=logits, x=x, conf=conf, num_transfer=nt, block_start=bs, block_end=be,
                prompt_len=P, row0=row0, mask_id=M)


def run_both(st, *, k=3, alpha=0.7, threshold=None, exclude_mask=True, block_v=None, temperature=0.0,
             random_remask=False, seed=1234):
    from evofast.ops.triton_evo_step import evo_step_triton
    pos = (st["num_transfer"], st["block_start"], st["block_end"], st["prompt_len"], st["row0"], st["mask_id"],
           k, alpha, temperature, random_remask)
    x1, c1 = st["x"].clone(), st["conf"].clone()
    with stable_topk():
        ref = evo_step_reference(st["logits"], x1, c1, *pos, threshold, exclude_mask, None, None)
    x2, c2 = st["x"].clone().to(DEV), st["conf"].clone().to(DEV)
    dpos = tuple(t.to(DEV) if isinstance(t, torch.Tensor) else t for t in pos)
    out = evo_step_triton(st["logits"].to(DEV), x2, c2, *dpos,
                          0.0 if threshold is None else threshold, threshold is not None,
                          exclude_mask, seed, block_v=block_v)
    return (ref, x1, c1), (tuple(o.cpu() for o in out), x2.cpu(), c2.cpu())


def assert_same(ref, got):
    (r_ids, r_w, r_tr, r_st), rx, rc = ref
    (g_ids, g_w, g_tr, g_st), gx, gc = got
    assert int(g_st) == int(r_st)
    if int(r_st) >= 0:
        assert torch.equal(gx, rx) and torch.equal(gc, rc), "x / conf written on a non-finite step"
        return
    assert torch.equal(g_tr, r_tr)
    assert torch.equal(gx, rx)
    torch.testing.assert_close(gc, rc, rtol=1e-14, atol=0)
    assert torch.equal(g_ids, r_ids)
    assert g_w.dtype == r_w.dtype
    # float64 weights agree to an ulp or two; after the cast they are (all but surely) equal
    assert torch.equal(g_w, r_w), (g_w.double() - r_w.double()).abs().max()


@pytest.mark.parametrize("B,R,V,k,block_v", [
    (1, 1, 37, 1, None), (3, 5, 37, 16, 16), (3, 33, 37, 3, None),
    (1, 5, 1000, 3, 128), (3, 33, 1000, 16, 256), (3, 5, 1000, 1, None),
    (1, 33, 50257, 3, None), (3, 5, 50257, 16, 4096),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_matches_reference(B, R, V, k, block_v, dtype):
    st = make_state(B, R, V, dtype=dtype, seed=B * 100 + R + k)
    assert_same(*run_both(st, k=k, block_v=block_v))


@pytest.mark.parametrize("block_v", [None, 16])
@pytest.mark.parametrize("k", [1, 3, 16])
def test_ties(k, block_v):
    st = make_state(3, 33, 37, ties=True, seed=k, n_transfer=5)
    assert_same(*run_both(st, k=k, block_v=block_v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threshold", [None, 0.05, 0.9])
@pytest.mark.parametrize("exclude_mask", [True, False])
def test_variants(dtype, threshold, exclude_mask):
    st = make_state(3, 33, 1000, dtype=dtype, seed=7, n_transfer=4)
    if not exclude_mask:  # make the mask token win a few rows
        st["logits"][:, ::4, st["mask_id"]] = 30.0
    assert_same(*run_both(st, threshold=threshold, exclude_mask=exclude_mask, block_v=256))


def test_window_at_zero_and_alpha_zero():
    st = make_state(2, 20, 300, row0=0, seed=3)
    assert_same(*run_both(st, alpha=0.0, block_v=64))


def test_noncontiguous_logits():
    st = make_state(3, 9, 500, seed=5)
    big = torch.randn(3, 18, 700)
    big[:, ::2, :500] = st["logits"]
    st["logits"] = big[:, ::2, :500]
    assert not st["logits"].is_contiguous()
    assert_same(*run_both(st, block_v=128))


@pytest.mark.parametrize("bad", ["nan", "inf", "neginf_row", "nan_in_mask_column"])
def test_non_finite(bad):
    st = make_state(3, 5, 1000, seed=11)
    lg = st["logits"]
    if bad == "nan":
        lg[2, 1, 17] = float("nan")
        lg[1, 3, 900] = float("nan")
    elif bad == "inf":
        lg[1, 4, 5] = float("inf")
    elif bad == "neginf_row":
        lg[0, 2, :] = float("-inf")
    else:  # column M is -inf for everything at temperature 0: the row stays finite
        lg[1, 2, st["mask_id"]] = float("nan")
    ref, got = run_both(st, block_v=256)
    assert_same(ref, got)
    expect = {"nan": 1 * 5 + 3, "inf": 1 * 5 + 4, "neginf_row": 2, "nan_in_mask_column": -1}[bad]
    assert int(got[0][3]) == expect


def test_nan_in_mask_column_is_non_finite_when_sampling():
    from evofast.ops.triton_evo_step import evo_step_triton
    st = make_state(2, 4, 100, seed=2)
    st["logits"][1, 0, st["mask_id"]] = float("nan")
    x, c = st["x"].clone(), st["conf"].clone()
    out = evo_step_triton(st["logits"], x, c, st["num_transfer"], st["block_start"], st["block_end"],
                          st["prompt_len"], st["row0"], st["mask_id"], 3, 0.7, 1.0, False, 0.0, False,
                          True, 99)
    assert int(out[3]) == 4 and torch.equal(x, st["x"]) and torch.equal(c, st["conf"])


def _sample(st, temperature, random_remask, seed, exclude_mask=True, block_v=None):
    from evofast.ops.triton_evo_step import evo_step_triton
    x, c = st["x"].clone(), st["conf"].clone()
    out = evo_step_triton(st["logits"], x, c, st["num_transfer"], st["block_start"], st["block_end"],
                          st["prompt_len"], st["row0"], st["mask_id"], 3, 0.7, temperature, random_remask,
                          0.0, False, exclude_mask, seed, block_v=block_v)
    return out, x, c


def test_sampling_deterministic_and_valid():
    st = make_state(3, 33, 1000, seed=4, n_transfer=6)
    a = _sample(st, 0.8, True, 5)
    b = _sample(st, 0.8, True, 5, block_v=128)  # the draw does not depend on the chunking
    c = _sample(st, 0.8, True, 6)
    for u, v in zip(a[0] + a[1:], b[0] + b[1:]):
        assert torch.equal(u, v)
    assert not torch.equal(a[2], c[2])
    (ids, w, tr, status), x, conf = a
    assert int(status) == -1 and ids.shape == (3, 33, 4) and w.shape == (3, 33, 4) and tr.shape == (3, 33)
    M = st["mask_id"]
    win = slice(st["row0"], st["row0"] + 33)
    got = x[:, win][tr]
    assert ((got >= 0) & (got < 1000) & (got != M)).all()
    q = conf[:, win][tr]
    assert ((q > 0) & (q < 1)).all()
    # top-k and w do not depend on the draw (p has M at temperature > 0)
    ref, _ = run_both(st, exclude_mask=False, temperature=0.0)
    assert torch.equal(ids[..., :3], ref[0][0][..., :3])


def test_gumbel_distribution():
    """x0 frequencies follow softmax(l / T) (rows are independent draws)."""
    V, T, R, B = 8, 0.7, 256, 4
    l = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 0.3, 1.5, -2.0])
    st = make_state(B, R, V, row0=0, seed=0)
    st["logits"] = l.expand(B, R, V).clone()
    st["x"][:] = st["mask_id"]
    st["conf"][:] = 0
    st["num_transfer"][:] = R
    st["block_start"][:] = 0
    st["block_end"][:] = R + 2
    st["prompt_len"][:] = 0
    _, x, _ = _sample(st, T, False, 2024, exclude_mask=False)
    counts = torch.bincount(x[:, :R].flatten(), minlength=V).double()
    p = torch.softmax(l.double() / T, 0)
    n = B * R
    z = (counts - n * p) / torch.sqrt(n * p * (1 - p))
    assert z.abs().max() < 4.5, (counts, n * p)


def test_random_remask_uniform():
    st = make_state(4, 256, 16, row0=0, seed=1)
    st["x"][:] = st["mask_id"]
    st["conf"][:] = 0
    st["num_transfer"][:] = 256
    st["block_start"][:] = 0
    st["block_end"][:] = 300
    st["prompt_len"][:] = 0
    _, _, c = _sample(st, 0.0, True, 77)
    q = c[:, :256].flatten()
    assert ((q > 0) & (q < 1)).all()
    assert abs(float(q.mean()) - 0.5) < 0.03 and abs(float(q.var()) - 1 / 12) < 0.01


def test_large_vocab():
    st = make_state(1, 3, 126464, seed=9)
    assert_same(*run_both(st, k=16))


# ---------------------------------------------------------------- soft_embed

@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("J,d", [(4, 64), (17, 100), (40, 33)])
def test_soft_embed(wdtype, J, d):
    from evofast.ops.triton_soft_embed import soft_embed_bwd_triton, soft_embed_fwd_triton
    g = torch.Generator().manual_seed(J * d)
    V = 50
    weight = torch.randn(V, d, generator=g).to(wdtype)
    ids = torch.randint(0, V, (3, 5, J), generator=g)
    ids[0, 0, :] = 7  # repeated ids: atomics on one row
    w = torch.randn(3, 5, J, generator=g, dtype=torch.float64).abs().to(torch.float32)
    w[1, 2] = -1.0      # all negative: S = 0, D = 1e-12
    w[2, 1, ::2] = -0.5
    w[0, 3] = 0.0
    grad = torch.randn(3, 5, d, generator=g).to(wdtype)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}[wdtype]

    out = soft_embed_fwd_triton(weight.to(DEV), ids.to(DEV), w.to(DEV)).cpu()
    ref = soft_embed_fwd_reference(weight.to(DEV), ids.to(DEV), w.to(DEV)).cpu()
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if J <= 4 or DEV.type != "cpu":  # in order, as torch sums (tests/test_soft_embed_exact.py)
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)
    for nw, nt in [(True, True), (True, False), (False, True)]:
        gw, gt = (t.cpu() for t in soft_embed_bwd_triton(grad.to(DEV), weight.to(DEV), ids.to(DEV),
                                                         w.to(DEV), nw, nt))
        rgw, rgt = soft_embed_bwd_reference(grad, weight, ids, w, nw, nt)
        assert gw.shape == rgw.shape and gw.dtype == rgw.dtype
        assert gt.shape == rgt.shape and gt.dtype == rgt.dtype
        if nw:
            torch.testing.assert_close(gw.double(), rgw.double(), rtol=tol, atol=tol)
        if nt:  # g / D with D = 1e-12 is huge on the all-negative row: relative
            torch.testing.assert_close(gt.double(), rgt.double(), rtol=max(tol, 1e-5), atol=tol)


# ---------------------------------------------------------------- per-step options

def _opts(st, block_v, **kw):
    from evofast.ops.triton_evo_step import evo_step_triton
    x, c = st["x"].clone(), st["conf"].clone()
    out = evo_step_triton(st["logits"], x, c, st["num_transfer"], st["block_start"], st["block_end"],
                          st["prompt_len"], st["row0"], st["mask_id"], kw.pop("k", 3), 0.7,
                          kw.pop("temperature", 0.0), False, 0.0, False, True, 5, block_v=block_v,
                          return_probs=True, **kw)
    return out, x, c


@pytest.mark.parametrize("confidence", ["margin", "entropy"])
@pytest.mark.parametrize("k", [1, 3])
def test_confidences_split_v(confidence, k):
    """margin / entropy merged over many vocabulary chunks equal the single-chunk result."""
    st = make_state(3, 9, 1000, seed=k)
    st["logits"][0, 2, 100:300] = float("-inf")  # an all -inf chunk
    a, xa, ca = _opts(st, 64, confidence=confidence, k=k)
    b, xb, cb = _opts(st, None, confidence=confidence, k=k)
    assert torch.equal(a[2], b[2]) and torch.equal(xa, xb)
    torch.testing.assert_close(a[5], b[5], rtol=1e-13, atol=1e-14)


def test_top_k_filter_ties_across_chunks():
    """The filter's k-th value tied across chunks: every tied column is kept (chunk left-overs
    merged), x0 never outside the kept set, q is p of the filtered distribution at x0."""
    V, R, T = 1024, 512, 0.5
    row = torch.full((V,), -6.0)
    row[[700, 5]] = torch.tensor([2.0, 1.5])
    row[[100, 300, 301, 900]] = 1.0          # four-way tie at the 3rd value, chunks of 64 / 256
    st = make_state(1, R, V, row0=0, seed=0)
    st["logits"] = row.expand(1, R, V).clone()
    st["x"][:] = st["mask_id"]
    st["num_transfer"][:] = R
    st["block_start"][:] = 0
    st["block_end"][:] = R + 2
    st["prompt_len"][:] = 0
    keep = torch.zeros(V, dtype=torch.bool)
    keep[[700, 5, 100, 300, 301, 900]] = True
    lt = (row.double() / T).masked_fill(~keep, -math.inf)
    pf = torch.softmax(lt, -1)
    for block_v in (64, 256, None):
        (ids, w, tr, status, tp, q), x, _ = _opts(st, block_v, temperature=T, top_k=3)
        draws = x[0, :R]
        assert int(status) == -1 and bool(keep[draws].all())
        counts = torch.bincount(draws, minlength=V).double()[keep]
        p = pf[keep]
        assert ((counts - R * p).abs() < 5 * torch.sqrt(R * p * (1 - p)).clamp_min(1)).all(), (counts, R * p)
        torch.testing.assert_close(q[0], pf[draws], rtol=1e-13, atol=0)
        (_, _, _, _, _, qm), _, _ = _opts(st, block_v, temperature=T, top_k=3, confidence="entropy")
        torch.testing.assert_close(qm[0], (pf * pf.log()).nan_to_num(0.0).sum().expand(R), rtol=1e-13, atol=1e-15)

"""CUDA kernels (evofast._C_cuda) against the C++ CPU kernels and torch formulas.

``torch.ops.evofast.evo_step_fused`` on CUDA tensors is compared with the same
op on CPU tensors (csrc/cpu, the reference backend of the compiled ops) for
random inputs; soft_embed forward / backward with the torch formula of
csrc/README.md in float64. Both launch shapes of the evo_step row pass are
covered by forcing them with EVOFAST_CUDA_EVO_SPLITS (read on every call).

Every test is marked ``cuda`` and skipped without a GPU or without the built
extension; nothing here touches the GPU at collection time.
"""
from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.cuda

SPLITS_ENV = "EVOFAST_CUDA_EVO_SPLITS"
LLADA_MASK = 126336


@pytest.fixture(scope="module", autouse=True)
def cuda_ops():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    try:
        import evofast._C  # noqa: F401  (schemas + CPU kernels)
        import evofast._C_cuda  # noqa: F401  (CUDA kernels)
    except ImportError as e:  # pragma: no cover - depends on the build
        pytest.skip(f"evofast._C_cuda is not built: {e}")
    return torch.ops.evofast


def _mismatch(name, got, exp, limit=8):
    bad = (got != exp)
    if got.is_floating_point():
        bad &= ~(torch.isnan(got) & torch.isnan(exp))
    idx = bad.nonzero()[:limit].tolist()
    return f"{name}: {int(bad.sum())} mismatches, first at {idx}"


# ------------------------------------------------------------------ evo_step
def make_step_inputs(B, R, V, dtype, *, L=None, row0=None, mask_id=None, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    L = L if L is not None else R + 9
    row0 = row0 if row0 is not None else L - R - 3
    M = mask_id if mask_id is not None else (LLADA_MASK if V > LLADA_MASK else V - 3)
    if noncontig:  # sliced on the device (call_step): rows start at odd offsets
        logits = (torch.randn(B, R, V + 7, generator=g) * 3).to(dtype)
    else:
        logits = (torch.randn(B, R, V, generator=g) * 3).to(dtype)
    x = torch.randint(0, V, (B, L), generator=g)
    masked = torch.rand(B, L, generator=g) < 0.6
    x[masked] = M
    conf = torch.rand(B, L, generator=g, dtype=torch.float64) * 0.3
    conf[masked] = 0
    bs = torch.randint(0, L, (B,), generator=g)
    be = torch.clamp(bs + torch.randint(1, L, (B,), generator=g), max=L)
    return dict(
        logits=logits, vslice=(3, V) if noncontig else None, x=x, conf=conf,
        num_transfer=torch.randint(0, 6, (B,), generator=g),
        block_start=bs, block_end=be,
        prompt_len=torch.randint(0, L, (B,), generator=g),
        row0=row0, mask_id=M)


def call_step(ops, inp, device, *, k_soft=3, alpha=0.7, temperature=0.0, random_remask=False,
              threshold=0.0, use_threshold=False, exclude_mask=True, seed=1234):
    t = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    if t["vslice"] is not None:  # slice after the copy: .to() would make it contiguous
        a, V = t["vslice"]
        t["logits"] = t["logits"][:, :, a:a + V]
    x, conf = t["x"].clone(), t["conf"].clone()
    ids, w, transfer, status = ops.evo_step_fused(
        t["logits"], x, conf, t["num_transfer"], t["block_start"], t["block_end"], t["prompt_len"],
        t["row0"], t["mask_id"], k_soft, alpha, temperature, random_remask, threshold,
        use_threshold, exclude_mask, seed)
    return {k: v.cpu() for k, v in
            dict(ids=ids, w=w, transfer=transfer, status=status, x=x, conf=conf).items()}


W_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-7),
         torch.bfloat16: dict(rtol=2 ** -7, atol=1e-6),
         torch.float16: dict(rtol=2 ** -10, atol=1e-7)}


def assert_same_step(got, exp, dtype, inp):
    assert int(got["status"]) == int(exp["status"]), (got["status"], exp["status"])
    if int(exp["status"]) != -1:
        assert torch.equal(got["x"], inp["x"]) and torch.equal(got["conf"], inp["conf"]), \
            "x / conf must stay untouched when a row is not finite"
        return
    for name in ("ids", "transfer", "x"):
        assert torch.equal(got[name], exp[name]), _mismatch(name, got[name], exp[name])
    torch.testing.assert_close(got["conf"], exp["conf"], rtol=1e-12, atol=0)
    assert got["w"].dtype == dtype
    torch.testing.assert_close(got["w"].float(), exp["w"].float(), equal_nan=True, **W_TOL[dtype])


SHAPES = {"row": "1", "splitv": "7"}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("V", [1000, 50257, 126464])
def test_evo_step_matches_cpu(cuda_ops, monkeypatch, V, B, dtype, shape):
    monkeypatch.setenv(SPLITS_ENV, SHAPES[shape])
    inp = make_step_inputs(B, 37, V, dtype, seed=V + B)
    got = call_step(cuda_ops, inp, "cuda")
    exp = call_step(cuda_ops, inp, "cpu")
    assert_same_step(got, exp, dtype, inp)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("V", [1000, 126464])
@pytest.mark.parametrize("case", ["threshold", "threshold_high", "no_exclude", "k1", "k8", "k16",
                                  "noncontig", "mask_first"])
def test_evo_step_variants_match_cpu(cuda_ops, monkeypatch, case, V, shape):
    monkeypatch.setenv(SPLITS_ENV, SHAPES[shape])
    dtype = torch.bfloat16
    kw = {}
    inp_kw = {}
    if case == "threshold":
        kw = dict(use_threshold=True, threshold=0.02)
    elif case == "threshold_high":
        kw = dict(use_threshold=True, threshold=2.0)  # only the best eligible row per batch row
    elif case == "no_exclude":
        kw = dict(exclude_mask=False)
    elif case.startswith("k"):
        kw = dict(k_soft=int(case[1:]))
    elif case == "noncontig":
        inp_kw = dict(noncontig=True)
    elif case == "mask_first":
        inp_kw = dict(mask_id=0)
    inp = make_step_inputs(3, 29, V, dtype, seed=7, **inp_kw)
    if case == "no_exclude":  # make the mask column win in some rows
        inp["logits"][:, ::3, inp["mask_id"]] = 40
    got = call_step(cuda_ops, inp, "cuda", **kw)
    exp = call_step(cuda_ops, inp, "cpu", **kw)
    assert_same_step(got, exp, dtype, inp)


TABLE_ENV = "EVOFAST_CUDA_VALUE_TABLE"
# launch shapes for the value table: one block per row, and split-V with chunks
# long enough for the table (126464 / 3) and too short for it (126464 / 7)
TABLE_SHAPES = {"row": "1", "splitv-table": "3", "splitv-short": "7"}


@pytest.mark.parametrize("layout", ["contiguous", "noncontig"])
@pytest.mark.parametrize("table", ["on", "off"])
@pytest.mark.parametrize("shape", sorted(TABLE_SHAPES))
@pytest.mark.parametrize("V", [1000, 126464])
def test_evo_step_bf16_value_table(cuda_ops, monkeypatch, V, shape, table, layout):
    """bf16 greedy rows take exp(v - 2^8) from the value table for 2^-12 <= |v| < 2^8;
    logits outside its range (|v| < 2^-12, |v| >= 2^8, zeros, -inf) take the
    per-column exp. Both agree with the CPU kernel to float64 rounding, with rows
    aligned to 16 bytes (vector loads) or not (scalar loads), and with logits
    shifted by -200 (row 2: before the large values are set, so its max is
    >= 2^8; row 1: after, so every finite value is in the table's range)."""
    monkeypatch.setenv(SPLITS_ENV, TABLE_SHAPES[shape])
    monkeypatch.setenv(TABLE_ENV, "1" if table == "on" else "0")
    inp = make_step_inputs(3, 29, V, torch.bfloat16, seed=V + 5, noncontig=layout == "noncontig")
    full = inp["logits"].float()
    lg = full[..., 3:3 + V] if layout == "noncontig" else full
    lg[2] -= 200.0
    pick = torch.rand(lg.shape, generator=torch.Generator().manual_seed(3))
    lg[pick < 0.01] = 0.0
    lg[(pick >= 0.01) & (pick < 0.02)] *= 1e-3                       # small: some below 2^-12
    big = (pick >= 0.02) & (pick < 0.021)
    lg[big] = 300.0 + 100 * pick[big]                                  # 2^8 and above
    lg[(pick >= 0.021) & (pick < 0.022)] = -float("inf")
    lg[0, 0] = -float("inf")                                           # one finite column in this row
    lg[0, 0, 5] = 1.0
    lg[1] -= 200.0                          # row 1: every finite value in the table's range, max < 2^8
    inp["logits"] = full.to(torch.bfloat16)
    got = call_step(cuda_ops, inp, "cuda")
    exp = call_step(cuda_ops, inp, "cpu")
    assert_same_step(got, exp, torch.bfloat16, inp)


@pytest.mark.parametrize("k_soft", [1, 8, 16])
@pytest.mark.parametrize("shape", ["row", "splitv-table"])
def test_evo_step_bf16_value_table_k(cuda_ops, monkeypatch, shape, k_soft):
    """The value table's kernels for other top-k sizes (K = 4 and K = 16 instantiations), on
    plain random rows (nearly every group in the table's range) and with the CPU's k."""
    monkeypatch.setenv(SPLITS_ENV, TABLE_SHAPES[shape])
    monkeypatch.setenv(TABLE_ENV, "1")
    inp = make_step_inputs(2, 21, 126464, torch.bfloat16, seed=k_soft)
    got = call_step(cuda_ops, inp, "cuda", k_soft=k_soft)
    exp = call_step(cuda_ops, inp, "cpu", k_soft=k_soft)
    assert_same_step(got, exp, torch.bfloat16, inp)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_evo_step_ties_match_cpu(cuda_ops, monkeypatch, shape):
    """Integer logits (ties in top-k and argmax) and identical rows (ties in q)."""
    monkeypatch.setenv(SPLITS_ENV, SHAPES[shape])
    inp = make_step_inputs(3, 40, 50257, torch.float32, seed=3)
    lg = torch.round(inp["logits"] / 2)
    lg[:, 1::2] = lg[:, 0:-1:2]
    inp["logits"] = lg
    inp["num_transfer"] = torch.tensor([3, 7, 1])
    for kw in (dict(), dict(k_soft=8), dict(use_threshold=True, threshold=0.1)):
        got = call_step(cuda_ops, inp, "cuda", **kw)
        exp = call_step(cuda_ops, inp, "cpu", **kw)
        assert_same_step(got, exp, torch.float32, inp)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("bad", ["nan", "posinf", "all_neginf"])
def test_evo_step_nonfinite(cuda_ops, monkeypatch, bad, shape):
    monkeypatch.setenv(SPLITS_ENV, SHAPES[shape])
    inp = make_step_inputs(3, 20, 50257, torch.float16, seed=11)
    lg = inp["logits"]
    if bad == "nan":
        lg[2, 5, 999] = float("nan")
        lg[1, 7, 12] = float("nan")
    elif bad == "posinf":
        lg[1, 3, 40000] = float("inf")
    else:
        lg[2, 0, :] = float("-inf")
    got = call_step(cuda_ops, inp, "cuda")
    exp = call_step(cuda_ops, inp, "cpu")
    assert int(got["status"]) == {"nan": 27, "posinf": 23, "all_neginf": 40}[bad]
    assert_same_step(got, exp, torch.float16, inp)


def test_evo_step_large_window(cuda_ops, monkeypatch):
    """More eligible rows than the sequence kernel keeps in shared memory."""
    monkeypatch.delenv(SPLITS_ENV, raising=False)
    V, R, L = 64, 3000, 3100
    inp = make_step_inputs(2, R, V, torch.float32, L=L, row0=40, seed=5)
    inp["x"][:, :] = inp["mask_id"]
    inp["block_end"][:] = L
    inp["num_transfer"] = torch.tensor([1000, 2999])
    for kw in (dict(), dict(use_threshold=True, threshold=0.05)):
        got = call_step(cuda_ops, inp, "cuda", **kw)
        exp = call_step(cuda_ops, inp, "cpu", **kw)
        assert_same_step(got, exp, torch.float32, inp)


def test_evo_step_auto_shape(cuda_ops, monkeypatch):
    monkeypatch.delenv(SPLITS_ENV, raising=False)
    for B, R in ((1, 2), (1, 32), (4, 256)):
        inp = make_step_inputs(B, R, 126464, torch.bfloat16, seed=R)
        assert_same_step(call_step(cuda_ops, inp, "cuda"), call_step(cuda_ops, inp, "cpu"),
                         torch.bfloat16, inp)


@pytest.mark.parametrize("exclude_mask", [True, False])
def test_evo_step_sampling_shape_independent(cuda_ops, monkeypatch, exclude_mask):
    """The RNG is counter-based: both launch shapes draw the same samples."""
    inp = make_step_inputs(2, 16, 50257, torch.bfloat16, seed=9)
    kw = dict(temperature=0.8, exclude_mask=exclude_mask, seed=77)
    monkeypatch.setenv(SPLITS_ENV, "1")
    a = call_step(cuda_ops, inp, "cuda", **kw)
    monkeypatch.setenv(SPLITS_ENV, "9")
    b = call_step(cuda_ops, inp, "cuda", **kw)
    c = call_step(cuda_ops, inp, "cuda", **{**kw, "seed": 78})
    for name in ("ids", "transfer", "x"):
        assert torch.equal(a[name], b[name]), name
    # q's last bits may depend on the reduction order of the launch shape
    torch.testing.assert_close(a["conf"], b["conf"], rtol=1e-13, atol=0)
    torch.testing.assert_close(a["w"].float(), b["w"].float(), **W_TOL[torch.bfloat16])
    assert not torch.equal(a["conf"], c["conf"]) or not torch.equal(a["x"], c["x"])
    if exclude_mask:
        changed = a["x"] != inp["x"]
        assert not (a["x"][changed] == inp["mask_id"]).any()


def test_evo_step_sampling_distribution(cuda_ops, monkeypatch):
    """x0 ~ softmax(l / T): every row eligible and transferred, so x holds the samples."""
    monkeypatch.delenv(SPLITS_ENV, raising=False)
    V, R, T = 7, 20000, 0.7
    row = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5, -3.0, 0.0])
    logits = row.expand(1, R, V).contiguous()
    M = V - 1  # the mask column is excluded from sampling: x0 ~ softmax over the first 6
    x = torch.full((1, R), M, dtype=torch.long, device="cuda")
    conf = torch.zeros(1, R, dtype=torch.float64, device="cuda")

    def one(v):
        return torch.tensor([v], device="cuda")

    out = cuda_ops.evo_step_fused(logits.cuda(), x, conf, one(R), one(0), one(R), one(0),
                                  0, M, 2, 0.7, T, False, 0.0, False, True, 5)
    assert int(out[3].cpu()) == -1
    assert bool(out[2].all())
    counts = torch.bincount(x.cpu()[0], minlength=V).double()[:M]
    p = torch.softmax(row[:M].double() / T, 0)
    sd = torch.sqrt(R * p * (1 - p))
    assert ((counts - R * p).abs() < 5 * sd).all(), (counts, R * p)


def test_evo_step_random_remask(cuda_ops):
    inp = make_step_inputs(2, 500, 1000, torch.float32, seed=4)
    inp["x"][:, :] = inp["mask_id"]
    inp["block_end"][:] = inp["x"].shape[1]
    inp["num_transfer"] = torch.tensor([500, 500])
    a = call_step(cuda_ops, inp, "cuda", random_remask=True, seed=3)
    b = call_step(cuda_ops, inp, "cuda", random_remask=True, seed=3)
    assert torch.equal(a["conf"], b["conf"])
    q = a["conf"][:, inp["row0"]:inp["row0"] + 500]
    assert ((q > 0) & (q < 1)).all()
    assert abs(float(q.mean()) - 0.5) < 0.05


# ------------------------------------------------------------------ evo_step options
def call_opt(ops, inp, device, *, confidence=0, stdd=None, state=None, k_soft=3, temperature=0.0,
             threshold=0.0, use_threshold=False, seed=1234):
    """evo_step_fused_opt on `device`; stdd = [tau, lam_t, lam_s, tau_min, tau_max, radius] with
    state = (history, count) CPU tensors (copied, returned updated)."""
    t = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    if t["vslice"] is not None:
        a, V = t["vslice"]
        t["logits"] = t["logits"][:, :, a:a + V]
    x, conf = t["x"].clone(), t["conf"].clone()
    hist = count = None
    params, radius = [], 0
    if stdd is not None:
        hist, count = (v.clone().to(device) for v in state)
        params, radius = list(stdd[:5]), int(stdd[5])
    ids, w, transfer, status, tp, q = ops.evo_step_fused_opt(
        t["logits"], x, conf, t["num_transfer"], t["block_start"], t["block_end"], t["prompt_len"],
        t["row0"], t["mask_id"], k_soft, 0.7, temperature, False, threshold, use_threshold, True, seed,
        confidence, 0, hist, count, params, radius)
    out = dict(ids=ids, w=w, transfer=transfer, status=status, tp=tp, q=q, x=x, conf=conf)
    if stdd is not None:
        out.update(hist=hist, count=count)
    return {k: v.cpu() for k, v in out.items()}


def assert_same_opt(got, exp, dtype, inp):
    assert_same_step(got, exp, dtype, inp)
    torch.testing.assert_close(got["q"], exp["q"], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got["tp"], exp["tp"], rtol=1e-6, atol=0)
    if "count" in exp:
        assert torch.equal(got["count"], exp["count"])
        torch.testing.assert_close(got["hist"], exp["hist"], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("V", [1000, 126464])
@pytest.mark.parametrize("confidence,k_soft,temperature", [(1, 1, 0.0), (1, 3, 0.0), (2, 3, 0.0), (2, 16, 0.0),
                                                           (1, 3, 0.8), (2, 3, 0.8)])
def test_evo_step_confidences_match_cpu(cuda_ops, monkeypatch, V, dtype, shape, confidence, k_soft, temperature):
    """topk_margin (1) and entropy (2) against the CPU kernel, greedy; sampled: q is deterministic
    given the draw only for margin / entropy, which do not depend on it."""
    monkeypatch.setenv(SPLITS_ENV, SHAPES[shape])
    monkeypatch.setenv("EVOFAST_CUDA_VALUE_TABLE", "1")  # ignored with the entropy
    inp = make_step_inputs(2, 29, V, dtype, seed=V + confidence)
    kw = dict(confidence=confidence, k_soft=k_soft, temperature=temperature)
    got, exp = call_opt(cuda_ops, inp, "cuda", **kw), call_opt(cuda_ops, inp, "cpu", **kw)
    if temperature == 0.0:
        assert_same_opt(got, exp, dtype, inp)
    else:
        torch.testing.assert_close(got["q"], exp["q"], rtol=1e-12, atol=1e-13)


STDD_CASES = {  # [tau, lam_t, lam_s, tau_min, tau_max, radius], window
    "full": ([0.05, 1.0, 0.5, 0.0, 1.0, 1], 3),
    "radius2": ([0.05, 1.0, 0.6, 0.0, 1.0, 2], 2),
    "temporal": ([0.1, 2.0, 0.0, 0.0, 1.0, 1], 4),
    "none_pass": ([0.9, 1.0, 1.0, 0.0, 2.0, 1], 3),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("case", sorted(STDD_CASES))
@pytest.mark.parametrize("V", [1000, 126464])
def test_evo_step_stdd_matches_cpu(cuda_ops, monkeypatch, V, case, shape):
    """Three steps with a prefilled history: transfers, x, conf and the history as the CPU kernel."""
    monkeypatch.setenv(SPLITS_ENV, SHAPES[shape])
    stdd, W = STDD_CASES[case]
    inp = make_step_inputs(3, 29, V, torch.bfloat16, seed=V + W)
    B, L = inp["x"].shape
    g = torch.Generator().manual_seed(W)
    hist = torch.rand(B, L, W, generator=g, dtype=torch.float64)
    count = torch.randint(0, 6, (B, L), generator=g)
    state_g, state_c = (hist, count), (hist, count)
    for step in range(3):
        base = (torch.randn(B, 1, V, generator=g) + torch.randn(B, 29, V, generator=g)) * (1 + 3 * step)
        inp["logits"] = base.to(torch.bfloat16)
        got = call_opt(cuda_ops, inp, "cuda", stdd=stdd, state=state_g)
        exp = call_opt(cuda_ops, inp, "cpu", stdd=stdd, state=state_c)
        assert_same_opt(got, exp, torch.bfloat16, inp)
        state_g, state_c = (got["hist"], got["count"]), (exp["hist"], exp["count"])
        inp["x"], inp["conf"] = exp["x"], exp["conf"]


def test_evo_step_stdd_zero_lambdas_is_threshold(cuda_ops, monkeypatch):
    monkeypatch.delenv(SPLITS_ENV, raising=False)
    inp = make_step_inputs(3, 40, 50257, torch.float32, seed=3)
    lg = torch.round(inp["logits"] / 2)
    lg[:, 1::2] = lg[:, 0:-1:2]  # ties in q across rows
    inp["logits"] = lg
    B, L = inp["x"].shape
    state = (torch.zeros(B, L, 3, dtype=torch.float64), torch.zeros(B, L, dtype=torch.int64))
    for tau in (0.05, 0.5, 2.0):
        a = call_opt(cuda_ops, inp, "cuda", stdd=[tau, 0.0, 0.0, 0.0, max(tau, 1.0), 1], state=state)
        b = call_opt(cuda_ops, inp, "cuda", threshold=tau, use_threshold=True)
        for key in ("ids", "w", "transfer", "status", "tp", "q", "x", "conf"):
            assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------ soft_embed
def embed_ref(weight, ids, w):
    c = w.clamp(min=0)
    wn = c / c.sum(-1, keepdim=True).clamp(min=1e-12)
    return (wn[..., None] * weight[ids]).sum(-2)


E_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10),
         torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def make_embed_inputs(V, d, B, R, J, wdt, wwdt, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, d, generator=g).to(wdt)
    ids = torch.randint(0, V, (B, R, J), generator=g)
    ids[0, 0, :] = 3  # the same id twice in a row
    w = torch.rand(B, R, J, generator=g).to(wwdt)
    w[0, 1, 0] = -0.25  # clamped away
    if R > 2:
        w[0, 2, :] = 0  # S = 0
    grad = torch.randn(B, R, d, generator=g).to(wdt)
    return weight, ids, w, grad


@pytest.mark.parametrize("d", [64, 4096, 37])
@pytest.mark.parametrize("wwdt", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("wdt", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_soft_embed_fwd_bwd(cuda_ops, wdt, wwdt, d):
    V, B, R, J = 1000, 2, 5, 4
    weight, ids, w, grad = make_embed_inputs(V, d, B, R, J, wdt, wwdt)
    out = cuda_ops.soft_embed_fwd_fused(weight.cuda(), ids.cuda(), w.cuda()).cpu()
    wd = weight.double().requires_grad_()
    wwd = w.double().requires_grad_()
    ref = embed_ref(wd, ids, wwd)
    assert out.dtype == wdt and out.shape == (B, R, d)
    torch.testing.assert_close(out.double(), ref.detach(), **E_TOL[wdt])
    ref.backward(grad.double())
    gw, gww = cuda_ops.soft_embed_bwd_fused(grad.cuda(), weight.cuda(), ids.cuda(), w.cuda(), True, True)
    assert gw.dtype == wdt and gww.dtype == wwdt
    torch.testing.assert_close(gw.cpu().double(), wd.grad, **E_TOL[wdt])
    exp_gw = wwd.grad.to(wwdt).double()  # the S = 0 row has huge entries
    tol = E_TOL[wdt] if wwdt != torch.bfloat16 else E_TOL[torch.bfloat16]
    torch.testing.assert_close(gww.cpu().double(), exp_gw, rtol=max(tol["rtol"], 1e-4),
                               atol=max(tol["atol"], 1e-4) * max(1.0, math.sqrt(d)))
    # outputs not asked for are empty
    gw2, gww2 = cuda_ops.soft_embed_bwd_fused(grad.cuda(), weight.cuda(), ids.cuda(), w.cuda(), False, True)
    assert gw2.numel() == 0 and torch.equal(gww2.cpu(), gww.cpu())
    gw3, gww3 = cuda_ops.soft_embed_bwd_fused(grad.cuda(), weight.cuda(), ids.cuda(), w.cuda(), True, False)
    assert gww3.numel() == 0 and gw3.shape == (V, d)


def test_soft_embed_llada_shape(cuda_ops):
    """LLaDA-sized vocabulary and hidden size, evo_step's J = k + 1 = 4."""
    V, d, B, R, J = 126464, 4096, 1, 64, 4
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(V, d, generator=g) * 0.02).to(torch.bfloat16).cuda()
    ids = torch.randint(0, V, (B, R, J), generator=g).cuda()
    w = torch.rand(B, R, J, generator=g).to(torch.bfloat16).cuda()
    out = cuda_ops.soft_embed_fwd_fused(weight, ids, w)
    c = w.double().clamp(min=0)
    wn = c / c.sum(-1, keepdim=True).clamp(min=1e-12)
    ref = (wn[..., None] * weight[ids].double()).sum(-2)  # gather first: no 4 GB float64 copy
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=1e-3)


def test_checks_name_the_argument(cuda_ops):
    inp = make_step_inputs(1, 4, 1000, torch.float32)
    t = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    with pytest.raises(RuntimeError, match="conf"):
        cuda_ops.evo_step_fused(t["logits"], t["x"], t["conf"].float(), t["num_transfer"],
                                t["block_start"], t["block_end"], t["prompt_len"], t["row0"],
                                t["mask_id"], 3, 0.7, 0.0, False, 0.0, False, True, 0)
    with pytest.raises(RuntimeError, match="k_soft"):
        cuda_ops.evo_step_fused(t["logits"], t["x"], t["conf"], t["num_transfer"],
                                t["block_start"], t["block_end"], t["prompt_len"], t["row0"],
                                t["mask_id"], 17, 0.7, 0.0, False, 0.0, False, True, 0)
    with pytest.raises(RuntimeError, match="ids"):
        cuda_ops.soft_embed_fwd_fused(torch.randn(10, 8, device="cuda"),
                                      torch.zeros(1, 2, 3, device="cuda"),
                                      torch.ones(1, 2, 3, device="cuda"))

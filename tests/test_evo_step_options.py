"""evo_step's per-step options: remasking "topk_margin" / "entropy", the sampling filters
top_k / top_p, return_probs, and the STDD transfer rule with its caller-owned history.
The torch reference against definitions written out here, every fused backend against the
reference (sampling: in distribution), and bad input."""
import math

import pytest
import torch

from evofast.ops import STDD, evo_step, stdd_reset, stdd_state
from evofast.ops.stdd import gram_band, spatial_deviance_from_band, temporal_variance

from _evo_cases import make_case


def run(case, backend, device=None, **kw):
    c = case.to(device) if device is not None else case
    x, conf = c.state()
    out = evo_step(c.logits, x, conf, c.num_transfer, backend=backend, return_probs=True, **c.kwargs(), **kw)
    ids, w, transfer, tp, q = (t.cpu() for t in out)
    return dict(x=x.cpu(), conf=conf.cpu(), ids=ids, w=w, transfer=transfer, tp=tp, q=q)


def p_of(logits, M, exclude=True):
    lg = logits.double().clone()
    if exclude:
        lg[..., M] = -math.inf
    return torch.softmax(lg, -1)


# ---------------------------------------------------------------------------
# The reference: confidences, return_probs, filters.

@pytest.mark.parametrize("exclude", [True, False])
def test_margin_and_entropy_definitions(exclude):
    """topk_margin: p_top1 - p_top2; entropy: sum p log p; p the low_confidence one (the mask
    column excluded at temperature 0), and conf records that value on transferred rows."""
    case = make_case(B=2, V=50, seed=1)
    p = p_of(case.logits, case.mask_id, exclude)
    top2 = p.topk(2, -1).values
    expect = {"topk_margin": top2[..., 0] - top2[..., 1],
              "entropy": (p * p.log()).nan_to_num(0.0).sum(-1),
              "low_confidence": top2[..., 0]}
    for remasking, q in expect.items():
        got = run(case, "torch", remasking=remasking, exclude_mask=exclude)
        torch.testing.assert_close(got["q"], q, rtol=1e-12, atol=1e-14)
        rows = got["conf"][:, case.row0:]
        assert torch.equal(rows[got["transfer"]], got["q"][got["transfer"]])


def test_return_probs_is_the_soft_representation_before_the_mask_weight():
    case = make_case(B=2, V=80, seed=2)
    got = run(case, "torch", k_soft=4)
    p = p_of(case.logits, case.mask_id)
    tp, ti = p.topk(4, -1)
    assert got["tp"].dtype == torch.float32 and torch.equal(got["tp"], tp.float())
    assert torch.equal(got["ids"][..., :4], ti)
    plain = evo_step(case.logits, *case.state(), case.num_transfer, backend="torch", k_soft=4, **case.kwargs())
    assert len(plain) == 3 and torch.equal(plain[0], got["ids"])


def test_filters_are_ignored_at_temperature_zero():
    case = make_case(B=2, V=60, seed=3)
    ref = run(case, "torch")
    got = run(case, "torch", top_k=2, top_p=0.1)
    for key in ref:
        assert torch.equal(ref[key], got[key]), key


def test_filter_keep_sets():
    """top_k keeps ties with the k-th value; top_p keeps the smallest most-probable set whose
    mass reaches top_p (equal values: smaller index first), and runs before top_k."""
    from evofast.ops.reference import sampling_filter
    lt = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, -math.inf]], dtype=torch.float64)
    assert sampling_filter(lt, 2, None).tolist() == [[False, True, False, True, False, False]]
    assert sampling_filter(lt, 3, None).tolist() == [[False, True, True, True, True, False]]
    p = torch.softmax(lt, -1)[0]
    mass2 = float(p[1] + p[3])
    assert sampling_filter(lt, None, mass2 - 1e-9).tolist() == [[False, True, False, True, False, False]]
    assert sampling_filter(lt, None, mass2 + 1e-9).tolist() == [[False, True, True, True, False, False]]
    assert sampling_filter(lt, None, float(p[1]) * 0.5).tolist() == [[False, True, False, False, False, False]]
    # top_p first, then top_k of what is left (the intersection)
    assert sampling_filter(lt, 1, mass2 + 1e-9).tolist() == [[False, True, False, True, False, False]]


def sample_rows(backend, device, row, R, M, chunk=500, **kw):
    """Every row eligible and transferred: R independent draws and their q, from steps of at most
    `chunk` rows (each its own seed; Triton's interpreter slows down more than linearly in rows)."""
    V = row.numel()
    draws, qs = [], []
    for i, start in enumerate(range(0, R, chunk)):
        n = min(chunk, R - start)
        logits = row.expand(1, n, V).contiguous().to(device)
        x = torch.full((1, n), M, device=device)
        conf = torch.zeros(1, n, dtype=torch.float64, device=device)
        evo_step(logits, x, conf, n, block_start=0, block_end=n, prompt_len=0, mask_id=M, backend=backend,
                 generator=torch.Generator().manual_seed(11 + i), **kw)
        draws.append(x.cpu()[0])
        qs.append(conf.cpu()[0])
    return torch.cat(draws), torch.cat(qs)


def assert_frequencies(draws, p, tail=5.0):
    n = draws.numel()
    counts = torch.bincount(draws, minlength=p.numel()).double()
    assert bool((counts[p == 0] == 0).all()), counts
    sd = torch.sqrt(n * p * (1 - p)).clamp_min(1.0)
    assert bool(((counts - n * p).abs() < tail * sd).all()), (counts, n * p)


ROW = torch.tensor([1.0, 2.5, 0.0, 2.5, -1.0, 1.8, 0.7, 3.0])  # ties at the 2nd / 3rd largest


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", "cuda"])
@pytest.mark.parametrize("top_k,top_p,T", [(2, None, 0.8), (3, None, 1.3), (None, 0.7, 1.0), (4, 0.9, 0.7)])
def test_filtered_sampling_distribution(backend, top_k, top_p, T):
    """x0 follows the filtered tempered distribution (the mask column excluded) and q is its
    probability under that distribution; fused backends draw from their own RNG."""
    from conftest import skip_unless_usable
    dev = skip_unless_usable(backend) if backend != "torch" else torch.device("cpu")
    M = 7
    from evofast.ops.reference import sampling_filter
    lt = ROW.double() / T
    lt[M] = -math.inf
    keep = sampling_filter(lt[None], top_k, top_p)[0]
    pf = torch.softmax(lt.masked_fill(~keep, -math.inf), -1)
    draws, q = sample_rows(backend, dev, ROW, 4000, M, temperature=T, top_k=top_k, top_p=top_p)
    assert_frequencies(draws, pf)
    torch.testing.assert_close(q, pf[draws], rtol=1e-13, atol=0)


@pytest.mark.parametrize("remasking", ["topk_margin", "entropy"])
def test_filtered_confidence_is_deterministic(fused, remasking):
    """margin / entropy under a top_k filter do not depend on the draw: equal to the reference."""
    name, dev = fused
    if name == "cuda":
        pytest.skip("cuda runs top_k on the reference")
    case = make_case(B=2, V=300, seed=4)
    kw = dict(temperature=0.9, top_k=5, remasking=remasking, generator=torch.Generator().manual_seed(1))
    ref = run(case, "torch", **kw)
    got = run(case, name, dev, **dict(kw, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(got["q"], ref["q"], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------
# Fused backends against the reference: remasking, return_probs.

OPTION_GRID = [
    # V, B, dtype, remasking, k_soft, exclude_mask, threshold
    (37, 1, torch.float32, "topk_margin", 1, True, None),
    (1000, 3, torch.float32, "entropy", 3, True, None),
    (1000, 2, torch.bfloat16, "topk_margin", 16, False, 0.05),
    (1000, 2, torch.float16, "entropy", 2, False, 0.3),
    (126464, 1, torch.bfloat16, "entropy", 3, True, None),
    (126464, 2, torch.float32, "topk_margin", 3, True, None),
]


@pytest.mark.parametrize("V,B,dtype,remasking,k,exclude,threshold", OPTION_GRID)
def test_fused_confidences_match_reference(fused, V, B, dtype, remasking, k, exclude, threshold):
    name, dev = fused
    small = V > 10000
    case = make_case(B=B, V=V, dtype=dtype, prompt=6 if small else 12, block=4 if small else 8,
                     n_blocks=2 if small else 3, seed=V + B, prompt_masks=1)
    kw = dict(remasking=remasking, k_soft=k, exclude_mask=exclude, threshold=threshold)
    ref, got = run(case, "torch", **kw), run(case, name, dev, **kw)
    assert torch.equal(got["transfer"], ref["transfer"]) and torch.equal(got["x"], ref["x"])
    torch.testing.assert_close(got["conf"], ref["conf"], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got["q"], ref["q"], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got["tp"], ref["tp"], rtol=1e-6, atol=0)


def test_fused_entropy_q_is_accurate(fused):
    """-H = sum p log p at the LLaDA vocabulary, against an exactly summed float64 value."""
    name, dev = fused
    case = make_case(B=1, V=126464, prompt=4, block=2, n_blocks=1, block_idx=0, seed=5)
    got = run(case, name, dev, remasking="entropy")
    for r in range(case.logits.shape[1]):
        lg = case.logits[0, r].double().clone()
        lg[case.mask_id] = -math.inf
        m = float(lg.max())
        e = torch.exp(lg - m)
        s = math.fsum(e.tolist())
        ent = math.fsum((e * (lg - m)).nan_to_num(0.0).tolist()) / s - math.log(s)
        assert abs(float(got["q"][0, r]) - ent) <= 1e-13 * abs(ent)


# ---------------------------------------------------------------------------
# STDD: the definition worked by hand.

def test_tv_by_hand_and_ring_wrap_around():
    W = 3
    history = torch.zeros(1, 4, W, dtype=torch.float64)
    count = torch.tensor([[0, 1, 2, 5]])
    history[0, 1, 0] = 0.5
    history[0, 2, :2] = torch.tensor([0.2, 0.4], dtype=torch.float64)
    # position 3 recorded 5 values: numbers 0..4 at slots 0, 1, 2, 0, 1; the last two (3, 4)
    # sit in slots 0 and 1, number 2 (slot 2) is one too old for W - 1 = 2 kept values
    history[0, 3] = torch.tensor([0.9, 0.1, 100.0], dtype=torch.float64)
    q = torch.tensor([[0.7, 0.3, 0.6, 0.5]], dtype=torch.float64)
    tv = temporal_variance(history, count, q)[0]
    assert tv[0] == 0.0                                        # one value only
    assert abs(float(tv[1]) - 0.1) < 1e-15                     # {0.5, 0.3}: std 0.1
    assert abs(float(tv[2]) - math.sqrt(0.08 / 3)) < 1e-15     # {0.2, 0.4, 0.6}
    vals = torch.tensor([0.9, 0.1, 0.5], dtype=torch.float64)  # slot 2 (100.0) is out of the window
    assert abs(float(tv[3]) - float(vals.std(unbiased=False))) < 1e-15


def hand_logits():
    """Three window rows, V = 4 with the mask column 3 (ignored by SD, whatever it holds):
    l0 = (2, 0, 0), l1 = (0, 2, 0), l2 = (2, 2, 0).
    SD_0 = 1 - cos(l0, l1) = 1; SD_2 = 1 - cos(l2, l1) = 1 - 1/sqrt(2);
    SD_1 = 1 - cos(l1, (l0 + l2) / 2 = (2, 1, 0)) = 1 - 2 / (2 * sqrt(5)) = 1 - 1/sqrt(5).
    q (greedy, mask excluded): p of the argmax, e^2 / (e^2 + 2) for rows 0 and 1 (0.787),
    e^2 / (2 e^2 + 1) for row 2 (0.468)."""
    lg = torch.tensor([[[2.0, 0.0, 0.0, 9.0], [0.0, 2.0, 0.0, -5.0], [2.0, 2.0, 0.0, 1.0]]])
    sd = [1.0, 1 - 1 / math.sqrt(5), 1 - 1 / math.sqrt(2)]
    e2 = math.exp(2.0)
    q = [e2 / (e2 + 2), e2 / (e2 + 2), e2 / (2 * e2 + 1)]
    return lg, sd, q


def test_sd_by_hand():
    lg, sd, _ = hand_logits()
    got = spatial_deviance_from_band(gram_band(lg, 3, 2), 1)[0]
    torch.testing.assert_close(got, torch.tensor(sd, dtype=torch.float64), rtol=1e-15, atol=1e-15)
    # radius 2: row 0's neighbours are rows 1 and 2, mean (1, 2, 0): cos = 2 / (2 sqrt 5)
    got2 = spatial_deviance_from_band(gram_band(lg, 3, 4), 2)[0]
    assert abs(float(got2[0]) - (1 - 1 / math.sqrt(5))) < 1e-15
    # one row: no neighbour, SD = 0
    assert float(spatial_deviance_from_band(gram_band(lg[:, :1], 3, 2), 1)[0, 0]) == 0.0


def run_hand(backend, dev, stdd, count=None, history=None):
    lg, _, _ = hand_logits()
    x = torch.full((1, 3), 3)
    conf = torch.zeros(1, 3, dtype=torch.float64)
    h, n = stdd_state(1, 3, stdd.window)
    if count is not None:
        n[:], h[:] = count, history
    h, n = h.to(dev), n.to(dev)
    xd, cd = x.to(dev), conf.to(dev)
    out = evo_step(lg.to(dev), xd, cd, 0, block_start=0, block_end=3, prompt_len=0, mask_id=3,
                   backend=backend, stdd=stdd, stdd_history=h, stdd_count=n, return_probs=True)
    return out[2].cpu()[0].tolist(), out[4].cpu()[0], h.cpu(), n.cpu()


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", "cuda"])
def test_stdd_by_hand(backend):
    """tau = 0.5, lam_s = 0.5: thresholds 0.5 + SD / 2 = (1.0, 0.776, 0.646) (tau_max 1.5):
    rows 0 and 2 stay (0.787 < 1.0, 0.468 < 0.646), row 1 passes (0.787 >= 0.776)."""
    from conftest import skip_unless_usable
    dev = skip_unless_usable(backend) if backend != "torch" else torch.device("cpu")
    _, sd, q = hand_logits()
    st = STDD(tau=0.5, lam_t=0.0, lam_s=0.5, tau_min=0.0, tau_max=1.5)
    transfer, got_q, h, n = run_hand(backend, dev, st)
    torch.testing.assert_close(got_q, torch.tensor(q, dtype=torch.float64), rtol=1e-14, atol=0)
    assert [q[i] >= 0.5 + sd[i] / 2 for i in range(3)] == [False, True, False]
    assert transfer == [False, True, False]
    assert n.tolist() == [[1, 1, 1]] and torch.equal(h[0, :, 0], got_q)   # every eligible row recorded
    # nobody passes (tau 0.9): the row with the largest q - tau_i: row 1 (-0.39) over row 0 (-0.61)
    transfer, *_ = run_hand(backend, dev, STDD(tau=0.9, lam_t=0.0, lam_s=0.5, tau_max=2.0))
    assert transfer == [False, True, False]
    # the temporal term: row 0 with history (0.2, 0.4) gets TV = std(0.2, 0.4, 0.787) = 0.245; lam_t = 1,
    # tau = 0.5: 0.745 for row 0 (passes), rows 1 and 2 have one value each: 0.5 (row 1 passes,
    # row 2 at 0.468 does not)
    hist = torch.zeros(1, 3, 3, dtype=torch.float64)
    hist[0, 0, :2] = torch.tensor([0.2, 0.4], dtype=torch.float64)
    transfer, _, h, n = run_hand(backend, dev, STDD(tau=0.5, lam_t=1.0, lam_s=0.0), torch.tensor([[2, 0, 0]]), hist)
    tv0 = float(torch.tensor([0.2, 0.4, q[0]], dtype=torch.float64).std(unbiased=False))
    assert q[0] >= 0.5 + tv0 and transfer == [True, True, False]
    assert n.tolist() == [[3, 1, 1]] and abs(float(h[0, 0, 2]) - q[0]) < 1e-15


def stdd_run(case, backend, dev, stdd, steps=3, seed=0, **kw):
    """Several steps of one state with fresh logits each step; returns every step's outputs.
    Rows share a common part (neighbours agree to a varying degree: SD spreads over about
    0.05..0.8) and each row its own sharpness (q spreads over (0, 1))."""
    c = case.to(dev)
    x, conf = c.state()
    h, n = stdd_state(x.shape[0], x.shape[1], stdd.window if stdd else 3, device=dev)
    g = torch.Generator().manual_seed(seed)
    extra = dict(stdd=stdd, stdd_history=h, stdd_count=n) if stdd else dict(threshold=kw.pop("tau"))
    B, R, V = case.logits.shape
    outs = []
    for _ in range(steps):
        common = torch.randn(B, 1, V, generator=g)
        own = torch.randn(B, R, V, generator=g) * torch.rand(B, R, 1, generator=g) * 2
        sharp = 1 + 5 * torch.rand(B, R, 1, generator=g)
        logits = ((common + own) * sharp).to(case.logits.dtype).to(dev)
        o = evo_step(logits, x, conf, c.num_transfer, backend=backend, return_probs=True, **c.kwargs(),
                     **extra, **kw)
        outs.append([t.cpu() for t in o] + [x.cpu().clone(), conf.cpu().clone()])
    return outs, h.cpu(), n.cpu()


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", "cuda"])
@pytest.mark.parametrize("remasking", ["low_confidence", "entropy", "random"])
@pytest.mark.parametrize("tau", [0.05, 0.6, 2.0])
def test_stdd_with_zero_lambdas_is_the_threshold_rule(backend, remasking, tau):
    """Bitwise: outputs, x and conf, over several steps, B > 1, ties in q across rows too."""
    from conftest import skip_unless_usable
    dev = skip_unless_usable(backend) if backend != "torch" else torch.device("cpu")
    lo = -1e9 if remasking == "entropy" else 0.0
    st = STDD(tau=tau, lam_t=0.0, lam_s=0.0, tau_min=lo, tau_max=max(tau, 1.0))
    for seed, ties in ((0, False), (1, True)):
        case = make_case(B=3, V=200, seed=seed, ties=ties)
        a, _, n = stdd_run(case, backend, dev, st, seed=seed, remasking=remasking,
                           generator=torch.Generator().manual_seed(3))
        b, _, _ = stdd_run(case, backend, dev, None, seed=seed, tau=tau, remasking=remasking,
                           generator=torch.Generator().manual_seed(3))
        for sa, sb in zip(a, b):
            for ta, tb in zip(sa, sb):
                assert torch.equal(ta, tb)
        assert int(n.sum()) > 0


STDD_GRID = [
    # V, B, dtype, stdd, remasking
    (300, 3, torch.float32, STDD(tau=0.3, lam_t=1.0, lam_s=0.5), "low_confidence"),
    (300, 2, torch.bfloat16, STDD(tau=0.2, lam_t=1.0, lam_s=0.6, radius=2, window=2), "low_confidence"),
    (300, 3, torch.float32, STDD(tau=0.1, lam_t=0.5, lam_s=5.0, radius=0, tau_max=0.5), "topk_margin"),
    (1000, 2, torch.float16, STDD(tau=-2.0, lam_t=1.0, lam_s=2.0, tau_min=-10.0, tau_max=0.0), "entropy"),
    (126464, 2, torch.bfloat16, STDD(tau=0.3, lam_t=1.0, lam_s=0.5), "low_confidence"),
]


@pytest.mark.parametrize("V,B,dtype,stdd,remasking", STDD_GRID)
def test_fused_stdd_matches_reference(fused, V, B, dtype, stdd, remasking):
    """Tokens and transfers exact, conf / q within float64 rounding, the same history."""
    name, dev = fused
    small = V > 10000
    case = make_case(B=B, V=V, dtype=dtype, prompt=6 if small else 12, block=4 if small else 8,
                     n_blocks=2 if small else 3, seed=V + B, prompt_masks=1)
    ref, hr, nr = stdd_run(case, "torch", torch.device("cpu"), stdd, steps=2 if small else 3, remasking=remasking)
    got, hg, ng = stdd_run(case, name, dev, stdd, steps=2 if small else 3, remasking=remasking)
    for sr, sg in zip(ref, got):
        ids_r, w_r, tr_r, tp_r, q_r, x_r, c_r = sr
        ids_g, w_g, tr_g, tp_g, q_g, x_g, c_g = sg
        assert torch.equal(tr_g, tr_r) and torch.equal(x_g, x_r)
        torch.testing.assert_close(c_g, c_r, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(q_g, q_r, rtol=1e-12, atol=1e-13)
    assert torch.equal(ng, nr) and int(nr.sum()) > 0
    torch.testing.assert_close(hg, hr, rtol=1e-12, atol=1e-13)


def test_stdd_history_reset_and_nonfinite_step():
    case = make_case(B=2, V=100, seed=6)
    st = STDD(tau=0.99)
    L = case.x.shape[1]
    h, n = stdd_state(2, L)
    x, conf = case.state()
    evo_step(case.logits, x, conf, 0, stdd=st, stdd_history=h, stdd_count=n, backend="torch", **case.kwargs())
    eligible_before = (case.x == case.mask_id) & (torch.arange(L) >= case.row0) & \
        (torch.arange(L) < case.block_end[:, None])
    assert torch.equal(n, eligible_before.long())                 # only eligible rows record
    stdd_reset(n, case.block_start, case.block_end)
    pos = torch.arange(L)
    in_block = (pos >= case.block_start[:, None]) & (pos < case.block_end[:, None])
    assert int(n[in_block].sum()) == 0 and torch.equal(n[~in_block], eligible_before.long()[~in_block])
    # a non-finite step leaves the history (and x, conf) untouched
    bad = case.logits.clone()
    bad[1, 2, 5] = float("nan")
    h0, n0 = h.clone(), n.clone()
    for backend in ("torch", "cpp"):
        with pytest.raises(ValueError, match="NaN"):
            evo_step(bad, x, conf, 0, stdd=st, stdd_history=h, stdd_count=n, backend=backend, **case.kwargs())
        assert torch.equal(h, h0) and torch.equal(n, n0)


# ---------------------------------------------------------------------------
# Bad input (the calls with the new arguments are in test_evo_step._bad_calls).

@pytest.mark.parametrize("kwargs,arg", [
    (dict(tau=float("nan")), "tau"), (dict(lam_t=float("inf")), "lam_t"), (dict(lam_s="1"), "lam_s"),
    (dict(tau=0.9, tau_max=0.5), "tau"), (dict(tau_min=float("nan")), "tau_min"),
    (dict(window=0), "window"), (dict(window=65), "window"), (dict(radius=-1), "radius"),
    (dict(radius=17), "radius"), (dict(radius=1.0), "radius"),
])
def test_stdd_parameters_are_checked(kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        STDD(**kwargs)
    with pytest.raises(ValueError, match=r"^window:"):
        stdd_state(2, 5, window=0)


# ---------------------------------------------------------------------------
# torch.library integration with the options.

@pytest.mark.parametrize("name", ["torch", "cpp"])
@pytest.mark.parametrize("opts", ["confidence", "stdd"])
def test_opcheck_with_options(name, opts):
    import evofast
    if name not in evofast.ops.backends():
        pytest.skip(f"{name} not built")
    c = make_case(B=2, V=64, seed=3)
    kw = dict(confidence="entropy")
    if opts == "stdd":
        h, n = stdd_state(2, c.x.shape[1])
        st = STDD(tau=0.3)
        kw = dict(stdd_history=h, stdd_count=n, stdd_params=st.params(), stdd_window=st.window,
                  stdd_radius=st.radius)
    args = (c.logits, c.x.clone(), c.conf.clone(), c.num_transfer, c.block_start, c.block_end, c.prompt_len,
            None, None, c.row0, c.mask_id, 3, 0.7, 0.0, False, None, True, 0, name)
    torch.library.opcheck(torch.ops.evofast.evo_step.default, args, kw)


def tied_boundary_row(V=6000):
    """Two large values and a three-way tie at the third largest, in different 2048-column
    chunks (the cpp kernel's chunk), the rest far below: top_k = 3 keeps five columns."""
    row = torch.full((V,), -6.0)
    row[[3100, 5]] = torch.tensor([2.0, 1.5])
    row[[100, 2500, 4500]] = 1.0
    row[4600] = 0.999
    return row


@pytest.mark.parametrize("backend", ["torch", "cpp", "cuda"])
def test_filter_ties_across_chunks(backend):
    from conftest import skip_unless_usable
    dev = skip_unless_usable(backend) if backend != "torch" else torch.device("cpu")
    row = tied_boundary_row()
    M = row.numel() - 1
    lt = row.double() / 0.5
    lt[M] = -math.inf
    keep = torch.zeros(row.numel(), dtype=torch.bool)
    keep[[3100, 5, 100, 2500, 4500]] = True
    pf = torch.softmax(lt.masked_fill(~keep, -math.inf), -1)
    draws, q = sample_rows(backend, dev, row, 3000, M, temperature=0.5, top_k=3)
    assert_frequencies(draws, pf)
    torch.testing.assert_close(q, pf[draws], rtol=1e-13, atol=0)
    for remasking, expect in (("topk_margin", pf[3100] - pf[5]), ("entropy", (pf * pf.log()).nan_to_num(0.0).sum())):
        _, qm = sample_rows(backend, dev, row, 4, M, temperature=0.5, top_k=3, remasking=remasking)
        torch.testing.assert_close(qm, expect.expand(4), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("radius", [1, 2])
def test_cpp_stdd_tiles_split_a_row(radius):
    """With several threads the cpp kernel splits a batch row's window into tiles that also
    read the rows after them (halo): the same Gram band, so the same result."""
    import evofast
    if "cpp" not in evofast.ops.backends():
        pytest.skip("cpp not built")
    n = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        case = make_case(B=1, V=3000, seed=radius, block=8, n_blocks=3)
        st = STDD(tau=0.3, lam_t=1.0, lam_s=0.5, radius=radius)
        ref, hr, nr = stdd_run(case, "torch", torch.device("cpu"), st, steps=2)
        got, hg, ng = stdd_run(case, "cpp", torch.device("cpu"), st, steps=2)
    finally:
        torch.set_num_threads(n)
    for sr, sg in zip(ref, got):
        assert torch.equal(sg[2], sr[2]) and torch.equal(sg[5], sr[5])
        torch.testing.assert_close(sg[4], sr[4], rtol=1e-12, atol=1e-13)
    assert torch.equal(ng, nr)

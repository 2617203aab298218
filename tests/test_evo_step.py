"""evo_step: the torch reference against the authors' semantics, every fused
backend against the reference, and bad input."""
import pytest
import torch

import evofast
from evofast.baselines import authors_step
from evofast.ops import STDD, NonFiniteLogitsError, evo_step, stdd_state

from _evo_cases import make_case


def run(case, backend, device=None, **kw):
    c = case.to(device) if device is not None else case
    x, conf = c.state()
    ids, w, transfer = evo_step(c.logits, x, conf, c.num_transfer, backend=backend, **c.kwargs(), **kw)
    return dict(x=x.cpu(), conf=conf.cpu(), ids=ids.cpu(), w=w.cpu(), transfer=transfer.cpu())


def assert_same_topk(got_ids, ref_ids, logits):
    """Top-k ids agree up to the order of exactly tied logits (torch.topk leaves it
    unspecified; the fused backends put the smaller id first)."""
    k = got_ids.shape[-1] - 1
    assert torch.equal(got_ids[..., k], ref_ids[..., k]), "x (the last id) differs"
    lg = logits.cpu().float()
    got_v = torch.gather(lg, -1, got_ids[..., :k])
    ref_v = torch.gather(lg, -1, ref_ids[..., :k])
    assert torch.equal(got_v, ref_v), "top-k values differ"
    tied = got_v[..., 1:] == got_v[..., :-1]
    assert bool((got_ids[..., 1:k] > got_ids[..., :k - 1])[tied].all()), "ties not in index order"
    # ids whose value is unique in the top-k and not the k-th value (which may tie
    # with ids outside the top-k) must be the same ids
    unique = ((got_v.unsqueeze(-1) == got_v.unsqueeze(-2)).sum(-1) == 1) & (got_v != got_v[..., -1:])
    assert torch.equal(got_ids[..., :k][unique], ref_ids[..., :k][unique])


def assert_same_step(got, ref, dtype, logits):
    assert torch.equal(got["transfer"], ref["transfer"]), "transfer differs"
    assert torch.equal(got["x"], ref["x"]), "x differs"
    torch.testing.assert_close(got["conf"], ref["conf"], rtol=1e-13, atol=1e-300)
    assert_same_topk(got["ids"], ref["ids"], logits)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else {}
    torch.testing.assert_close(got["w"].float(), ref["w"].float(), **tol)


# ---------------------------------------------------------------------------
# The reference follows the authors' code (batch 1, the whole sequence).

@pytest.mark.parametrize("threshold", [None, 0.05, 0.9])
@pytest.mark.parametrize("k_soft,alpha", [(3, 0.7), (1, 0.5), (5, 0.0)])
@pytest.mark.parametrize("block_idx", [0, 2])
def test_reference_equals_authors(threshold, k_soft, alpha, block_idx):
    case = make_case(B=1, V=500, block_idx=block_idx, row0=0, seed=block_idx * 7 + k_soft)
    x1, c1 = case.state()
    ids1, w1, t1 = authors_step(case.logits.clone(), x1, c1, case.num_transfer, mask_id=case.mask_id,
                                block_start=int(case.block_start), block_end=int(case.block_end),
                                prompt_len=int(case.prompt_len), k_soft=k_soft, alpha=alpha, threshold=threshold)
    got = run(case, "torch", k_soft=k_soft, alpha=alpha, threshold=threshold)
    assert torch.equal(got["x"], x1) and torch.equal(got["conf"], c1) and torch.equal(got["transfer"], t1)
    assert torch.equal(got["ids"], ids1) and torch.equal(got["w"], w1)


def test_reference_sampling_equals_authors_with_same_rng():
    case = make_case(B=1, V=300, row0=0, seed=3)
    x1, c1 = case.state()
    torch.manual_seed(1234)
    ids1, w1, _ = authors_step(case.logits.clone(), x1, c1, case.num_transfer, mask_id=case.mask_id,
                               block_start=int(case.block_start), block_end=int(case.block_end),
                               prompt_len=int(case.prompt_len), temperature=0.8)
    got = run(case, "torch", temperature=0.8, generator=torch.Generator().manual_seed(1234))
    assert torch.equal(got["x"], x1) and torch.equal(got["conf"], c1)
    assert torch.equal(got["ids"], ids1) and torch.equal(got["w"], w1)


def test_window_equals_full_sequence():
    """A window holding every row the step can change gives the full-sequence result."""
    case = make_case(B=3, V=400, row0=0, seed=5)
    full = run(case, "torch")
    for row0 in (3, int(case.block_start.min())):
        sub = make_case(B=3, V=400, row0=0, seed=5)
        sub.logits = sub.logits[:, row0:]
        sub.row0 = row0
        got = run(sub, "torch")
        assert torch.equal(got["x"], full["x"]) and torch.equal(got["conf"], full["conf"])
        assert torch.equal(got["ids"], full["ids"][:, row0:]) and torch.equal(got["w"], full["w"][:, row0:])


def test_logits_are_never_written():
    case = make_case(B=2, V=300)
    before = case.logits.clone()
    for name in evofast.ops.backends():
        if name in ("cuda",):
            continue
        run(case, name)
        assert torch.equal(case.logits, before), name


def test_fewer_eligible_than_asked_takes_all():
    case = make_case(B=2, V=200, n_transfer=1000)
    got = run(case, "torch")
    pos = torch.arange(case.row0, case.x.shape[1])
    eligible = (case.x[:, case.row0:] == case.mask_id) & (pos < case.block_end[:, None])
    assert torch.equal(got["transfer"], eligible)


def test_threshold_keeps_best_and_confident():
    case = make_case(B=2, V=200, seed=11)
    ref = run(case, "torch", threshold=1.1)  # nothing passes: only the best one per row
    assert ref["transfer"].sum(1).tolist() == [1, 1]


# ---------------------------------------------------------------------------
# Every fused backend against the reference.

GRID = [
    # V, B, dtype, window starts inside the prompt, threshold, k, exclude_mask
    (37, 1, torch.float32, True, None, 3, True),
    (1000, 3, torch.float32, False, None, 1, True),
    (1000, 3, torch.bfloat16, True, 0.02, 16, True),
    (1000, 2, torch.float16, True, None, 3, False),
    (50257, 1, torch.float32, True, 0.3, 3, True),
    (50257, 3, torch.bfloat16, False, None, 3, True),
    (126464, 1, torch.float32, True, None, 3, True),
    (126464, 3, torch.bfloat16, True, None, 2, False),
]


@pytest.mark.parametrize("V,B,dtype,prompt_rows,threshold,k,exclude", GRID)
def test_fused_matches_reference(fused, V, B, dtype, prompt_rows, threshold, k, exclude):
    name, dev = fused
    small = V > 10000
    case = make_case(B=B, V=V, dtype=dtype, prompt=6 if small else 12, block=4 if small else 8,
                     n_blocks=2 if small else 3, block_idx=1, seed=V + B,
                     row0=None if prompt_rows else "block", prompt_masks=1 if prompt_rows else 0)
    kw = dict(k_soft=k, threshold=threshold, exclude_mask=exclude, alpha=0.6)
    ref = run(case, "torch", **kw)
    got = run(case, name, dev, **kw)
    assert_same_step(got, ref, dtype, case.logits)


@pytest.mark.parametrize("steps", [3])
def test_fused_multi_step_trajectory(fused, steps):
    """Several consecutive steps on the same state stay identical (conf records feed revisions)."""
    name, dev = fused
    case = make_case(B=3, V=700, seed=21)
    xr, cr = case.state()
    xf, cf = xr.clone().to(dev), cr.clone().to(dev)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        logits = torch.randn(case.logits.shape, generator=g) * 4
        a = evo_step(logits, xr, cr, case.num_transfer, backend="torch", **case.kwargs())
        b = evo_step(logits.to(dev), xf, cf, case.num_transfer, backend=name, **case.kwargs())
        assert_same_topk(b[0].cpu(), a[0], logits)
        assert torch.equal(a[2], b[2].cpu())
    assert torch.equal(xr, xf.cpu())
    torch.testing.assert_close(cr, cf.cpu(), rtol=1e-13, atol=1e-300)


def test_fused_ties_within_rows(fused):
    """Integer logits: many exact ties. argmax takes the first index (as torch);
    top-k ties may pick other ids than torch.topk, but the same values, larger
    value first and smaller index first among equal values."""
    name, dev = fused
    case = make_case(B=2, V=300, ties=True, seed=2)
    ref = run(case, "torch")
    got = run(case, name, dev)
    assert torch.equal(got["x"], ref["x"]) and torch.equal(got["transfer"], ref["transfer"])
    torch.testing.assert_close(got["conf"], ref["conf"], rtol=1e-13, atol=0)
    torch.testing.assert_close(got["w"], ref["w"])
    assert_same_topk(got["ids"], ref["ids"], case.logits)


def test_fused_confidence_ties_across_rows(fused):
    """Identical rows give identical q: the fused backends take smaller positions
    first; torch.topk may take others, but the same number."""
    name, dev = fused
    case = make_case(B=1, V=200, seed=4, n_transfer=2)
    case.logits = case.logits[:, :1].expand_as(case.logits).contiguous()
    ref = run(case, "torch")
    got = run(case, name, dev)
    assert int(got["transfer"].sum()) == int(ref["transfer"].sum())
    pos = got["transfer"][0].nonzero().flatten()
    eligible = ((case.x[0, case.row0:] == case.mask_id)
                & (torch.arange(case.row0, case.x.shape[1]) < case.block_end[0])).nonzero().flatten()
    assert torch.equal(pos, eligible[: len(pos)])


def test_fused_noncontiguous_logits(fused):
    name, dev = fused
    case = make_case(B=2, V=500, seed=8)
    big = torch.randn(case.logits.shape[1], 2, case.logits.shape[0], case.logits.shape[2])
    case.logits = big[:, 1].transpose(0, 1)                   # strided in B and R
    assert not case.logits.is_contiguous()
    assert_same_step(run(case, name, dev), run(case, "torch"), torch.float32, case.logits)


def test_fused_random_remasking(fused):
    name, dev = fused
    case = make_case(B=3, V=300, seed=9)
    g = torch.Generator().manual_seed(0)
    a = run(case, name, dev, remasking="random", generator=g)
    b = run(case, name, dev, remasking="random", generator=torch.Generator().manual_seed(0))
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["conf"], b["conf"])   # seeded: deterministic
    ref = run(case, "torch", remasking="random", generator=torch.Generator().manual_seed(0))
    assert a["ids"].shape == ref["ids"].shape and a["w"].dtype == ref["w"].dtype
    assert torch.equal(a["transfer"].sum(1), ref["transfer"].sum(1))
    newly = a["transfer"]
    c = a["conf"][:, case.row0:][newly]
    assert bool(((c > 0) & (c < 1)).all())
    # The soft representation still comes from p, as in low_confidence mode.
    greedy = run(case, name, dev)
    assert torch.equal(a["ids"][..., :-1], greedy["ids"][..., :-1])


def test_fused_sampling_distribution(fused):
    """At temperature 1 x0 follows softmax(logits) with the mask excluded."""
    name, dev = fused
    V, R = 6, 600
    M = 5
    row = torch.tensor([1.0, 0.0, -1.0, 0.5, 2.0, 3.0])
    logits = row.expand(1, R, V).contiguous()
    x = torch.full((1, R), M)
    conf = torch.zeros(1, R, dtype=torch.float64)
    evo_step(logits.to(dev), x_d := x.to(dev), conf.to(dev), torch.tensor([R]), block_start=0, block_end=R,
             prompt_len=0, mask_id=M, temperature=1.0, generator=torch.Generator().manual_seed(7),
             backend=name)
    freq = torch.bincount(x_d.cpu()[0], minlength=V).double() / R
    expect = torch.softmax(row[:M].double(), 0)
    assert freq[M] == 0
    assert torch.allclose(freq[:M], expect, atol=0.06), (freq, expect)


def test_fused_tiny_temperature_is_greedy(fused):
    name, dev = fused
    case = make_case(B=2, V=400, seed=13, scale=5.0)
    got = run(case, name, dev, temperature=1e-6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got["x"], run(case, "torch")["x"])


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nonfinite_logits_raise_and_leave_state(bad):
    names = [n for n in evofast.ops.backends() if n != "cuda"]
    for name in names:
        dev = torch.device("cpu")
        case = make_case(B=2, V=300, seed=1)
        case.logits[1, 3, 17] = float(bad)
        x, conf = case.state()
        with pytest.raises(NonFiniteLogitsError, match="row 3 of batch 1"):
            evo_step(case.logits.to(dev), x, conf, case.num_transfer, backend=name, **case.kwargs())
        assert torch.equal(x, case.x) and torch.equal(conf, case.conf), name


# ---------------------------------------------------------------------------
# Bad input: a ValueError naming the argument, before any kernel runs.

def _bad_calls():
    c = make_case(B=2, V=100)
    base = dict(logits=c.logits, x=c.x.clone(), conf=c.conf.clone(), num_transfer=c.num_transfer, **c.kwargs())
    L = c.x.shape[1]
    yield "logits", dict(base, logits=c.logits[0])
    yield "logits", dict(base, logits=c.logits.double())
    yield "x", dict(base, x=c.x.int())
    yield "x", dict(base, x=c.x[:1].clone())
    yield "conf", dict(base, conf=c.conf.float())
    yield "conf", dict(base, conf=c.conf[:, :-1].clone())
    yield "mask_id", dict(base, mask_id=100)
    yield "mask_id", dict(base, mask_id=-1)
    yield "k_soft", dict(base, k_soft=0)
    yield "k_soft", dict(base, k_soft=17)
    yield "alpha", dict(base, alpha=1.0)
    yield "alpha", dict(base, alpha=-0.1)
    yield "temperature", dict(base, temperature=-1.0)
    yield "remasking", dict(base, remasking="lowest")
    yield "row0", dict(base, row0=L)
    yield "block_end", dict(base, block_end=L + 1)
    yield "block_start", dict(base, block_start=torch.tensor([0, -1]))
    yield "block_end", dict(base, block_start=10, block_end=5)
    yield "prompt_len", dict(base, prompt_len=torch.tensor([1, 2, 3]))
    yield "num_transfer", dict(base, num_transfer=torch.tensor([1.0, 2.0]))
    yield "threshold", dict(base, threshold=float("nan"))
    yield "logits", dict(base, logits=c.logits.to("meta"))
    for name in ("num_transfer", "block_start", "block_end", "prompt_len"):
        yield name, dict(base, **{name: torch.tensor([1, 2], device="meta")})
        yield name, dict(base, **{name: 2**63})
    x_out = c.x.clone()
    x_out[1, 3] = 100                                   # = V: not a token id
    yield "x", dict(base, x=x_out)
    yield "x", dict(base, x=c.x.clone().fill_(-1))
    yield "conf", dict(base, conf=c.conf.t().contiguous().t())
    yield "x", dict(base, x=c.x.t().contiguous().t())
    yield "backend", dict(base, backend="foo")
    yield "exclude_mask", dict(base, exclude_mask="yes")
    yield "check_finite", dict(base, check_finite=1)
    yield "check_ids", dict(base, check_ids=None)
    # the per-step options
    h, n = stdd_state(2, L)
    sb = dict(base, stdd=STDD(), stdd_history=h, stdd_count=n)
    yield "remasking", dict(base, remasking="margin")
    yield "top_k", dict(base, top_k=0)
    yield "top_k", dict(base, top_k=2.0)
    yield "top_p", dict(base, top_p=0.0)
    yield "top_p", dict(base, top_p=1.5)
    yield "top_p", dict(base, top_p="0.9")
    yield "return_probs", dict(base, return_probs=1)
    yield "stdd", dict(base, stdd=dict(tau=0.9), stdd_history=h, stdd_count=n)
    yield "stdd", dict(sb, threshold=0.5)
    yield "stdd_history", dict(base, stdd_history=h)
    yield "stdd_count", dict(base, stdd_count=n)
    yield "stdd_history", dict(sb, stdd_history=None)
    yield "stdd_count", dict(sb, stdd_count=None)
    yield "stdd_history", dict(sb, stdd_history=h.float())
    yield "stdd_history", dict(sb, stdd_history=h[:, :, :2].contiguous())
    yield "stdd_history", dict(sb, stdd_history=h.transpose(0, 1).contiguous().transpose(0, 1))
    yield "stdd_count", dict(sb, stdd_count=n.int())
    yield "stdd_count", dict(sb, stdd_count=n[:, :-1].contiguous())


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("arg,kwargs", list(_bad_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(arg, kwargs, backend):
    """A ValueError whose message starts with the argument's name, before anything is written."""
    if backend not in evofast.ops.backends():
        pytest.skip(f"{backend} not usable here")
    kwargs = dict(kwargs, x=kwargs["x"].clone())
    x_before = kwargs["x"].clone()
    kwargs.setdefault("backend", backend)
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        evo_step(**kwargs)
    assert torch.equal(kwargs["x"], x_before)


# ---------------------------------------------------------------------------
# torch.library integration.

@pytest.mark.parametrize("name", ["torch", "cpp"])
def test_opcheck(name):
    if name not in evofast.ops.backends():
        pytest.skip(f"{name} not built")
    c = make_case(B=2, V=64, seed=3)
    B = c.x.shape[0]
    args = (c.logits, c.x.clone(), c.conf.clone(), c.num_transfer, c.block_start, c.block_end, c.prompt_len,
            None, None, c.row0, c.mask_id, 3, 0.7, 0.0, False, None, True, 0, name)
    del B
    torch.library.opcheck(torch.ops.evofast.evo_step.default, args)


def test_torch_compile():
    c = make_case(B=2, V=300, seed=6)

    def step(logits, x, conf):
        ids, w, t = evo_step(logits, x, conf, c.num_transfer, **c.kwargs())
        return ids, w * 2, t

    x1, c1 = c.state()
    x2, c2 = c.state()
    ref = step(c.logits, x1, c1)
    got = torch.compile(step, backend="aot_eager")(c.logits, x2, c2)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1]) and torch.equal(x1, x2)

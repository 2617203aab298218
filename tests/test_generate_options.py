"""`evofast.generate` with the per-step options: remasking "topk_margin" / "entropy", the top_k /
top_p sampling filters, and the STDD transfer policy (`policy=`).

A sharp tiny model (its head scaled up, as in test_generate_sharp) gives confidences spread over
[0, 1], so that thresholds decode some positions and not others. Greedy decoding is token for
token the same on every backend; sampling is the same only where every backend runs the torch
reference step (top_p).
"""
from __future__ import annotations

import pytest
import torch

from evofast.decode import Schedule, Stdd, Threshold
from evofast.generation import generate
from evofast.models import llada
from evofast.ops import STDD

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KW = dict(gen_length=16, block_length=8, steps=8)


@pytest.fixture(scope="module")
def model():
    m = llada.tiny(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, seed=3)
    with torch.no_grad():
        m.model.transformer.ff_out.weight.mul_(6)
    return m


@pytest.fixture(scope="module")
def prompts():
    return torch.randint(0, 900, (2, 6), generator=torch.Generator().manual_seed(0))


def _fused(name):
    from conftest import skip_unless_usable
    skip_unless_usable(name)
    return name


CASES = [
    ("topk_margin", None),
    ("entropy", None),
    ("low_confidence", STDD(tau=0.3)),
    ("topk_margin", STDD(tau=0.2, lam_t=2.0, lam_s=0.5, window=4, radius=2)),
    ("entropy", STDD(tau=-0.5, lam_t=1.0, lam_s=1.0, tau_min=-10.0, tau_max=0.0)),
]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("remasking,policy", CASES, ids=lambda v: getattr(v, "__class__", type(v)).__name__
                         if v is not None and not isinstance(v, str) else str(v))
def test_greedy_options_same_tokens_on_every_backend(model, prompts, backend, remasking, policy):
    if backend == "triton" and policy not in (None, CASES[2][1]):
        pytest.skip("the interpreter is slow: one STDD case is enough")
    _fused(backend)
    kw = dict(KW, remasking=remasking, policy=policy)
    ref = generate(model, prompts, backend="torch", **kw)
    assert torch.equal(generate(model, prompts, backend=backend, **kw), ref)
    assert not bool((ref == model.config.mask_token_id).any())


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("tau", [0.0, 0.3, 0.8, 1.0])
def test_threshold_is_stdd_without_lambdas(model, prompts, backend, tau):
    stats_t, stats_s = {}, {}
    a = generate(model, prompts, backend=backend, threshold=tau, stats=stats_t, **KW)
    b = generate(model, prompts, backend=backend, policy=STDD(tau=tau, lam_t=0, lam_s=0), stats=stats_s, **KW)
    assert torch.equal(a, b)
    assert stats_t == stats_s


def test_stdd_rows_equal_batch1_runs(model, prompts):
    """Each row keeps its own history (rows finish their blocks at different forwards)."""
    policy = STDD(tau=0.3, lam_t=2.0)
    stats = {}
    out = generate(model, prompts, backend="cpp", policy=policy, stats=stats, **KW)
    assert len(set(stats["row_forwards"])) > 1                 # rows drop out at different forwards
    for r in range(prompts.shape[0]):
        assert torch.equal(generate(model, prompts[r:r + 1], backend="cpp", policy=policy, **KW), out[r:r + 1])


def test_stdd_lambdas_change_the_decoding(model, prompts):
    plain = generate(model, prompts, backend="cpp", threshold=0.3, **KW)
    stdd = generate(model, prompts, backend="cpp", policy=STDD(tau=0.3), **KW)
    assert not torch.equal(plain, stdd)


def test_policy_objects(model, prompts):
    """Policy objects give what the arguments give, and are not changed by a call."""
    sched = Schedule()
    assert torch.equal(generate(model, prompts, policy=sched, **KW), generate(model, prompts, **KW))
    assert torch.equal(generate(model, prompts, policy=Threshold(0.3), **KW),
                       generate(model, prompts, threshold=0.3, **KW))
    pol = Stdd(STDD(tau=0.3))
    a = generate(model, prompts, policy=pol, **KW)
    assert torch.equal(generate(model, prompts, policy=pol, **KW), a)    # no history carried over
    assert torch.equal(generate(model, prompts, policy=STDD(tau=0.3), **KW), a)
    assert not hasattr(pol, "history") and not hasattr(sched, "schedule")


def test_top_p_sampling_same_on_torch_and_cpp(model, prompts):
    """top_p runs the torch reference step on every backend: the same draws from the same seed."""
    kw = dict(KW, temperature=0.8, top_p=0.9, top_k=20)
    a = generate(model, prompts, backend="torch", generator=torch.Generator().manual_seed(0), **kw)
    b = generate(model, prompts, backend="cpp", generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a, b)


def test_filters_reach_every_step(model, prompts, monkeypatch):
    from evofast.decode import loop

    seen = []
    real = loop._evo_step
    monkeypatch.setattr(loop, "_evo_step", lambda *a, **k: seen.append((k["top_k"], k["top_p"])) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    out = generate(model, prompts, temperature=0.7, top_k=3, generator=g, **KW)
    assert seen and set(seen) == {(3, None)}
    assert not torch.equal(out, generate(model, prompts, temperature=0.7, generator=torch.Generator().manual_seed(0),
                                         **KW))
    # at temperature 0 the filters change nothing
    assert torch.equal(generate(model, prompts, top_k=1, top_p=0.1, **KW), generate(model, prompts, **KW))


BAD = [
    (dict(remasking="margin"), "remasking"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p="0.9"), "top_p"),
    (dict(policy="stdd"), "policy"),
    (dict(policy=STDD(), threshold=0.5), "threshold"),
    (dict(policy=Schedule(), threshold=0.5), "threshold"),
    (dict(policy=Threshold(1.5)), "policy"),
    (dict(remasking="entropy", threshold=0.5), "threshold"),
    (dict(remasking="entropy", policy=STDD()), "policy"),
    (dict(threshold=-0.1), "threshold"),
]


@pytest.mark.parametrize("kw,what", BAD, ids=[w + "-" + "-".join(map(str, k.values())) for k, w in BAD])
def test_bad_arguments_raise_before_any_forward(model, prompts, kw, what):
    calls = []
    handle = model.model.transformer.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=rf"^{what}:"):
            generate(model, prompts, **{**KW, **kw})
    finally:
        handle.remove()
    assert not calls


def test_stdd_policy_needs_stdd_parameters():
    with pytest.raises(ValueError, match="^policy:"):
        Stdd(dict(tau=0.5))


@pytest.mark.parametrize("extra", [dict(mode="hard"), dict(cache="dual"), dict(cache="prefix", cache_refresh=2)],
                         ids=["hard", "dual", "prefix"])
def test_stdd_with_hard_mode_and_caches(model, prompts, extra):
    """The history follows the step's window (row0, the rows a cached forward runs)."""
    kw = dict(KW, policy=STDD(tau=0.3), **extra)
    ref = generate(model, prompts, backend="torch", **kw)
    assert torch.equal(generate(model, prompts, backend="cpp", **kw), ref)
    assert not bool((ref == model.config.mask_token_id).any())

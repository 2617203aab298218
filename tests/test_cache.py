"""The blockwise KV cache: `evofast.cache.BlockKVCache`, `Adapter.forward_cached`, `generate(cache=...)`.

What "exact" means for a cache in a bidirectional model: a cached entry is exact
for the inputs it was computed from. Once the window's inputs change, the keys of
the other rows in deeper layers are stale (they attended to the old window), which
is the approximation prefix / dual caching makes. So the checks are:

* the buffers: write / replace / read, no per-step allocation, exact size;
* per adapter: a window forward over the inputs of the refresh that filled the
  cache gives the uncached logits of those rows (fp32 rounding);
* generate: `cache_refresh=1` (every forward recomputes all) equals `cache=None`;
  with one block and a one-layer model (the prompt's keys then depend on the prompt
  alone) `cache="prefix"` equals `cache=None`; dual forwards run the block rows only;
* clear errors before any forward; `compile=True` falls back to eager cleanly.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from evofast.cache import BlockKVCache  # noqa: E402
from evofast.generation import generate  # noqa: E402
from evofast.models import llada  # noqa: E402
from evofast.models.registry import get_adapter, patch, unpatch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import test_adapters as A  # noqa: E402  (the tiny models of every adapter)

ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- the buffers
def test_write_replace_read_in_place():
    g = torch.Generator().manual_seed(0)
    c = BlockKVCache(2, 3, 4, 10, 8, dtype=torch.float32)
    assert c.nbytes == BlockKVCache.size_of(2, 3, 4, 10, 8, torch.float32) == 2 * 2 * 3 * 4 * 10 * 8 * 4
    ptrs = [t.data_ptr() for t in c.keys + c.values]
    k, v = torch.randn(3, 4, 10, 8, generator=g), torch.randn(3, 4, 10, 8, generator=g)
    K, V = c.write(1, 0, k, v)
    assert torch.equal(K, k) and torch.equal(V, v)
    k2, v2 = torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 4, 3, 8, generator=g)
    K, V = c.write(1, 5, k2, v2)                              # replace positions 5..7 of slots 0, 1
    assert K.shape == (2, 4, 10, 8)
    want = k[:2].clone()
    want[:, :, 5:8] = k2
    assert torch.equal(K, want) and torch.equal(c.read(1, rows=2)[0], want)
    assert torch.equal(c.keys[1][2], k[2])                    # slot 2 untouched
    assert torch.equal(c.read(1, 5, 8, rows=2)[1], v2)
    assert not c.keys[0].any()                                # layer 0 untouched
    assert [t.data_ptr() for t in c.keys + c.values] == ptrs  # written in place
    c.mark(0, 10, 0)
    c.mark(5, 8, 3)
    assert c.valid() and c.source.tolist() == [0] * 5 + [3] * 3 + [0] * 2
    c.reset()
    assert not c.valid(0, 1)
    half = BlockKVCache(1, 1, 2, 4, 8, dtype=torch.bfloat16)
    half.write(0, 1, torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8))  # cast to the cache dtype
    assert half.keys[0].dtype == torch.bfloat16 and half.nbytes == 2 * 2 * 4 * 8 * 2


@pytest.mark.parametrize("call,what", [
    (lambda c: c.write(0, 8, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)), "window"),
    (lambda c: c.write(2, 0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)), "layer"),
    (lambda c: c.write(0, 0, torch.zeros(3, 2, 3, 4), torch.zeros(3, 2, 3, 4)), "rows"),
    (lambda c: c.write(0, 0, torch.zeros(1, 3, 3, 4), torch.zeros(1, 3, 3, 4)), "k, v"),
    (lambda c: c.write(0, 0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 2, 4)), "k, v"),
])
def test_write_errors(call, what):
    c = BlockKVCache(2, 2, 2, 10, 4)
    with pytest.raises((ValueError, IndexError), match=what):
        call(c)


def test_constructor_errors():
    with pytest.raises(ValueError, match="length"):
        BlockKVCache(1, 1, 1, 0, 4)
    with pytest.raises(ValueError, match="dtype"):
        BlockKVCache(1, 1, 1, 4, 4, dtype=torch.long)


# --------------------------------------------------------------------------- per adapter
CACHED = [n for n in A.CASES if not n.startswith("modernbert")]


@pytest.fixture(params=CACHED, scope="module")
def case(request):
    build, mask_id = A.CASES[request.param]
    model = build()
    patch(model, mask_id=mask_id)
    yield request.param, model, get_adapter(model)
    unpatch(model)


@torch.no_grad()
def test_cached_forward_equals_uncached(case):
    """Refresh the whole (left-padded) sequence, then forward windows of the same inputs:
    their logits are the uncached ones; a window with other inputs is not (the cache is read)."""
    name, model, ad = case
    assert set(ad.cache_kinds) == {"prefix", "dual"}
    B, L = 3, 14
    ids = A._ids((B, L))
    am = torch.ones(B, L, dtype=torch.long)
    am[1, :3] = 0
    am[2, :1] = 0
    emb = ad.input_embeddings()(ids)
    full = ad.forward(inputs_embeds=emb, attention_mask=am)
    c = ad.new_cache(B, L)
    assert c.nbytes == BlockKVCache.size_of(*_layout(ad, B, L), emb.dtype)
    torch.testing.assert_close(ad.forward_cached(cache=c, start=0, inputs_embeds=emb, attention_mask=am), full,
                               atol=ATOL, rtol=0)
    for start, stop, lo, hi in ((6, 14, 6, 14), (5, 11, 6, 10), (9, 10, 10, 10), (2, 14, 13, 14)):
        lo = max(lo, start + ad.cache_lead)                   # Dream's row i reads row i - 1: it must be run
        hi = max(lo, hi)
        got = ad.forward_cached(cache=c, start=start, inputs_embeds=emb[:, start:stop], attention_mask=am,
                                logits_from=lo, logits_to=hi)
        torch.testing.assert_close(got, full[:, lo:hi], atol=ATOL, rtol=0, msg=f"{name} window [{start}, {stop})")
    # fewer rows than slots: the first two, with input_ids and explicit positions
    pos = (am.cumsum(1) - 1).clamp_min(0)
    got = ad.forward_cached(cache=c, start=4, input_ids=ids[:2, 4:], attention_mask=am[:2], position_ids=pos[:2],
                            logits_from=5)
    torch.testing.assert_close(got, full[:2, 5:], atol=ATOL, rtol=0)
    for t in c.values:                                        # the rows outside the window come from the cache
        t[:, :, :7] = 0
    lo = 7 + ad.cache_lead
    other = ad.forward_cached(cache=c, start=7, inputs_embeds=emb[:, 7:], attention_mask=am, logits_from=lo)
    assert (other - full[:, lo:]).abs().max() > 1e-4


def _layout(ad, B, L):
    layers, heads, hd = ad.cache_layout()
    return layers, B, heads, L, hd


@torch.no_grad()
def test_forward_cached_errors(case):
    name, model, ad = case
    c = ad.new_cache(2, 10)
    ids = A._ids((2, 4))
    with pytest.raises(ValueError, match="cache"):
        ad.forward_cached(cache=None, start=0, input_ids=ids)
    with pytest.raises(ValueError, match="start"):
        ad.forward_cached(cache=c, start=8, input_ids=ids)
    with pytest.raises(ValueError, match="rows"):
        ad.forward_cached(cache=c, start=0, input_ids=A._ids((3, 4)))
    with pytest.raises(ValueError, match="attention_mask"):
        ad.forward_cached(cache=c, start=0, input_ids=ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="logits_from"):
        ad.forward_cached(cache=c, start=2, input_ids=ids, logits_from=1)
    if ad.cache_lead:                                         # Dream: row i reads row i - 1
        with pytest.raises(ValueError, match="one row earlier"):
            ad.forward_cached(cache=c, start=2, input_ids=ids)
    if ad.max_length is not None:                             # a cache longer than the model's positions
        long = BlockKVCache(*_layout(ad, 1, ad.max_length + 1), dtype=c.dtype)
        with pytest.raises(ValueError, match="exceeds the model's maximum"):
            ad.forward_cached(cache=long, start=ad.max_length - 3, input_ids=ids[:1])


GEN = dict(gen_length=12, block_length=4, steps=6)


@pytest.mark.parametrize("mode", ["evotoken", "hard"])
@pytest.mark.parametrize("kind", ["prefix", "dual"])
def test_refresh_every_forward_equals_no_cache(case, mode, kind):
    """cache_refresh=1: every forward runs the whole sequence through the cache path, so the
    tokens are cache=None's (padded batch, threshold: rows move on at their own pace)."""
    name, model, ad = case
    M = ad.mask_id
    ids = A._ids((2, 5))
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kw = dict(GEN, mode=mode, threshold=0.02)
    want = generate(model, ids, am, **kw)
    got = generate(model, ids, am, cache=kind, cache_refresh=1, **kw)
    assert torch.equal(got, want)
    assert bool((got[:, 5:] != M).all())
    # and a plain cached run completes with every token decoded
    out = generate(model, ids, am, cache=kind, **kw)
    assert out.shape == want.shape and bool((out[:, 5:] != M).all()) and torch.equal(out[:, :5], ids)


# --------------------------------------------------------------------------- generate with evofast's LLaDA
@pytest.mark.parametrize("mode", ["evotoken", "hard"])
def test_prefix_with_one_block_equals_no_cache(mode):
    """One block: the prefix is the prompt. With one layer its keys and values depend on the
    prompt alone, so the prefix cache is exact (with more layers they attend to the changing
    generation: the approximation every prefix cache of a bidirectional model makes)."""
    m = llada.tiny(vocab_size=300, d_model=32, n_layers=1, n_heads=4, seed=3)
    ids = torch.randint(0, 290, (3, 7), generator=torch.Generator().manual_seed(3))
    am = torch.ones(3, 7, dtype=torch.long)
    am[1, :2] = 0
    am[2, :5] = 0
    kw = dict(gen_length=16, block_length=16, steps=8, mode=mode)
    assert torch.equal(generate(m, ids, am, cache="prefix", **kw), generate(m, ids, am, **kw))


def test_windows_a_cached_generation_runs():
    """Which rows each forward runs: a refresh of all L rows at each block's first step, then
    [block start, L) (prefix) or the block (dual)."""
    m = llada.tiny(vocab_size=300, d_model=32, n_layers=2, n_heads=4, seed=1)
    rows = []
    h = m.model.transformer.blocks[0].register_forward_pre_hook(lambda mod, a: rows.append(a[0].shape[1]))
    ids = torch.randint(0, 290, (2, 4), generator=torch.Generator().manual_seed(0))
    try:
        for kind, later in (("prefix", lambda b: 16 - (4 + 4 * b)), ("dual", lambda b: 4)):
            rows.clear()
            generate(m, ids, gen_length=12, block_length=4, steps=6, cache=kind)
            assert rows == [r for b in range(3) for r in (16, later(b))], (kind, rows)
            rows.clear()
            generate(m, ids, gen_length=12, block_length=4, steps=6, cache=kind, cache_refresh=2, mode="hard")
            assert rows == [16, later(0), 16, later(1), 16, later(2)]
    finally:
        h.remove()


def test_cache_errors_before_any_forward():
    T = pytest.importorskip("transformers")
    mb = A.CASES["modernbert-sdpa"][0]()
    patch(mb, mask_id=A.MASK)
    calls = []
    mb.register_forward_pre_hook(lambda *a: calls.append(1))
    mb.model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="cache='dual' is not available .*ModernBertForMaskedLM.*no KV cache"):
        generate(mb, A._ids((1, 3)), cache="dual", **GEN)
    assert not calls and isinstance(mb, T.ModernBertForMaskedLM)
    m = llada.tiny(vocab_size=300, d_model=16, n_layers=1, n_heads=2, seed=0)
    with pytest.raises(ValueError, match="cache_refresh"):
        generate(m, torch.tensor([[1, 2]]), cache="prefix", cache_refresh=-1, **GEN)


def test_compile_gives_the_eager_tokens():
    """compile=True through torch.compile for real (inductor on the CPU; skipped where it
    cannot compile): the dual cache's static-shape block forward gives the eager tokens."""
    import warnings
    m = llada.tiny(vocab_size=300, d_model=32, n_layers=2, n_heads=4, seed=1)
    ids = torch.randint(0, 290, (1, 4), generator=torch.Generator().manual_seed(0))
    want = generate(m, ids, cache="dual", **GEN)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always", RuntimeWarning)
        got = generate(m, ids, cache="dual", compile=True, **GEN)
    fell_back = [w for w in rec if issubclass(w.category, RuntimeWarning) and "compile" in str(w.message)]
    if fell_back:
        pytest.skip(f"torch.compile is unavailable here: {fell_back[0].message}")
    assert torch.equal(got, want)


def test_compile_falls_back_to_eager(monkeypatch):
    """Where torch.compile fails (here made to), generate warns once and runs eagerly: same tokens."""
    m = llada.tiny(vocab_size=300, d_model=32, n_layers=2, n_heads=4, seed=1)
    ids = torch.randint(0, 290, (1, 4), generator=torch.Generator().manual_seed(0))
    want = generate(m, ids, cache="dual", **GEN)

    def broken(fn, **kw):
        def run(**a):
            raise RuntimeError("no compiler here")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="compile") as rec:
        got = generate(m, ids, cache="dual", compile=True, **GEN)
    assert torch.equal(got, want) and len(rec) == 1

    def unavailable(fn, **kw):
        raise RuntimeError("torch.compile is not supported on this platform")
    monkeypatch.setattr(torch, "compile", unavailable)
    with pytest.warns(RuntimeWarning, match="eagerly"):
        assert torch.equal(generate(m, ids, cache="dual", compile=True, **GEN), want)

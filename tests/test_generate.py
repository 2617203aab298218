"""evofast.generate against the spec: the authors' batch-1 loops, token for token.

`spec_generate` (`evofast.baselines.authors_generate`) is the authors' `generate_soft_token` (mode "evotoken") and
`generate` (mode "hard") loops, batch 1, no cache, greedy: every forward over
the whole sequence, the per-step post-processing of `evofast.baselines.authors_step`
over all rows in float64, and the model's soft input computed by the spec formula
(`reference.soft_embed_spec`, the authors' model code). evofast's batched,
windowed, fused loop must give each row exactly what this gives for that row's
unpadded prompt. Models are evofast's LLaDA architecture with random fp32 weights.
"""
from __future__ import annotations

import itertools
import random

import pytest
import torch

pytest.importorskip("transformers")

from evofast.baselines import authors_generate  # noqa: E402
from evofast.generation import generate  # noqa: E402
from evofast.models import llada  # noqa: E402
from evofast.trace import DECODED, MASK, SOFT, SOFT_MASK, Trace, to_html  # noqa: E402


# --------------------------------------------------------------------------- the spec loop
spec_generate = authors_generate   # the authors' batch-1 loops, restated in evofast.baselines


# --------------------------------------------------------------------------- models and prompts
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return llada.tiny(vocab_size=300, d_model=32, n_layers=2, n_heads=4, seed=1)


@pytest.fixture(scope="module")
def big_vocab_model():
    return llada.tiny(vocab_size=llada.LLADA_VOCAB_SIZE, d_model=32, n_layers=2, n_heads=4, seed=2)


def mask_of(model):
    return int(model.config.mask_token_id)


def make_prompts(lengths, M, seed, pad_id, masks_at=()):
    """Left-padded (B, P) prompts of the given real lengths, their attention mask, and the unpadded rows.
    masks_at: (row, index within the real prompt) pairs set to the mask token (infilling)."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.full((len(lengths), P), pad_id, dtype=torch.long)
    am = torch.zeros(len(lengths), P, dtype=torch.long)
    rows = []
    for r, n in enumerate(lengths):
        row = torch.randint(0, M, (n,), generator=g)
        for rr, i in masks_at:
            if rr == r:
                row[i] = M
        ids[r, P - n:] = row
        am[r, P - n:] = 1
        rows.append(row[None])
    return ids, am, rows


# The grid: prompt lengths (one per batch row, left-padded together) x (gen, block, steps) x threshold,
# each case with a (k_soft, alpha) pair drawn (seeded) from their grid; the hard loop over the same
# prompts and schedules; then cases for corners (k_soft 16, the torch backend, mask tokens in the prompt).
LENGTHS = ([5], [1, 5, 9], [7, 2, 12])
SCHEDULES = ((16, 4, 8), (16, 8, 4), (12, 4, 12), (16, 16, 5), (24, 8, 6), (8, 8, 8), (12, 6, 2))
THRESHOLDS = (None, 0.03, 0.045, 0.0, 1.0)
K_ALPHA = [(k, a) for k in (1, 2, 3, 5) for a in (0.0, 0.5, 0.7, 0.95)]


def _grid():
    pick = random.Random(0)
    cases = []
    for lengths, (G, Bk, S), thr in itertools.product(LENGTHS, SCHEDULES, THRESHOLDS):
        k, a = pick.choice(K_ALPHA)
        cases.append((lengths, G, Bk, S, k, a, thr, "evotoken", {}))
    for lengths, (G, Bk, S), thr in itertools.product(LENGTHS, SCHEDULES, (None, 0.03)):
        cases.append((lengths, G, Bk, S, 3, 0.7, thr, "hard", {}))
    cases += [
        ([9, 4], 32, 8, 8, 16, 0.8, None, "evotoken", {}),
        ([3, 10], 12, 6, 6, 3, 0.7, None, "evotoken", {"backend": "torch"}),
        ([3, 10], 12, 6, 6, 3, 0.7, 0.03, "hard", {"backend": "torch"}),
        ([6, 9], 8, 4, 4, 3, 0.7, None, "evotoken", {"masks_at": [(0, 1), (1, 3), (1, 7)]}),
        ([6, 9], 12, 4, 6, 2, 0.6, 0.035, "evotoken", {"masks_at": [(0, 0), (1, 5)]}),
        ([7, 4], 8, 4, 4, 3, 0.7, None, "hard", {"masks_at": [(0, 2), (1, 1)]}),
    ]
    return cases


GRID = _grid()


def _case_id(c):
    lengths, G, Bk, S, k, a, thr, mode, extra = c
    tags = "".join(f"-{key}" for key in extra)
    return f"{mode}-P{'_'.join(map(str, lengths))}-G{G}-Bk{Bk}-S{S}-k{k}-a{a}-thr{thr}{tags}"


def check_against_spec(model, lengths, G, Bk, S, k, a, thr, mode, extra, seed=0):
    M = mask_of(model)
    extra = dict(extra)
    masks_at = extra.pop("masks_at", ())
    pad_id = M - 7
    ids, am, rows = make_prompts(lengths, M, seed, pad_id, masks_at)
    out = generate(model, ids, am, gen_length=G, block_length=Bk, steps=S, mode=mode, k_soft=k, alpha=a,
                   threshold=thr, **extra)
    assert out.shape == (len(lengths), ids.shape[1] + G) and out.dtype == torch.long
    for r, row in enumerate(rows):
        pad = ids.shape[1] - row.shape[1]
        want = spec_generate(model, row, gen_length=G, block_length=Bk, steps=S, mask_id=M, mode=mode,
                             k_soft=k, alpha=a, threshold=thr)
        got = out[r, pad:]
        diff = (got != want[0]).nonzero().flatten().tolist()
        assert not diff, f"row {r}: positions {diff} differ: evofast {got[diff].tolist()} spec {want[0, diff].tolist()}"
        assert torch.equal(out[r, :pad], ids[r, :pad]), "pads must be returned as given"
    return out


@pytest.mark.parametrize("case", GRID, ids=[_case_id(c) for c in GRID])
def test_token_identical_to_spec(model, case):
    check_against_spec(model, *case)


def test_token_identical_to_spec_llada_vocabulary(big_vocab_model):
    check_against_spec(big_vocab_model, [4, 7], 8, 4, 4, 3, 0.7, None, "evotoken", {})
    check_against_spec(big_vocab_model, [6], 8, 8, 4, 3, 0.7, 0.5, "evotoken", {}, seed=1)


# --------------------------------------------------------------------------- batch semantics
def test_batch_rows_equal_batch1_runs(model):
    M = mask_of(model)
    ids, am, rows = make_prompts([3, 9, 1], M, seed=5, pad_id=0)
    for thr, mode in ((None, "evotoken"), (0.035, "evotoken"), (None, "hard"), (0.035, "hard")):
        kw = dict(gen_length=16, block_length=4, steps=8, threshold=thr, mode=mode)
        out = generate(model, ids, am, **kw)
        for r, row in enumerate(rows):
            one = generate(model, row, **kw)
            assert torch.equal(out[r, ids.shape[1] - row.shape[1]:], one[0]), (thr, mode, r)


def test_rows_finish_blocks_at_different_steps(model):
    """With a threshold rows move through their blocks at their own pace; a finished row stays as it is."""
    M = mask_of(model)
    ids, am, rows = make_prompts([4, 11, 6], M, seed=3, pad_id=0)
    out, trace = generate(model, ids, am, gen_length=24, block_length=8, steps=6, threshold=0.03, return_trace=True)
    blocks = [rec.block for rec in trace.records[1:]]
    assert any(len({b for b in blk if b >= 0}) > 1 for blk in blocks), "rows never were in different blocks"
    done = [rec.rows for rec in trace.records[1:]]
    assert any(len(r) < 3 for r in done), "no row finished before the others"
    P = ids.shape[1]
    for rec in trace.records[1:]:
        for r in range(3):
            if r not in rec.rows:                        # a row that is done never changes again
                assert torch.equal(rec.x[r, P:], out[r, P:])
    assert torch.equal(trace.records[-1].x[:, ids.shape[1]:], out[:, ids.shape[1]:])


def test_left_padding_with_mask_token_as_pad(model):
    """Pads are never eligible, whatever their id (here the mask id itself), and come back unchanged."""
    M = mask_of(model)
    ids, am, rows = make_prompts([2, 7], M, seed=7, pad_id=M)
    out = generate(model, ids, am, gen_length=8, block_length=4, steps=4)
    assert torch.equal(out[0, :5], torch.full((5,), M))
    for r, row in enumerate(rows):
        want = spec_generate(model, row, gen_length=8, block_length=4, steps=4, mask_id=M)
        assert torch.equal(out[r, 7 - row.shape[1]:], want[0])


def test_all_ones_attention_mask_is_no_padding(model):
    M = mask_of(model)
    ids, _, _ = make_prompts([5, 5], M, seed=1, pad_id=0)
    a = generate(model, ids, torch.ones_like(ids), gen_length=8, block_length=4, steps=4)
    b = generate(model, ids, gen_length=8, block_length=4, steps=4)
    assert torch.equal(a, b)


def test_hard_and_evotoken_differ(model):
    M = mask_of(model)
    ids, _, _ = make_prompts([6, 6], M, seed=11, pad_id=0)
    soft = generate(model, ids, gen_length=16, block_length=8, steps=8, mode="evotoken")
    hard = generate(model, ids, gen_length=16, block_length=8, steps=8, mode="hard")
    assert not torch.equal(soft, hard)
    assert torch.equal(soft[:, :6], hard[:, :6])
    assert not bool((soft == M).any()) and not bool((hard == M).any())


# --------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_seeded_sampling_is_deterministic(model, remasking):
    M = mask_of(model)
    ids, am, _ = make_prompts([4, 7], M, seed=2, pad_id=0)
    kw = dict(gen_length=16, block_length=8, steps=8, temperature=0.9, remasking=remasking)
    a = generate(model, ids, am, generator=torch.Generator().manual_seed(0), **kw)
    b = generate(model, ids, am, generator=torch.Generator().manual_seed(0), **kw)
    c = generate(model, ids, am, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    greedy = generate(model, ids, am, gen_length=16, block_length=8, steps=8)
    assert not torch.equal(a, greedy)
    assert not bool((a == M).any())


# --------------------------------------------------------------------------- bad input
@pytest.fixture
def forwards(model):
    """Counts the model's forwards (a hook on the first block)."""
    calls = []
    handle = model.model.transformer.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    yield calls
    handle.remove()


GOOD = dict(gen_length=8, block_length=4, steps=4)
BAD = [
    (dict(gen_length=10, block_length=4), "gen_length"),
    (dict(steps=3), "steps"),
    (dict(gen_length=8, block_length=8, steps=9), "steps"),
    (dict(steps=0), "steps"),
    (dict(block_length=0), "block_length"),
    (dict(alpha=1.0), "alpha"),
    (dict(alpha=-0.1), "alpha"),
    (dict(k_soft=0), "k_soft"),
    (dict(k_soft=17), "k_soft"),
    (dict(mode="soft"), "mode"),
    (dict(temperature=-1.0), "temperature"),
    (dict(remasking="top"), "remasking"),
    (dict(threshold=float("nan")), "threshold"),
    (dict(gen_length=4096, block_length=4096, steps=8), "maximum length"),
    (dict(generator=0), "generator"),
    (dict(cache="kv"), "cache"),
    (dict(cache="prefix", cache_refresh=0), "cache_refresh"),
    (dict(cache_refresh=2), "cache_refresh"),
    (dict(compile="yes"), "compile"),
]


@pytest.mark.parametrize("kw,what", BAD, ids=[w + "-" + "-".join(map(str, k.values())) for k, w in BAD])
def test_bad_arguments_raise_before_any_forward(model, forwards, kw, what):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=what):
        generate(model, ids, **{**GOOD, **kw})
    assert not forwards


@pytest.mark.parametrize("ids,am,what", [
    (torch.zeros(1, 0, dtype=torch.long), None, "empty prompt"),
    (torch.zeros(0, 3, dtype=torch.long), None, "empty batch"),
    (torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 0], [1, 1]]), "left-padded"),
    (torch.tensor([[1, 2], [3, 4]]), torch.tensor([[0, 0], [1, 1]]), "empty prompt"),
    (torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 1]]), "shape"),
    (torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 2], [1, 1]]), "0 \\(pad\\) or 1"),
    (torch.tensor([[1.0, 2.0]]), None, "integer"),
    (torch.tensor([[1, 300]]), None, "token ids"),
    (torch.tensor([[[1, 2]]]), None, "shape"),
])
def test_bad_prompts_raise_before_any_forward(model, forwards, ids, am, what):
    with pytest.raises(ValueError, match=what):
        generate(model, ids, am, **GOOD)
    assert not forwards


def test_mask_id_outside_vocabulary():
    from evofast.models.registry import get_adapter
    m = llada.tiny(vocab_size=50, d_model=16, n_layers=1, n_heads=2, seed=0)
    adapter = get_adapter(m)
    adapter.mask_id = 50                                  # what a wrong config / patch(mask_id=) would give
    calls = []
    m.model.transformer.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="mask"):
        generate(m, torch.tensor([[1, 2]]), **GOOD)
    assert not calls


# --------------------------------------------------------------------------- trace and progress
def test_trace_records_every_step(model, tmp_path):
    M = mask_of(model)
    ids, am, _ = make_prompts([3, 6], M, seed=4, pad_id=0)
    out, trace = generate(model, ids, am, gen_length=16, block_length=8, steps=8, return_trace=True)
    assert isinstance(trace, Trace)
    assert torch.equal(out, generate(model, ids, am, gen_length=16, block_length=8, steps=8))
    B, P, L, k = 2, 6, 22, 3
    assert trace.num_steps == 8 == len(trace.records) - 1
    first = trace.records[0]
    assert bool((first.state[:, P:] == MASK).all()) and bool((first.state[:, :P][am.bool()] == DECODED).all())
    last = trace.records[-1]
    assert torch.equal(last.x[:, P:], out[:, P:])
    states = torch.stack([r.state for r in trace.records]).long()          # (T, B, L)
    gen = states[:, :, P:]
    assert bool((gen[1:] >= gen[:-1]).all()), "mask -> soft-mask -> soft -> decoded, never back"
    assert bool((gen[1] == SOFT_MASK).any()) and bool((states == SOFT).any())
    assert bool((gen[-1, :, :8] == DECODED).all()), "earlier blocks end up [Decode]"
    assert bool((gen[-1, :, 8:] == SOFT).all()), "the last block keeps its last soft representation"
    for rec in trace.records[1:]:
        assert rec.topk_ids.shape == (B, L, k) and rec.rep_w.shape == (B, L, k + 1)
        lo = rec.window[0]
        assert bool((rec.topk_ids[:, lo:] >= 0).all()) and bool((rec.topk_ids[:, :lo] == -1).all())
        p = rec.topk_p[:, lo:]
        assert bool((p[..., :-1] >= p[..., 1:]).all()) and bool((p.sum(-1) <= 1 + 1e-6).all())
        assert torch.allclose(rec.rep_w.sum(-1), torch.ones(B, L), atol=1e-5)
        assert bool((rec.topk_ids != M).all())
        assert int(rec.transfer.sum()) == 2 * 2            # 8 tokens a block over 4 steps, 2 rows
    # decoded positions: confidence of the step that decoded them (or a revision), in (0, 1]
    assert bool((last.conf[:, P:] > 0).all()) and bool((last.conf <= 1).all())
    page = to_html(trace, path=tmp_path / "t.html")
    assert (tmp_path / "t.html").read_text() == page
    assert page.startswith("<!DOCTYPE html>") and "trace-data" in page
    assert "http://" not in page and "https://" not in page and "src=" not in page   # self-contained


def test_trace_hard_mode_has_no_soft_states(model):
    M = mask_of(model)
    ids, _, _ = make_prompts([4], M, seed=4, pad_id=0)
    _, trace = generate(model, ids, gen_length=8, block_length=4, steps=4, mode="hard", return_trace=True)
    states = torch.stack([r.state for r in trace.records])
    assert set(states.unique().tolist()) == {MASK, DECODED}


def test_progress_bar(model, capsys):
    ids = torch.tensor([[1, 2, 3]])
    a = generate(model, ids, gen_length=8, block_length=4, steps=4, progress=True)
    err = capsys.readouterr().err
    assert "evofast generate" in err and "4/4" in err
    assert torch.equal(a, generate(model, ids, gen_length=8, block_length=4, steps=4))
    assert "evofast generate" not in capsys.readouterr().err


def test_no_autograd_state(model):
    out = generate(model, torch.tensor([[1, 2, 3]]), gen_length=4, block_length=4, steps=2)
    assert not out.requires_grad and torch.is_grad_enabled()


# --------------------------------------------------------------------------- other adapters
def _hf_model(kind, V=300):
    import transformers as T
    common = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    build = {
        "bert": lambda: T.BertForMaskedLM(T.BertConfig(max_position_embeddings=64, **common)),
        "roberta": lambda: T.RobertaForMaskedLM(T.RobertaConfig(max_position_embeddings=66, **common)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, **common)),
    }[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().eval()


@pytest.mark.parametrize("kind", ["bert", "roberta", "qwen2"])
def test_other_adapters_batch_rows_equal_batch1_runs(kind):
    """Through each adapter (pad keys masked, positions per row), a padded row gives its batch-1 result."""
    from evofast.models.registry import patch
    model = patch(_hf_model(kind), mask_id=299)
    ids, am, rows = make_prompts([3, 8, 5], 299, seed=9, pad_id=1)
    for mode, thr in (("evotoken", None), ("evotoken", 0.03), ("hard", None)):
        kw = dict(gen_length=16, block_length=8, steps=8, mode=mode, threshold=thr)
        out = generate(model, ids, am, **kw)
        assert not bool((out == 299).any())
        for r, row in enumerate(rows):
            assert torch.equal(out[r, ids.shape[1] - row.shape[1]:], generate(model, row, **kw)[0]), (mode, thr, r)


def test_trace_html_rows_and_tokenizer(model):
    from evofast.char_tokenizer import tiny_tokenizer
    M = mask_of(model)
    ids, am, _ = make_prompts([2, 5], M, seed=4, pad_id=0)
    _, trace = generate(model, ids, am, gen_length=8, block_length=4, steps=4, return_trace=True)
    one = trace.to_html(rows=[1])
    both = to_html(trace)
    assert '"row":1' in one and '"row":0' not in one and '"row":0' in both
    with pytest.raises(ValueError, match="rows"):
        to_html(trace, rows=[2])
    named = to_html(trace, tiny_tokenizer())                     # ids the tokenizer lacks fall back cleanly
    assert "trace-data" in named


# --------------------------------------------------------------------------- the benchmark with caches
def test_bench_generate_caches_json_and_plot(tmp_path, capsys):
    """`evofast bench generate` over modes x caches at the tiny shape: rows, JSON, plot; the 8B
    path's meta-device build, here on the CPU at the tiny shape."""
    import json

    from evofast.bench import generate as bench
    out, png = tmp_path / "g.json", tmp_path / "g.png"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--shape", "tiny", "--device", "cpu", "--repeat", "1", "--warmup", "1",
                           "--batch-sizes", "2", "--backends", "authors", "cpp", "--modes", "hard", "evotoken",
                           "--caches", "none", "dual", "--threads", "1", "--json", str(out),
                           "--plot", str(png)]) == 0
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    for col in ("cache", "% evo_step", "peak MiB", "cache MiB", "vs none"):
        assert col in text
    rows = [r for r in json.loads(out.read_text())["rows"] if not r.get("skipped")]
    assert {(r["mode"], r["provider"], r["cache"]) for r in rows} == {
        (m, p, c) for m in ("hard", "evotoken") for p, c in (("authors", "none"), ("evofast-cpp", "none"),
                                                              ("evofast-cpp", "dual"))}
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["forwards"] >= 16 and r["peak_mib"] is not None
        if r["provider"] == "authors":
            assert r["check"] == "reference"
        elif r["cache"] == "none":
            assert r["check"] == "ok" and r["cache_mib"] == 0 and 0 < r["evo_step_pct"] < 100
        else:
            assert r["check"].startswith("approx") and r["cache_mib"] > 0 and "vs_no_cache" in r
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = bench.build_model(bench.SHAPES["tiny"], torch.device("cpu"), torch.bfloat16, fast_init=True)
    assert next(m.parameters()).dtype == torch.bfloat16
    assert bool(torch.isfinite(m(input_ids=torch.tensor([[1, 2, 3]])).logits).all())

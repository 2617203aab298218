"""evofast.cts: the collator's distribution and errors, and cts_loss against a straightforward
eager restatement of docs/semantics.md §3 written here (loss and every LoRA gradient,
backward=False and True, gradient checkpointing), plus bad input."""
import pytest
import torch
import torch.nn.functional as F

from evofast import cts
from evofast.models import llada
from evofast.models.registry import get_adapter
from evofast.ops.reference import soft_embed_spec

# peft reads transformers' deprecated is_gradient_checkpointing; the GC test uses the old enable name
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_torch_thread")]

V, M, PAD = 300, 299, 298


def _examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, V - 2, (n,), generator=g), "prompt_length": p} for n, p in lengths]


def _collator(seed=0, **kw):
    kw = {"K": 4, "per_de_nums": (1, 2, 4), "block_sizes": (16, 64),
          "generator": torch.Generator().manual_seed(seed), **kw}
    return cts.CTSCollator(M, PAD, **kw)


# --------------------------------------------------------------------------- the collator
def test_collator_batch_follows_the_spec():
    col = _collator(seed=3)
    exs = _examples([(40, 8), (33, 12), (45, 5)])
    for _ in range(20):
        b = col(exs)
        ids, lab, st, en, nxt = b["input_ids"], b["labels"], b["block_start"], b["block_end"], b["next_positions"]
        B, N = ids.shape
        assert N in range(45, 56) and nxt.shape[:2] == (3, 4)
        K, d = nxt.shape[1], nxt.shape[2]
        assert len(set((en - st).tolist())) == 1                     # one block length per batch
        Lb = int(en[0] - st[0]) + 1
        assert Lb > K * d and Lb <= N
        for r in range(B):
            n, P = exs[r]["input_ids"].numel(), exs[r]["prompt_length"]
            assert torch.equal(lab[r, :n], exs[r]["input_ids"]) and bool((lab[r, n:] == PAD).all())
            assert int(st[r]) == (N - Lb if P >= N - Lb else int(st[r])) and int(st[r]) >= min(P, N - Lb)
            pos = torch.arange(N)
            assert bool((ids[r, pos < st[r]] == lab[r, pos < st[r]]).all())       # before the block: clean
            assert bool((ids[r, pos > en[r]] == M).all())                         # after: masked
            flat = nxt[r].reshape(-1)
            assert len(set(flat.tolist())) == K * d                               # distinct positions
            assert bool((ids[r, flat] == M).all())                                # next positions are masked
            blk = ids[r, int(st[r]):int(en[r]) + 1]
            assert int((blk == M).sum()) >= K * d


def test_collator_is_seeded_and_draws_every_option():
    a, b = _collator(seed=5), _collator(seed=5)
    exs = _examples([(60, 4), (50, 9)])
    seen_d, seen_pad = set(), set()
    for _ in range(40):
        x, y = a(exs), b(exs)
        assert all(torch.equal(x[k], y[k]) for k in x)
        seen_d.add(x["next_positions"].shape[2])
        seen_pad.add(x["input_ids"].shape[1] > 60)
    assert seen_d == {1, 2, 4} and seen_pad == {True, False}


def test_collator_drops_and_counts_unusable_examples():
    col = _collator(max_length=50)
    exs = _examples([(40, 8), (60, 8), (20, 20)]) + [{"input_ids": torch.zeros(5)}, {"prompt_length": 2}]
    b = col(exs)
    assert b["input_ids"].shape[0] == 1 and col.dropped == 4
    with pytest.raises(ValueError, match="unusable"):
        col(_examples([(20, 20)]))


def test_collator_extra_pads_stop_at_max_length():
    """The extra-pad quirk never makes a batch longer than max_length (the model's limit)."""
    col = _collator(max_length=50, extra_pad_prob=1.0)
    for _ in range(5):
        assert col(_examples([(50, 8)]))["input_ids"].shape[1] == 50
        assert col(_examples([(45, 8)]))["input_ids"].shape[1] in range(46, 51)


@pytest.mark.parametrize("kw,match", [
    ({"K": 0}, "K"), ({"per_de_nums": ()}, "per_de_nums"), ({"block_sizes": (0,)}, "block_sizes"),
    ({"max_length": 16, "per_de_nums": (4,)}, "K \\* d"), ({"generator": 3}, "generator"),
])
def test_collator_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _collator(**kw)


def test_collator_block_that_cannot_fit_is_a_clear_error():
    with pytest.raises(ValueError, match="K \\* d"):
        _collator(per_de_nums=(8,), extra_pad_prob=0.0)(_examples([(20, 3)]))
    short = _collator(per_de_nums=(1, 8), extra_pad_prob=0.0)       # d = 8 never fits: only d = 1 is drawn
    assert all(short(_examples([(20, 3)]))["next_positions"].shape[2] == 1 for _ in range(10))


def test_collator_inference_like_blocks():
    """exact_blocks + grid_starts: every block is a decoding block (length as given, on the grid
    P + j Lb, never in the prompt), K d == Lb allowed (a whole block decoded over the trajectory)."""
    col = _collator(seed=2, K=4, per_de_nums=(1, 2, 4), block_sizes=(8,), extra_pad_prob=0.0, exact_blocks=True,
                    grid_starts=True)
    exs = _examples([(14 + 16, 14)] * 3)                       # prompt width 14, two decoding blocks of 8
    starts, ds = set(), set()
    for _ in range(40):
        b = col(exs)
        st, en, nxt = b["block_start"], b["block_end"], b["next_positions"]
        assert b["input_ids"].shape[1] == 30 and bool((en - st == 7).all())
        starts |= set(st.tolist())
        ds.add(nxt.shape[2])
        for r in range(3):
            blk = b["input_ids"][r, int(st[r]):int(en[r]) + 1]
            assert int((blk == M).sum()) >= 4 * nxt.shape[2]
    assert starts == {14, 22} and ds == {1, 2}                  # d = 4 (K d = 16 > 8) is never drawn
    # unequal prompts: each row on its own grid
    b = _collator(seed=1, per_de_nums=(1,), block_sizes=(4,), extra_pad_prob=0.0, exact_blocks=True,
                  grid_starts=True)(_examples([(20, 6), (20, 9)]))
    assert (int(b["block_start"][0]) - 6) % 4 == 0 and (int(b["block_start"][1]) - 9) % 4 == 0
    # the defaults are untouched: K d >= Lb still raises Lb to K d + 1
    b = _collator(seed=0, K=4, per_de_nums=(2,), block_sizes=(8,), extra_pad_prob=0.0)(exs)
    assert int(b["block_end"][0] - b["block_start"][0]) + 1 == 9


def test_collator_inference_like_errors():
    exs = _examples([(20, 14)])                                 # 6 positions after the prompt
    with pytest.raises(ValueError, match="block_sizes"):
        _collator(block_sizes=(8,), exact_blocks=True)(exs)
    with pytest.raises(ValueError, match="per_de_nums"):
        _collator(K=4, per_de_nums=(2,), block_sizes=(4,), exact_blocks=True)(exs)
    with pytest.raises(ValueError, match="grid_starts"):
        _collator(K=4, per_de_nums=(2,), block_sizes=(4,), extra_pad_prob=0.0, grid_starts=True)(exs)
    with pytest.raises(ValueError, match="exact_blocks"):
        _collator(exact_blocks=1)


# --------------------------------------------------------------------------- the loss
def eager_spec_loss(model, batch, alphas, k_soft=3):
    """Spec 3, step by step, over full logits (the test's own restatement: no evofast op)."""
    adapter = get_adapter(model.get_base_model() if hasattr(model, "get_base_model") else model)
    E = adapter.input_embeddings().weight
    ids = batch["input_ids"].clone()
    B, N = ids.shape
    K = batch["next_positions"].shape[1]
    st, en, P = batch["block_start"], batch["block_end"], batch["prompt_lengths"]
    pos = torch.arange(N)
    labels = torch.where((pos >= st[:, None]) & (pos <= en[:, None]), batch["labels"], -100)
    conf = torch.zeros(B, N, dtype=torch.float64)
    total, soft = 0.0, None
    for k in range(K):
        logits = adapter.forward(input_ids=ids) if soft is None else \
            adapter.forward(inputs_embeds=soft_embed_spec(E, *soft))
        total = total + F.cross_entropy(logits.reshape(B * N, -1), labels.reshape(-1))   # 1., 2.
        with torch.no_grad():
            pred = logits.argmax(-1)                                                        # 3.
            ids = ids.clone()
            for r in range(B):
                ids[r, batch["next_positions"][r, k]] = pred[r, batch["next_positions"][r, k]]
            p = torch.softmax(logits.double(), -1)                                          # 4.
            q = p.max(-1).values
            frozen = torch.maximum(st, P)[:, None]
            rev = (pos >= frozen) & (ids != M) & (q > conf)
            ids[rev], conf[rev] = pred[rev], q[rev]
            tp, ti = p.topk(k_soft, -1)
            a = alphas[k][:, None]
            e = torch.where(ids == M, tp.sum(-1) / (1 - a) * a, torch.zeros_like(q))
            w = torch.cat([tp, e[..., None]], -1)
            w = w / w.sum(-1, keepdim=True)
            w[pos < frozen] = torch.tensor([0.0] * k_soft + [1.0], dtype=w.dtype)
            soft = (torch.cat([ti, ids[..., None]], -1), w.float())
    return total / K


def _lora_model(seed=0, gc=False):
    from peft import LoraConfig, get_peft_model
    model = llada.tiny(vocab_size=V, d_model=32, n_layers=2, n_heads=4, seed=seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                                  init_lora_weights=False))
    if gc:
        model.gradient_checkpointing_enable()
    return peft_model.train()


def _grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("backward,gc,chunk", [(False, False, None), (True, False, 7), (True, True, 5)])
def test_cts_loss_matches_the_eager_spec_loss_and_lora_gradients(backward, gc, chunk):
    model = _lora_model(gc=gc)
    col = _collator(seed=11)
    exs = _examples([(40, 8), (33, 12), (45, 5)], seed=2)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        batch = col(exs)
        alphas = 0.5 + 0.5 * torch.rand(4, 3, generator=g)
        ref = eager_spec_loss(model, batch, alphas)
        ref.backward()
        want = _grads(model)
        got_loss = cts.cts_loss(model, batch, alphas=alphas, backward=backward, chunk_size=chunk)
        if not backward:
            got_loss.backward()
        else:
            assert not got_loss.requires_grad
        got = _grads(model)
        torch.testing.assert_close(got_loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
        assert len(want) == 12 and want.keys() == got.keys()               # A and B of q, k, v in 2 layers
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_library_eager_baseline_equals_the_spec_restatement():
    model = _lora_model(seed=1)
    batch = _collator(seed=2)(_examples([(40, 8), (45, 5)], seed=3))
    alphas = torch.full((4, 2), 0.7)
    torch.testing.assert_close(cts.eager_cts_loss(model, batch, alphas=alphas),
                               eager_spec_loss(model, batch, alphas), rtol=1e-5, atol=1e-6)


def test_cts_loss_bad_input():
    model = llada.tiny(vocab_size=V, d_model=32, n_layers=1, n_heads=4)
    batch = _collator()(_examples([(40, 8)]))
    with pytest.raises(ValueError, match="missing keys"):
        cts.cts_loss(model, {"input_ids": batch["input_ids"]})
    with pytest.raises(ValueError, match="alphas"):
        cts.cts_loss(model, batch, alphas=torch.ones(4, 1))
    with pytest.raises(ValueError, match="alphas"):
        cts.cts_loss(model, batch, alphas=torch.ones(3, 1) * 0.5)
    with pytest.raises(ValueError, match="k_soft"):
        cts.cts_loss(model, batch, k_soft=0)
    bad = dict(batch, next_positions=batch["next_positions"] * 0)
    with pytest.raises(ValueError, match="next_positions"):
        cts.cts_loss(model, bad)
    with pytest.raises(TypeError, match="model"):
        cts.cts_loss("not a model", batch)


def test_model_whose_adapter_has_no_output_head_is_a_type_error(monkeypatch):
    """An adapter that cannot split off its LM head (the base contract's default) is refused by name."""
    from evofast.models import registry
    from evofast.models.base import Adapter
    from evofast.models.adapters.llada_native import LLaDANativeAdapter

    class NoHead(LLaDANativeAdapter):
        name = "no-head"
        output_head = Adapter.output_head

    monkeypatch.setitem(registry.MODEL_TYPES, "llada", (NoHead,))
    model = llada.tiny(vocab_size=V, d_model=32, n_layers=1, n_heads=4)
    with pytest.raises(TypeError, match="no-head adapter does not expose its output embedding: CTS training"):
        cts.cts_loss(model, _collator()(_examples([(40, 8)])))


# --------------------------------------------------------------------------- every adapter with a head
HF_CASES = ("bert", "roberta", "modernbert", "qwen2", "dream")


def _hf_model(kind):
    import test_adapters
    model = test_adapters._hf(kind, "sdpa")
    return model, (None if kind == "dream" else test_adapters.MASK)


@pytest.mark.parametrize("kind", HF_CASES)
@pytest.mark.parametrize("lora", [True, False])
def test_cts_loss_equals_the_eager_loss_on_every_adapter(kind, lora):
    """Dream / Qwen2 and the BERT-like MLMs: the fused loss (backward per step) gives the eager
    loss and its gradients, LoRA on the default attention projections or every parameter (BERT's
    and ModernBERT's tied embedding gets both the soft-embedding and the head gradient)."""
    from peft import LoraConfig, get_peft_model

    import test_adapters
    from evofast.cts.lora import default_lora_targets
    base, mask_id = _hf_model(kind)
    get_adapter(base, mask_id)
    model = base
    if lora:
        targets = default_lora_targets(base)
        assert targets == {"bert": ["query", "key", "value"], "roberta": ["query", "key", "value"],
                           "modernbert": ["Wqkv"]}.get(kind, ["q_proj", "k_proj", "v_proj"])
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    model.eval()                                                    # BERT's dropout off: both paths see one model
    M_ = get_adapter(base).mask_id
    col = cts.CTSCollator(M_, 2, K=3, per_de_nums=(1, 2), block_sizes=(12,), max_length=36, extra_pad_prob=0.0,
                          generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(5)
    exs = [{"input_ids": torch.randint(3, test_adapters.V - 1, (n,), generator=g), "prompt_length": p}
           for n, p in ((30, 6), (26, 9))]
    batch = col(exs)
    alphas = 0.5 + 0.5 * torch.rand(3, 2, generator=g)
    ref = cts.eager_cts_loss(model, batch, alphas=alphas)
    ref.backward()
    want = _grads(model)
    got = cts.cts_loss(model, batch, alphas=alphas, backward=True, chunk_size=9)
    have = _grads(model)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-6)
    assert want.keys() == have.keys() and len(want) >= (6 if lora else 10)
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bench_cts_providers_run_and_agree():
    """The benchmark's per-provider measurement (run in-process here; the command runs it in children)."""
    from evofast.bench import cts as bench_cts
    rows = {p: bench_cts.run_provider("tiny", p, "cpu", repeat=1, warmup=1, budget=None) for p in bench_cts.PROVIDERS}
    assert all(r["median_ms"] > 0 and r["peak_mib"] is not None and not r["oom"] for r in rows.values())
    assert abs(rows["eager"]["loss"] - rows["evofast"]["loss"]) < 1e-4


@pytest.mark.parametrize("K", [1, 4])
def test_bench_cts_gpu_build_runs_on_the_cpu(K):
    """The llada-8b path of the benchmark (fast random weights, bf16, gradient checkpointing,
    LoRA), at the tiny size on the CPU: both providers step and agree. One step (K = 1) agrees
    to bf16 rounding; over K = 4 a bf16 near-tie can pick a different argmax and so a different
    trajectory, so there only the loss is compared (to 1 %)."""
    import dataclasses

    from evofast.bench import cts as bench_cts
    shape = dataclasses.replace(bench_cts.SHAPES["tiny"], dtype="bf16", checkpointing=True, K=K)
    losses, grads = {}, {}
    for provider in bench_cts.PROVIDERS:
        model, batch, alphas = bench_cts.build(shape, torch.device("cpu"), fast_init=True)
        assert next(model.parameters()).dtype == torch.bfloat16
        assert model.get_base_model().is_gradient_checkpointing
        losses[provider] = float(bench_cts.step_fn(provider, model, batch, alphas)())
        grads[provider] = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    assert abs(losses["eager"] - losses["evofast"]) < 1e-2 * abs(losses["eager"])
    assert grads["eager"].keys() == grads["evofast"].keys() and grads["eager"]
    for name, g in grads["eager"].items():
        h = grads["evofast"][name]
        assert bool(torch.isfinite(h).all())
        if "lora_A" in name:                 # B = 0 at init: no gradient reaches A
            assert float(g.abs().max()) == float(h.abs().max()) == 0.0, name
        else:
            assert float(h.abs().max()) > 0, name
            if K == 1:
                assert F.cosine_similarity(g.flatten(), h.flatten(), dim=0) > 0.999, name


@pytest.mark.parametrize("which", ["native", "native-tied-scaled", "remote", "remote-real", *HF_CASES])
def test_adapter_hidden_states_and_output_head_give_the_forward_logits(which):
    """What cts_loss reads (hidden states + head) equals the adapter's logits, padding and all
    ("remote-real": LLaDA's own remote code, when EVOFAST_LLADA_REMOTE_DIR names it)."""
    import test_adapters   # the stand-in for LLaDA's remote code lives there

    if which == "remote-real" and not test_adapters.REMOTE_DIR:
        pytest.skip("EVOFAST_LLADA_REMOTE_DIR is not set (LLaDA's remote code)")
    mask_id = None
    if which.startswith("remote"):
        model = test_adapters._remote() if which == "remote" else test_adapters._remote_real()
    elif which in HF_CASES:
        model, mask_id = _hf_model(which)
    else:
        extra = {"weight_tying": True, "scale_logits": True} if which == "native-tied-scaled" else {}
        model = llada.tiny(vocab_size=V, d_model=32, n_layers=2, n_heads=4, **extra)
    ad = get_adapter(model, mask_id)
    ids = torch.randint(3, ad.vocab_size - 2, (2, 11))
    am = torch.ones(2, 11, dtype=torch.long)
    am[1, :3] = 0
    with torch.no_grad():
        h = ad.hidden_states(input_ids=ids, attention_mask=am)
        w, b, scale = ad.output_head()
        torch.testing.assert_close(F.linear(h, w, b) * scale, ad.forward(input_ids=ids, attention_mask=am))


def test_bench_cts_per_layer_activations_and_the_8b_table():
    """The per-layer activation figure scales with the tokens of a step, and the per-GPU table of an
    8B step is built from it (8.0 B parameters, LoRA r 128 on q / k / v: 101 M)."""
    import dataclasses

    from evofast.bench import cts as bench_cts
    small = dataclasses.replace(bench_cts.SHAPES["llada-8b-layers"], d_model=64, n_heads=4, mlp=192, seq=32,
                                lora_r=4)
    one = bench_cts.layer_activation_bytes(small)
    two = bench_cts.layer_activation_bytes(dataclasses.replace(small, batch=2 * small.batch))
    assert one > 10 * small.batch * small.seq * small.d_model * 4 and abs(two / one - 2) < 0.1
    table = bench_cts.per_gpu_needs(548 * 2**20)
    assert round(table["parameters"] / 1e9, 2) == 8.02 and round(table["lora_parameters"] / 1e6) == 101
    for row in table["rows"]:
        assert row["total_evofast, checkpointing_gb"] < row["total_evofast_gb"] < row["total_eager_gb"]

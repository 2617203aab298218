"""evofast.models.llada: LLaDA-8B layout, checkpoint loading, and the forward's semantics.

Nothing is downloaded: checkpoints are written here by hand with LLaDA's
parameter names and config keys, and compared against a plain re-statement of
LLaDA's forward (written out below from its math, explicit softmax attention).
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from evofast.models import llada  # noqa: E402
from evofast.models.llada import LLaDAConfig, LLaDAModelLM  # noqa: E402

# LLaDA-8B's config.json (Base / Instruct), every key LLaDA's checkpoints carry.
LLADA_8B_CONFIG = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        "AutoModel": "modeling_llada.LLaDAModelLM",
    },
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "d_model": 4096,
    "embedding_dropout": 0.0,
    "embedding_size": 126464,
    "eos_token_id": 126081,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mask_token_id": 126336,
    "max_sequence_length": 4096,
    "mlp_hidden_size": 12288,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 32,
    "n_kv_heads": 32,
    "n_layers": 32,
    "pad_token_id": 126081,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3",
    "use_cache": False,
    "vocab_size": 126464,
    "weight_tying": False,
}

SMALL = dict(vocab_size=300, d_model=32, n_layers=2, n_heads=4)


def llada_param_shapes(c):
    """Parameter names and shapes of a LLaDA checkpoint, written from LLaDA's layout."""
    d, hd = c["d_model"], c["d_model"] // c["n_heads"]
    kv, ff, emb = c["n_kv_heads"] * hd, c["mlp_hidden_size"], c["embedding_size"]
    shapes = {"model.transformer.wte.weight": (emb, d), "model.transformer.ln_f.weight": (d,)}
    if not c.get("weight_tying", False):
        shapes["model.transformer.ff_out.weight"] = (emb, d)
    for i in range(c["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        shapes.update({
            p + "attn_norm.weight": (d,), p + "ff_norm.weight": (d,),
            p + "q_proj.weight": (d, d), p + "k_proj.weight": (kv, d), p + "v_proj.weight": (kv, d),
            p + "attn_out.weight": (d, d),
            p + "ff_proj.weight": (ff, d), p + "up_proj.weight": (ff, d), p + "ff_out.weight": (d, ff),
        })
    return shapes


def small_llada_config(**kw):
    c = dict(LLADA_8B_CONFIG, d_model=48, n_heads=6, n_kv_heads=6, n_layers=2, mlp_hidden_size=80,
             vocab_size=250, embedding_size=256, mask_token_id=249, eos_token_id=248, pad_token_id=248,
             torch_dtype="float32")
    c.update(kw)
    return c


def random_state_dict(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in llada_param_shapes(c).items():
        if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
            sd[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[name] = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
    return sd


def write_checkpoint(path, c, sd, shards=2):
    """config.json + model-0000i-of-0000n.safetensors + index, as LLaDA's checkpoints are laid out."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(c))
    names = sorted(sd)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: sd[n].contiguous() for n in names[i::shards]}
        safetensors_torch.save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def reference_logits(sd, c, ids):
    """LLaDA's forward for unpadded rows, restated from its math: RoPE table over
    arange(L), rotate_half via view(..., 2, hd/2), explicit softmax attention."""
    B, L = ids.shape
    d, H, Hkv = c["d_model"], c["n_heads"], c["n_kv_heads"]
    hd, eps = d // H, c["rms_norm_eps"]
    dt = torch.float64
    w = {k: v.to(dt) for k, v in sd.items()}

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
    pos = torch.einsum("i , j -> i j", torch.arange(L, dtype=torch.float), inv)
    pos = torch.cat((pos, pos), dim=-1)
    sin, cos = pos.sin().to(dt), pos.cos().to(dt)

    def rope(t):
        x1, x2 = t.view(*t.shape[:-1], 2, hd // 2).unbind(dim=-2)
        return t * cos + torch.cat((-x2, x1), dim=-1) * sin

    x = w["model.transformer.wte.weight"][ids]
    for i in range(c["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = rms(x, w[p + "attn_norm.weight"])
        q = (h @ w[p + "q_proj.weight"].T).view(B, L, H, hd).transpose(1, 2)
        k = (h @ w[p + "k_proj.weight"].T).view(B, L, Hkv, hd).transpose(1, 2)
        v = (h @ w[p + "v_proj.weight"].T).view(B, L, Hkv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        x = x + att.transpose(1, 2).reshape(B, L, d) @ w[p + "attn_out.weight"].T
        h = rms(x, w[p + "ff_norm.weight"])
        x = x + (F.silu(h @ w[p + "ff_proj.weight"].T) * (h @ w[p + "up_proj.weight"].T)) @ w[p + "ff_out.weight"].T
    x = rms(x, w["model.transformer.ln_f.weight"])
    out = w["model.transformer.wte.weight"] if c["weight_tying"] else w["model.transformer.ff_out.weight"]
    return x @ out.T


def test_llada_8b_layout_on_meta(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLADA_8B_CONFIG))
    config = LLaDAConfig.from_pretrained(tmp_path)
    assert (config.d_model, config.n_layers, config.rope_theta, config.mask_token_id) == (4096, 32, 500000.0, 126336)
    assert config.hidden_size == 4096 and config.num_attention_heads == 32 and config.num_hidden_layers == 32
    assert config.tie_word_embeddings is False
    with torch.device("meta"):
        model = LLaDAModelLM(config)
    got = {n: tuple(p.shape) for n, p in model.named_parameters()}
    want = llada_param_shapes(LLADA_8B_CONFIG)
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))[:10]
    assert got == want
    assert sum(p.numel() for p in model.parameters()) == 8_015_581_184
    assert not list(model.buffers())
    # the config round-trips with LLaDA's keys
    config.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    for key, value in LLADA_8B_CONFIG.items():
        if key not in ("torch_dtype", "transformers_version", "architectures"):
            assert saved[key] == value, key


@pytest.mark.parametrize("norm", ["rms", "gemma_rms", "default"])
def test_random_weights_builds_in_the_target_dtype_with_identity_norms(norm):
    """The benchmarks' fast build (meta device, filled in place): seeded, in dtype, norms the identity."""
    cfg = LLaDAConfig(vocab_size=64, embedding_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2,
                      mlp_hidden_size=48, mask_token_id=63, layer_norm_type=norm, include_bias=norm == "default")
    a = llada.random_weights(cfg, "cpu", torch.bfloat16, seed=3)
    b = llada.random_weights(cfg, torch.device("cpu"), torch.bfloat16, seed=3)
    assert not a.training and all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in a.parameters())
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    for m in a.modules():
        if isinstance(m, llada.LLaDALayerNorm):
            x = torch.randn(3, 16, dtype=torch.bfloat16)
            ref = (F.layer_norm(x.float(), (16,)) if norm == "default"
                   else x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + m.eps))
            torch.testing.assert_close(m(x).float(), ref, atol=2e-2, rtol=2e-2)
    w = a.model.transformer.blocks[0].q_proj.weight.float()
    assert 0.015 < float(w.std()) < 0.025
    assert bool(torch.isfinite(a(input_ids=torch.tensor([[1, 2, 3]])).logits).all())


def test_tiny_defaults_and_determinism():
    m = llada.tiny()
    assert m.config.vocab_size == m.config.embedding_size == 126464
    assert m.config.mask_token_id == 126336 and not m.training
    ids = torch.randint(0, 126464, (1, 9), generator=torch.Generator().manual_seed(1))
    state = torch.random.get_rng_state()
    a, b = llada.tiny(seed=3, **SMALL), llada.tiny(seed=3, **SMALL)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    small_ids = ids % 300
    assert torch.equal(a(small_ids).logits, b(small_ids).logits)
    assert not torch.equal(a(small_ids).logits, llada.tiny(seed=4, **SMALL)(small_ids).logits)
    assert a.config.mask_token_id == 299 and a.config.eos_token_id == 298
    out = m(ids)
    assert out.logits.shape == (1, 9, 126464) and torch.isfinite(out.logits).all()
    bf = llada.tiny(dtype=torch.bfloat16, **SMALL)
    assert bf(small_ids).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("n_kv_heads", [6, 2])
def test_hand_built_checkpoint_loads_and_matches_llada_math(tmp_path, n_kv_heads):
    c = small_llada_config(n_kv_heads=n_kv_heads)
    sd = random_state_dict(c)
    write_checkpoint(tmp_path, c, sd)
    model, info = LLaDAModelLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.n_kv_heads == n_kv_heads and model.config.embedding_size == 256
    loaded = model.state_dict()
    assert set(loaded) == set(sd)
    for name, t in sd.items():
        assert torch.equal(loaded[name], t), name
    ids = torch.randint(0, 250, (2, 11), generator=torch.Generator().manual_seed(0))
    model = model.double().eval()
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 11, 256)
    torch.testing.assert_close(logits, reference_logits(sd, c, ids), rtol=1e-9, atol=1e-9)


def test_weight_tying_checkpoint(tmp_path):
    c = small_llada_config(weight_tying=True)
    sd = random_state_dict(c)
    assert "model.transformer.ff_out.weight" not in sd
    write_checkpoint(tmp_path, c, sd, shards=1)
    model, info = LLaDAModelLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.get_output_embeddings() is model.get_input_embeddings()
    ids = torch.randint(0, 250, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.double()(ids).logits
    torch.testing.assert_close(logits, reference_logits(sd, c, ids), rtol=1e-9, atol=1e-9)


def test_save_pretrained_roundtrip(tmp_path):
    model = llada.tiny(seed=5, **SMALL)
    model.save_pretrained(tmp_path)
    assert any(p.suffix == ".safetensors" for p in tmp_path.iterdir())
    again = LLaDAModelLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    llada.register()
    from transformers import AutoModel
    auto = AutoModel.from_pretrained(tmp_path)
    assert type(auto) is LLaDAModelLM


def test_inputs_embeds_equals_input_ids():
    model = llada.tiny(seed=1, **SMALL)
    ids = torch.randint(0, 300, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(input_ids=ids, output_hidden_states=True)
        b = model(inputs_embeds=model.get_input_embeddings()(ids), output_hidden_states=True)
    assert torch.equal(a.logits, b.logits)
    assert len(a.hidden_states) == model.config.n_layers + 1
    # hidden_states[-1] is the normed state the LM head reads
    torch.testing.assert_close(model.compute_logits(a.hidden_states[-1]), a.logits, rtol=0, atol=0)
    tup = model(ids, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], a.logits)
    with pytest.raises(ValueError):
        model()
    with pytest.raises(ValueError):
        model(input_ids=ids, inputs_embeds=model.get_input_embeddings()(ids))


def test_left_padding_with_positions_equals_unpadded_rows():
    torch.manual_seed(0)
    model = llada.tiny(seed=2, n_kv_heads=2, **SMALL)
    lengths, L = [5, 9, 12], 12
    rows = [torch.randint(0, 299, (n,)) for n in lengths]
    ids = torch.full((len(rows), L), 7)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = r
        mask[i, L - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, position_ids=pos).logits
        other_pad = model(torch.where(mask.bool(), ids, 123), attention_mask=mask, position_ids=pos).logits
        for i, r in enumerate(rows):
            alone = model(r[None]).logits[0]
            torch.testing.assert_close(batched[i, L - len(r):], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(other_pad[i, L - len(r):], alone, rtol=1e-5, atol=1e-5)
        # position_ids drive RoPE: reversed positions change the logits
        flipped = model(rows[2][None], position_ids=torch.arange(L - 1, -1, -1)[None]).logits[0]
        assert (flipped - model(rows[2][None]).logits[0]).abs().max() > 1e-3
        # an all-pad row stays finite
        empty = model(ids[:1], attention_mask=torch.zeros(1, L, dtype=torch.long)).logits
        assert torch.isfinite(empty).all()


def test_attention_is_bidirectional():
    model = llada.tiny(seed=3, **SMALL)
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 300
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4  # a later token moves the first position


def _grads(model, ids):
    model.zero_grad()
    out = model(ids, attention_mask=torch.ones_like(ids)).logits
    out.float().logsumexp(-1).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_backward():
    model = llada.tiny(seed=4, **SMALL).train()
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    plain = _grads(model, ids)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    blocks = list(model.model.transformer.blocks)
    assert all(b.gradient_checkpointing for b in blocks)
    calls = []
    for b in blocks:
        inner = b.forward_attention
        b.forward_attention = lambda *a, _f=inner, **k: calls.append(1) or _f(*a, **k)
    ckpt = _grads(model, ids)
    assert len(calls) == 2 * len(blocks)  # each block ran again in backward
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)


def test_unsupported_layout_raises():
    with pytest.raises(NotImplementedError, match="block_type"):
        LLaDAModelLM(LLaDAConfig(**small_llada_config(block_type="sequential")))
    with pytest.raises(ValueError, match="n_heads"):
        LLaDAModelLM(LLaDAConfig(**small_llada_config(d_model=50)))


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@torch.no_grad()
def test_kv_cache_window_equals_full_forward(dtype, atol):
    """LLaDAModel.forward with a BlockKVCache: after a full pass over the same inputs, a window
    [start, start + n) gives the full forward's hidden states of those rows (grouped-query heads,
    q/k norms, left padding with positions), and writes keys after RoPE at their absolute positions."""
    from evofast.cache import BlockKVCache

    m = llada.tiny(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, attention_layer_norm=True,
                   seed=5, dtype=dtype)
    body = m.model
    B, L = 2, 11
    ids = torch.randint(0, 97, (B, L), generator=torch.Generator().manual_seed(0))
    am = torch.ones(B, L, dtype=torch.long)
    am[1, :4] = 0
    pos = (am.cumsum(1) - 1).clamp_min(0)
    full, _ = body(input_ids=ids, attention_mask=am, position_ids=pos)
    cache = BlockKVCache(2, B, 2, L, 8, dtype=dtype)
    got, _ = body(input_ids=ids, attention_mask=am, position_ids=pos, kv_cache=cache)
    torch.testing.assert_close(got, full, atol=0, rtol=0)
    keys0 = cache.keys[0].clone()
    win, _ = body(input_ids=ids[:, 5:9], attention_mask=am, position_ids=pos, kv_cache=cache, cache_start=5)
    torch.testing.assert_close(win.float(), full[:, 5:9].float(), atol=atol, rtol=0)
    torch.testing.assert_close(cache.keys[0].float(), keys0.float(), atol=atol, rtol=0)

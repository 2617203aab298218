"""evofast.patch and the per-architecture adapters, on tiny random models.

For every adapter: (a) the soft-embedding path with one-hot weights gives the
logits of the input_ids path and of the plain model call; (b) a left-padded
row gives, on its real positions, the logits of the row run alone; (c)
attention is bidirectional; (d) patch is idempotent, unpatch restores the
instance, plain calls are unchanged; (e) unsupported models get a TypeError
naming what they lack; (f) `logits_from` slices (and skips the LM head on the
rows it drops).

LLaDA's remote code (modeling_llada.py of its checkpoints) cannot be downloaded
here and is not copied into this repository. `LLaDAModelLM` below is
a small stand-in written for these tests: it has that code's STRUCTURE (module
names, `forward(input_ids=None, inputs_embeds=None, attention_mask=None, ...)`,
an attention that builds a pad bias and then calls
`_scaled_dot_product_attention(q, k, v, attn_mask=None)`, a `RotaryEmbedding`
with `get_rotary_embedding` / `apply_rotary_pos_emb` that rotates by
arange(L)), so the adapter's rebinding is exercised; the real remote class is
untested here unless EVOFAST_LLADA_REMOTE_DIR names a directory holding LLaDA's
own `modeling_llada.py` and `configuration_llada.py` (a downloaded checkpoint
directory will do): then every test below also runs on that class
("llada-remote-real", the tiny model's weights loaded into it) and
`test_real_remote_llada_generates_the_native_models_tokens` checks it end to end.
Likewise `DreamModel` below is a Qwen2 subclass standing in for Dream's remote
class (name, model_type and layout only); EVOFAST_DREAM_REMOTE_DIR naming a copy
of Dream's `modeling_dream.py`, `configuration_dream.py` and `generation_utils.py`
adds the case "dream-remote-real" (Dream's class with the stand-in's weights).
"""
import copy
import importlib
import os
import sys
import types
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

import evofast.models as em  # noqa: E402
from evofast.models import get_adapter, llada, patch, unpatch  # noqa: E402
from evofast.models.base import MethodHook  # noqa: E402
from evofast.models.llada import LLaDAConfig  # noqa: E402
from evofast.ops import soft_embed  # noqa: E402

V = 96          # vocabulary of every tiny model
MASK = 7        # mask id passed to models whose config has none
ATOL = 1e-5     # fp32 rounding between a padded row and its unpadded run


# ---------------------------------------------------------------------------
# A stand-in with the structure of LLaDA's remote code (see the module docstring)
# ---------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE with a shared sin/cos table; `forward(q, k)` rotates by arange(L) only."""

    def __init__(self, config, cache):
        super().__init__()
        self.config = config
        self._table = cache
        self.get_rotary_embedding(config.max_sequence_length, torch.device("cpu"))

    def get_rotary_embedding(self, seq_len, device):
        sin = self._table.get("sin")
        if sin is None or sin.shape[-2] < seq_len:
            hd = self.config.d_model // self.config.n_heads
            inv = 1.0 / (self.config.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float) / hd))
            ang = torch.arange(seq_len, device=device, dtype=torch.float)[:, None] * inv
            ang = torch.cat((ang, ang), dim=-1)[None, None]
            self._table["sin"], self._table["cos"] = ang.sin(), ang.cos()
        sin, cos = self._table["sin"].to(device), self._table["cos"].to(device)
        return sin[:, :, :seq_len], cos[:, :, :seq_len]

    def rotate_half(self, x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    def apply_rotary_pos_emb(self, pos_sin, pos_cos, t):
        return (t * pos_cos + self.rotate_half(t) * pos_sin).to(t.dtype)

    def forward(self, q, k, block_end_index=None):
        q_, k_ = q.float(), k.float()
        lq, lk = q_.shape[-2], k_.shape[-2]
        sin, cos = self.get_rotary_embedding(lk, q_.device)
        q_ = self.apply_rotary_pos_emb(sin[:, :, lk - lq:lk], cos[:, :, lk - lq:lk], q_)
        k_ = self.apply_rotary_pos_emb(sin, cos, k_)
        return q_.type_as(q), k_.type_as(k)


class LLaDALlamaBlock(nn.Module):
    def __init__(self, layer_id, config, cache):
        super().__init__()
        d, hidden = config.d_model, config.effective_mlp_hidden_size
        self.config = config
        self._activation_checkpoint_fn = None
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.ff_out = nn.Linear(hidden, d, bias=False)
        self.rotary_emb = RotaryEmbedding(config, cache)

    def _scaled_dot_product_attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=False)

    def attention(self, q, k, v, attention_bias=None, layer_past=None, use_cache=False):
        B, T, C = q.shape
        nh = self.config.n_heads
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
        q, k = self.rotary_emb(q, k)
        # the remote code's quirk: attention_bias (the pad bias) is not passed on
        att = self._scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
        return self.attn_out(att.transpose(1, 2).reshape(B, T, C)), None

    def forward(self, x, attention_bias=None, layer_past=None, use_cache=False):
        h = self.attn_norm(x)
        att, cache = self.attention(self.q_proj(h), self.k_proj(h), self.v_proj(h), attention_bias)
        x = x + att
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h)), cache


RemoteOutput = namedtuple("RemoteOutput", "logits attn_key_values hidden_states")


class RemoteStyleLLaDAModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        cache = {}
        d, vocab = config.d_model, config.effective_embedding_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d), emb_drop=nn.Dropout(0.0), ln_f=RMSNorm(d, config.rms_norm_eps),
            blocks=nn.ModuleList(LLaDALlamaBlock(i, config, cache) for i in range(config.n_layers)),
            ff_out=nn.Linear(d, vocab, bias=False)))

    def forward(self, input_ids, input_embeddings=None, attention_mask=None, attention_bias=None,
                past_key_values=None, use_cache=False, last_logits_only=False, output_hidden_states=None):
        x = self.transformer.wte(input_ids) if input_embeddings is None else input_embeddings
        x = self.transformer.emb_drop(x)
        if attention_mask is not None and 0.0 in attention_mask:  # built here, dropped by the blocks
            attention_bias = (1.0 - attention_mask.float())[:, None, None, :] * torch.finfo(torch.float).min
        for block in self.transformer.blocks:
            x, _ = block(x, attention_bias=attention_bias, use_cache=use_cache)
        x = self.transformer.ln_f(x)
        return RemoteOutput(self.transformer.ff_out(x), None, None)


class LLaDAModelLM(transformers.PreTrainedModel):
    """Stand-in for LLaDA's remote-code class (same name, a module that is not evofast's)."""

    config_class = LLaDAConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = RemoteStyleLLaDAModel(config)
        self.post_init()

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, attention_bias=None,
                past_key_values=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None):
        out = self.model.forward(input_ids=input_ids, input_embeddings=inputs_embeds, attention_mask=attention_mask,
                                 attention_bias=attention_bias, past_key_values=past_key_values,
                                 use_cache=bool(use_cache), output_hidden_states=output_hidden_states)
        return transformers.modeling_outputs.CausalLMOutputWithPast(logits=out.logits)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def get_output_embeddings(self):
        return self.model.transformer.ff_out



class DreamConfig(transformers.Qwen2Config):
    model_type = "Dream"


class DreamModel(transformers.Qwen2ForCausalLM):
    """Stand-in for Dream's remote class: name, model_type, layout (Qwen2's)."""
    config_class = DreamConfig


# ---------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------
def _seeded(build, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def _native():
    return llada.tiny(vocab_size=V, d_model=32, n_layers=2, n_heads=4, seed=0)


def _remote():
    native = _native()
    config = copy.deepcopy(native.config)
    config._attn_implementation = "eager"  # the remote class declares no SDPA support to transformers
    model = _seeded(lambda: LLaDAModelLM(config))
    model.load_state_dict(native.state_dict())  # same parameter names as LLaDA's checkpoints
    return model


#: LLaDA's remote code, for the opt-in "llada-remote-real" case (see the module docstring)
REMOTE_DIR = os.environ.get("EVOFAST_LLADA_REMOTE_DIR")


def _remote_code():
    """LLaDA's `modeling_llada` imported from REMOTE_DIR as a package (its import of
    `.configuration_llada` is relative; copies that import it absolutely find it on the path)."""
    if REMOTE_DIR not in sys.path:
        sys.path.insert(0, REMOTE_DIR)
    return _import_dir("evofast_test_llada_remote_code", REMOTE_DIR, "modeling_llada")


def _remote_real():
    code = _remote_code()
    native = _native()
    keys = {k: v for k, v in native.config.to_dict().items()
            if k not in ("architectures", "model_type", "transformers_version", "auto_map")}
    config = code.LLaDAConfig(**keys)
    config._attn_implementation = "eager"
    model = _seeded(lambda: code.LLaDAModelLM(config, init_params=False))
    model.load_state_dict(native.state_dict())
    return model.eval()


#: Dream's remote code, for the opt-in "dream-remote-real" case
DREAM_DIR = os.environ.get("EVOFAST_DREAM_REMOTE_DIR")


def _import_dir(name, directory, module):
    """`module` of `directory` imported as a package named `name` (relative imports work)."""
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [directory]
        sys.modules[name] = pkg
    return importlib.import_module(f"{name}.{module}")


def _dream_real():
    # transformers 5 has no "default" entry in ROPE_INIT_FUNCTIONS, which Dream's rotary
    # embedding looks up: register plain RoPE under that name (test-side, Dream's code untouched)
    from transformers import modeling_rope_utils as rope

    def default_rope(config, device=None, seq_len=None, **kw):
        theta = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
        dim = config.hidden_size // config.num_attention_heads
        exps = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
        return 1.0 / (theta ** exps), 1.0
    rope.ROPE_INIT_FUNCTIONS.setdefault("default", default_rope)
    code = _import_dir("evofast_test_dream_remote_code", DREAM_DIR, "modeling_dream")
    conf = sys.modules["evofast_test_dream_remote_code.configuration_dream"]
    config = conf.DreamConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=64, mask_token_id=MASK, pad_token_id=None)
    model = _seeded(lambda: code.DreamModel(config))
    model.load_state_dict(_hf("dream", "sdpa").state_dict())
    return model.eval()


def _hf(kind, impl):
    T = transformers
    common = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  attn_implementation=impl)
    if kind == "bert":
        return _seeded(lambda: T.BertForMaskedLM(T.BertConfig(max_position_embeddings=40, **common)))
    if kind == "roberta":
        return _seeded(lambda: T.RobertaForMaskedLM(T.RobertaConfig(max_position_embeddings=42, **common)))
    if kind == "modernbert":
        # 3 layers: one global, two sliding-window (window 4) layers, so local masks meet left padding
        cfg = T.ModernBertConfig(max_position_embeddings=64, local_attention=4, global_attn_every_n_layers=3,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                                 **dict(common, num_hidden_layers=3))
        return _seeded(lambda: T.ModernBertForMaskedLM(cfg))
    if kind == "qwen2":
        return _seeded(lambda: T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, **common)))
    if kind == "dream":
        return _seeded(lambda: DreamModel(DreamConfig(num_key_value_heads=2, mask_token_id=MASK, **common)))
    raise KeyError(kind)


# name -> (build, mask_id for patch (None: from config))
CASES = {
    "llada-native": (_native, None),
    "llada-remote": (_remote, None),
    **{f"{k}-{impl}": ((lambda k=k, impl=impl: _hf(k, impl)), None if k == "dream" else MASK)
       for k in ("bert", "roberta", "modernbert", "qwen2", "dream") for impl in ("sdpa", "eager")},
}
if REMOTE_DIR:
    CASES["llada-remote-real"] = (_remote_real, None)
if DREAM_DIR:
    CASES["dream-remote-real"] = (_dream_real, None)


def _bidirectional_4d(ids, dtype=torch.float32):
    return torch.zeros(ids.shape[0], 1, 1, ids.shape[1], dtype=dtype)


def plain_logits(name, model, ids):
    """What the model itself gives for unpadded ids (bidirectional: Qwen2 gets an all-zero 4-D mask)."""
    with torch.no_grad():
        if name.startswith(("qwen2", "dream")):
            logits = model(input_ids=ids, attention_mask=_bidirectional_4d(ids)).logits
            if name.startswith("dream"):  # Dream's sampler realigns its next-token logits
                logits = torch.cat((logits[:, :1], logits[:, :-1]), dim=1)
            return logits
        if name.startswith("llada-remote"):
            return model(input_ids=ids, use_cache=False).logits
        return model(input_ids=ids).logits


def _ids(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V - 1, shape, generator=g)  # no pad / special ids (RoBERTa's pad is 1)


@pytest.fixture(params=list(CASES), scope="module")
def case(request):
    build, mask_id = CASES[request.param]
    model = build()
    patch(model, mask_id=mask_id)
    yield request.param, model, get_adapter(model)
    unpatch(model)


# ---------------------------------------------------------------------------
# (a) soft path with one-hot weights == input_ids path == plain model call
# ---------------------------------------------------------------------------
@torch.no_grad()
def test_one_hot_soft_embedding_equals_input_ids(case):
    name, model, ad = case
    ids = _ids((2, 9))
    E = ad.input_embeddings().weight
    k_soft = 3
    others = torch.randint(0, E.shape[0], ids.shape + (k_soft,), generator=torch.Generator().manual_seed(2))
    soft_ids = torch.cat((ids[..., None], others), dim=-1)
    w = torch.zeros(soft_ids.shape)
    w[..., 0] = 1.0
    embeds = soft_embed(E, soft_ids, w)
    assert torch.equal(embeds, E[ids])
    by_ids = ad.forward(input_ids=ids)
    by_embeds = ad.forward(inputs_embeds=embeds)
    assert by_ids.shape == (2, 9, ad.vocab_size)
    torch.testing.assert_close(by_embeds, by_ids, rtol=0, atol=1e-6)
    torch.testing.assert_close(by_ids, plain_logits(name, model, ids), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------
# (b) left padding: each row equals its unpadded run
# ---------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("path", ["input_ids", "inputs_embeds"])
def test_left_padded_rows_equal_their_unpadded_runs(case, path):
    name, model, ad = case
    lengths = (6, 11)
    L = max(lengths)
    rows = [_ids((1, n), seed=10 + n) for n in lengths]
    batch = torch.full((2, L), 0, dtype=torch.long)  # pad id 0; its value must not matter
    mask = torch.zeros(2, L, dtype=torch.long)
    for r, row in enumerate(rows):
        batch[r, L - row.shape[1]:] = row[0]
        mask[r, L - row.shape[1]:] = 1

    def run(ids, **kw):
        if path == "input_ids":
            return ad.forward(input_ids=ids, **kw)
        return ad.forward(inputs_embeds=ad.embed_tokens(ids), **kw)

    padded = run(batch, attention_mask=mask)
    for r, row in enumerate(rows):
        alone = run(row)
        torch.testing.assert_close(padded[r, L - row.shape[1]:], alone[0], rtol=0, atol=ATOL)
    # explicit position_ids give the same as positions derived from the mask
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    torch.testing.assert_close(run(batch, attention_mask=mask, position_ids=pos), padded, rtol=0, atol=0)
    # and the pad tokens' ids do not leak into real rows
    other = batch.masked_fill(mask == 0, 5)
    torch.testing.assert_close(run(other, attention_mask=mask)[mask.bool()], padded[mask.bool()], rtol=0, atol=ATOL)


def test_remote_llada_quirk_is_real_and_the_adapter_fixes_it():
    """Unpatched, the remote-style model ignores the mask (a padded row differs from its
    run alone); through the adapter it matches, and matches evofast's own LLaDA."""
    remote, native = _remote(), _native()
    ids = _ids((1, 5))
    batch = torch.cat((torch.zeros(1, 3, dtype=torch.long), ids), dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = remote(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(alone, native(input_ids=ids).logits, rtol=0, atol=1e-5)
        raw = remote(input_ids=batch, attention_mask=mask, use_cache=False).logits[:, 3:]
        assert (raw - alone).abs().max() > 1e-3
        ad_remote = get_adapter(remote)
        ad_native = get_adapter(native)
        fixed = ad_remote.forward(input_ids=batch, attention_mask=mask)
        torch.testing.assert_close(fixed[:, 3:], alone, rtol=0, atol=ATOL)
        torch.testing.assert_close(fixed, ad_native.forward(input_ids=batch, attention_mask=mask), rtol=0, atol=1e-5)
        # plain calls stay what they were (the wrappers are inert outside the adapter)
        torch.testing.assert_close(remote(input_ids=batch, attention_mask=mask, use_cache=False).logits[:, 3:], raw,
                                   rtol=0, atol=0)


@torch.no_grad()
def test_patched_remote_model_deep_copies_and_pickles():
    """The hooks live in the instances' __dict__ and point at the adapter they belong to:
    a deep copy (or a pickle round trip) gets hooks pointing at the copies."""
    import io
    model = _remote()
    ad = get_adapter(model)
    ids = torch.cat((torch.zeros(1, 2, dtype=torch.long), _ids((1, 6))), dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    want = ad.forward(input_ids=ids, attention_mask=mask, logits_from=3)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        twin_ad = get_adapter(twin)
        assert twin_ad is not ad and twin_ad.model is twin
        torch.testing.assert_close(twin_ad.forward(input_ids=ids, attention_mask=mask, logits_from=3), want,
                                   rtol=0, atol=0)
        twin.model.transformer.ln_f.weight.mul_(2.0)  # the twin's own ln_f runs, not the original's
        assert (twin_ad.forward(input_ids=ids, attention_mask=mask, logits_from=3) - want).abs().max() > 1e-3
        unpatch(twin)
        assert "forward" not in twin.model.transformer.ln_f.__dict__
    torch.testing.assert_close(ad.forward(input_ids=ids, attention_mask=mask, logits_from=3), want, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# (c) bidirectional attention
# ---------------------------------------------------------------------------
@torch.no_grad()
def test_attention_is_bidirectional(case):
    name, model, ad = case
    ids = _ids((1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1 - 3) % (V - 4) + 3
    first = ad.forward(input_ids=ids)[0, 0]
    assert (ad.forward(input_ids=changed)[0, 0] - first).abs().max() > 1e-4, "row 0 must see the last token"


@torch.no_grad()
def test_qwen2_plain_calls_stay_causal():
    model = _hf("qwen2", "sdpa")
    ids = _ids((1, 8))
    changed = ids.clone()
    changed[0, -1] = 3 if ids[0, -1] != 3 else 4
    before = model(input_ids=ids).logits
    patch(model, mask_id=MASK)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    torch.testing.assert_close(model(input_ids=changed).logits[0, :-1], before[0, :-1], rtol=0, atol=0)
    ad = get_adapter(model)
    assert (ad.forward(input_ids=changed)[0, 0] - ad.forward(input_ids=ids)[0, 0]).abs().max() > 1e-4


@torch.no_grad()
def test_dream_shift_and_flag():
    model = _hf("dream", "sdpa")
    ad = get_adapter(model)
    assert ad.mask_id == MASK and ad.shift_logits
    ids = _ids((2, 6))
    raw = model(input_ids=ids, attention_mask=_bidirectional_4d(ids)).logits
    torch.testing.assert_close(ad.forward(input_ids=ids)[:, 1:], raw[:, :-1], rtol=0, atol=1e-6)
    torch.testing.assert_close(ad.forward(input_ids=ids)[:, 0], raw[:, 0], rtol=0, atol=1e-6)
    ad.shift_logits = False
    torch.testing.assert_close(ad.forward(input_ids=ids), raw, rtol=0, atol=1e-6)
    assert not get_adapter(_hf("qwen2", "sdpa"), mask_id=MASK).shift_logits


# ---------------------------------------------------------------------------
# (d) patch is idempotent and reversible; plain outputs unchanged
# ---------------------------------------------------------------------------
def _instance_state(model):
    return {name: dict(m.__dict__) for name, m in model.named_modules()}


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_patch_idempotent_reversible_and_output_preserving(name):
    build, mask_id = CASES[name]
    model = build()
    ids = _ids((2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kwargs = {"use_cache": False} if name.startswith("llada-remote") else {}
    # Dream's own class takes no (B, L) attention mask (its sampler builds a 4-D one)
    masked_call = name != "dream-remote-real"
    before = model(input_ids=ids, **kwargs).logits
    before_masked = model(input_ids=ids, attention_mask=mask, **kwargs).logits if masked_call else None
    state = _instance_state(model)
    params = {k: v.clone() for k, v in model.state_dict().items()}

    assert patch(model, mask_id=mask_id) is model
    ad = get_adapter(model)
    assert patch(model, mask_id=mask_id) is model and get_adapter(model) is ad  # no re-wrapping
    assert patch(model) is model and get_adapter(model) is ad
    with pytest.raises(ValueError, match="already patched"):
        patch(model, mask_id=ad.mask_id + 1)
    if name.startswith("llada-remote"):  # wrapped once, not twice
        hook = model.model.transformer.blocks[0].__dict__["_scaled_dot_product_attention"]
        assert isinstance(hook, MethodHook) and hook.prev is None
    ad.forward(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(model(input_ids=ids, **kwargs).logits, before, rtol=0, atol=0)
    if masked_call:
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, **kwargs).logits, before_masked,
                                   rtol=0, atol=0)

    assert unpatch(model) is model
    assert not em.registry.is_patched(model)
    assert _instance_state(model).keys() == state.keys()
    for mod_name, d in _instance_state(model).items():
        assert d.keys() == state[mod_name].keys(), mod_name
        for k in ("forward", "_scaled_dot_product_attention"):
            assert d.get(k) is state[mod_name].get(k), (mod_name, k)
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(input_ids=ids, **kwargs).logits, before, rtol=0, atol=0)
    unpatch(model)  # a no-op now
    # and it can be patched again, with another mask id
    assert get_adapter(model, mask_id=3).mask_id == 3
    unpatch(model)


def test_dream_with_uninitialised_rope_buffers_is_refused():
    """Dream's remote code loaded under transformers 5 keeps garbage in its RoPE buffers:
    patch says so and names Dream's own fix, instead of decoding garbage."""
    model = _hf("dream", "sdpa")
    model.model.rotary_emb.inv_freq.copy_(torch.tensor([3.1e-41, 1.1e24, -2.7e-10, 0.5]))  # what such a load held
    with pytest.raises(ValueError, match=r"inv_freq.*reset_rope_parameters"):
        patch(model)
    assert not em.registry.is_patched(model)
    qwen = _hf("qwen2", "sdpa")                       # transformers' own class is not checked (nor affected)
    assert patch(qwen, mask_id=MASK) is qwen


def test_mask_id_rules():
    bert = _hf("bert", "sdpa")
    with pytest.raises(ValueError, match="mask_id="):
        patch(bert)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        patch(bert, mask_id=V)
    with pytest.raises(ValueError, match="must be an int"):
        patch(bert, mask_id=2.5)
    assert not em.registry.is_patched(bert)
    assert get_adapter(bert, mask_id=torch.tensor(103 % V)).mask_id == 103 % V
    assert get_adapter(_native()).mask_id == V - 1  # tiny's config: vocab_size - 1
    assert get_adapter(llada.tiny(vocab_size=V, d_model=32, n_layers=1, n_heads=4, mask_token_id=5)).mask_id == 5


# ---------------------------------------------------------------------------
# (e) unsupported models
# ---------------------------------------------------------------------------
class _NoInputsEmbeds(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 8)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids):
        return self.emb(input_ids)


def test_unsupported_models_raise_type_error_naming_what_is_missing():
    T = transformers
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=32))
    with pytest.raises(TypeError, match="causal-only attention"):
        patch(gpt2, mask_id=MASK)
    with pytest.raises(TypeError, match="no input embeddings"):
        patch(nn.Linear(4, 4), mask_id=0)
    with pytest.raises(TypeError, match="inputs_embeds"):
        patch(_NoInputsEmbeds(), mask_id=0)
    bert_cfg = dict(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    with pytest.raises(TypeError, match="language-model head"):
        patch(T.BertModel(T.BertConfig(**bert_cfg)), mask_id=MASK)
    with pytest.raises(TypeError, match="is_decoder"):
        patch(T.BertForMaskedLM(T.BertConfig(is_decoder=True, **bert_cfg)), mask_id=MASK)
    qcfg = dict(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64)
    with pytest.raises(TypeError, match="sliding-window"):
        patch(T.Qwen2ForCausalLM(T.Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=0,
                                                **qcfg)), mask_id=MASK)
    q = T.Qwen2ForCausalLM(T.Qwen2Config(**qcfg))
    q.config._attn_implementation = "flash_attention_2"
    with pytest.raises(TypeError, match="attn_implementation"):
        patch(q, mask_id=MASK)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        patch("not a model")
    for m in (gpt2, q):
        assert not em.registry.is_patched(m)


def test_remote_layout_problems_and_checkpointing_guard():
    model = _remote()
    blocks = model.model.transformer["blocks"]
    del model.model.transformer["blocks"]
    model.model.transformer["block_groups"] = blocks
    with pytest.raises(TypeError, match="block_group_size"):
        patch(model)
    model = _remote()
    ad = get_adapter(model)
    model.model.transformer.blocks[0]._activation_checkpoint_fn = lambda f, *a, **k: f(*a, **k)
    with pytest.raises(RuntimeError, match="activation checkpointing"):
        ad.forward(input_ids=_ids((1, 4)))
    with torch.no_grad():  # fine without a backward to recompute for
        ad.forward(input_ids=_ids((1, 4)))


# ---------------------------------------------------------------------------
# (f) logits_from
# ---------------------------------------------------------------------------
@torch.no_grad()
def test_logits_from_slices_and_skips_the_head(case):
    name, model, ad = case
    ids = _ids((2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    full = ad.forward(input_ids=ids, attention_mask=mask)
    head = model.get_output_embeddings()
    seen = []
    hook = head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[-2]))
    try:
        for start in (0, 1, 6, 9, 10):
            part = ad.forward(input_ids=ids, attention_mask=mask, logits_from=start)
            assert part.shape == (2, 10 - start, ad.vocab_size)
            torch.testing.assert_close(part, full[:, start:], rtol=0, atol=1e-6)
    finally:
        hook.remove()
    assert seen == [10, 9, 4, 1, 0]  # the LM head ran on the kept rows only


def test_forward_argument_errors():
    ad = get_adapter(_native())
    ids = _ids((2, 5))
    with pytest.raises(ValueError, match="exactly one"):
        ad.forward()
    with pytest.raises(ValueError, match="exactly one"):
        ad.forward(input_ids=ids, inputs_embeds=ad.embed_tokens(ids))
    with pytest.raises(ValueError, match="attention_mask"):
        ad.forward(input_ids=ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="position_ids"):
        ad.forward(input_ids=ids, position_ids=torch.arange(4))
    with pytest.raises(ValueError, match="logits_from"):
        ad.forward(input_ids=ids, logits_from=6)
    bert = get_adapter(_hf("bert", "sdpa"), mask_id=MASK)
    with pytest.raises(ValueError, match="maximum of 40"):
        bert.forward(input_ids=_ids((1, 41)))


@pytest.mark.parametrize("name", ["llada-remote", "dream-sdpa", "bert-eager"])
@torch.no_grad()
def test_bf16_runs_and_tracks_fp32(name):
    build, mask_id = CASES[name]
    model32 = build()
    model16 = build().to(torch.bfloat16)
    ids = _ids((2, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ref = get_adapter(model32, mask_id=mask_id).forward(input_ids=ids, attention_mask=mask)
    got = get_adapter(model16, mask_id=mask_id).forward(input_ids=ids, attention_mask=mask)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), ref, rtol=0.05, atol=0.1)


def _assert_generates_like(model, reference):
    """`model` generates `reference`'s tokens in both modes, with left padding, with and without
    caches (cache_refresh=1: every forward recomputed, so a cache must change nothing)."""
    from evofast import generate
    prompt = _ids((2, 6))
    am = torch.ones_like(prompt)
    am[1, :2] = 0
    for mode in ("evotoken", "hard"):
        want = generate(reference, prompt, attention_mask=am, gen_length=8, block_length=4, steps=4, mode=mode)
        for cache in (None, "prefix", "dual"):
            got = generate(model, prompt, attention_mask=am, gen_length=8, block_length=4, steps=4, mode=mode,
                           cache=cache, cache_refresh=1 if cache else None)
            assert torch.equal(got, want), (mode, cache)


@pytest.mark.skipif(not REMOTE_DIR, reason="EVOFAST_LLADA_REMOTE_DIR is not set (LLaDA's remote code)")
@torch.no_grad()
def test_real_remote_llada_generates_the_native_models_tokens():
    """LLaDA's own class with the tiny model's weights: the same logits as evofast's LLaDA and
    the same generated tokens."""
    native, real = _native(), _remote_real()
    ids = _ids((2, 9))
    torch.testing.assert_close(real(input_ids=ids, use_cache=False).logits, native(input_ids=ids).logits,
                               rtol=0, atol=ATOL)
    _assert_generates_like(real, native)


@pytest.mark.skipif(not DREAM_DIR, reason="EVOFAST_DREAM_REMOTE_DIR is not set (Dream's remote code)")
@torch.no_grad()
def test_real_remote_dream_generates_the_stand_ins_tokens():
    """Dream's own class with the stand-in's weights generates the stand-in's tokens."""
    _assert_generates_like(_dream_real(), _hf("dream", "sdpa"))


def test_import_of_evofast_models_is_light():
    import subprocess
    import sys
    code = "import sys, evofast, evofast.models; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

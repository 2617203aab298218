"""The LLaDA-8B architecture, written from scratch, with LLaDA's checkpoint names.

A bidirectional (non-causal) transformer: LLaDA's ``block_type="llama"`` block.
Parameter names and config keys are those of LLaDA's checkpoints, so
``LLaDAModelLM.from_pretrained(dir)`` loads a LLaDA checkpoint directory
(config.json + model*.safetensors, sharded or not) without remote code::

    model.transformer.wte                  Embedding(embedding_size, d_model)
    model.transformer.blocks.N.attn_norm   norm(d_model)
    model.transformer.blocks.N.q_proj      Linear(d_model, n_heads * head_dim)
    model.transformer.blocks.N.k_proj      Linear(d_model, n_kv_heads * head_dim)
    model.transformer.blocks.N.v_proj      Linear(d_model, n_kv_heads * head_dim)
    model.transformer.blocks.N.attn_out    Linear(d_model, d_model)
    model.transformer.blocks.N.ff_norm     norm(d_model)
    model.transformer.blocks.N.ff_proj     Linear(d_model, mlp_hidden_size)   (gate)
    model.transformer.blocks.N.up_proj     Linear(d_model, mlp_hidden_size)
    model.transformer.blocks.N.ff_out      Linear(mlp_hidden_size, d_model)
    model.transformer.ln_f                 norm(d_model)
    model.transformer.ff_out               Linear(d_model, embedding_size)     (absent when weight_tying)

with head_dim = d_model // n_heads, no biases (``include_bias`` false) and

    x0     = wte[ids]  (times sqrt(d_model) if input_emb_norm)
    h      = x + attn_out(Attn(attn_norm(x)))
    x'     = h + ff_out(silu(ff_proj(ff_norm(h))) * up_proj(ff_norm(h)))
    logits = ln_f(x_L) @ W_out^T     (W_out = ff_out, or wte when weight_tying;
                                      times 1/sqrt(d_model) if scale_logits)
    Attn   = softmax(RoPE(q) RoPE(k)^T / sqrt(head_dim) + pad) v, every query
             attending to every non-pad key of its row.

RMSNorm: ``w * (x * rsqrt(mean(x^2) + rms_norm_eps))``, normalised in float32
(float64 stays float64).
RoPE: the half-rotation form, inv_freq_j = rope_theta^(-2j / head_dim), angles
``position * inv_freq`` in float32 at the rows' explicit ``position_ids``.
Logits have ``embedding_size`` columns (LLaDA-8B: 126464 = vocab_size).

Differences from LLaDA's remote code, none of which changes the outputs for
plain unpadded input: ``attention_mask`` is honoured (LLaDA's code builds a
pad bias and then drops it), ``position_ids`` are honoured (RoPE from explicit
positions), and the KV cache is evofast's ``BlockKVCache`` (``LLaDAModel.forward``
with ``kv_cache``: the window's keys, after RoPE at their absolute positions,
replace theirs in the cache, and its queries attend to the whole cached
sequence), not LLaDA's ``past_key_values``.

Only LLaDA's ``block_type="llama"``, ``rope=True``, ``block_group_size=1``
layout is built; other values raise ``NotImplementedError`` at construction.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as hf_init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

__all__ = ["LLaDAConfig", "LLaDAModel", "LLaDAModelLM", "LLaDABlock", "tiny", "random_weights", "register",
           "LLADA_MASK_ID", "LLADA_VOCAB_SIZE"]

LLADA_VOCAB_SIZE = 126464
LLADA_MASK_ID = 126336  # <|mdm_mask|>
LLADA_EOS_ID = 126081  # <|eot_id|>, also LLaDA's pad id


class LLaDAConfig(PretrainedConfig):
    """LLaDA's config keys; the defaults are LLaDA-8B's (Base and Instruct).

    Accepts a LLaDA checkpoint's config.json as is. Keys that only concern
    LLaDA's training code (``init_device``, ``precision``, ``flash_attention``,
    ``alibi_bias_max``, ...) are kept for round-tripping and otherwise ignored.
    """

    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_sequence_length",
        "tie_word_embeddings": "weight_tying",
    }

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: Optional[int] = 32
    n_layers: int = 32
    mlp_ratio: int = 4
    mlp_hidden_size: Optional[int] = 12288
    activation_type: str = "silu"
    block_type: str = "llama"
    block_group_size: int = 1
    alibi: bool = False
    alibi_bias_max: float = 8.0
    rope: bool = True
    rope_full_precision: bool = True
    rope_theta: float = 500000.0
    flash_attention: bool = False
    attention_dropout: float = 0.0
    multi_query_attention: Optional[bool] = None
    attention_layer_norm: bool = False
    attention_layer_norm_with_affine: bool = True
    residual_dropout: float = 0.0
    embedding_dropout: float = 0.0
    input_emb_norm: bool = False
    layer_norm_type: str = "rms"
    layer_norm_with_affine: bool = True
    rms_norm_eps: float = 1e-5
    bias_for_layer_norm: Optional[bool] = False
    include_bias: bool = False
    include_qkv_bias: Optional[bool] = False
    scale_logits: bool = False
    max_sequence_length: int = 4096
    vocab_size: int = LLADA_VOCAB_SIZE
    embedding_size: Optional[int] = LLADA_VOCAB_SIZE
    weight_tying: bool = False
    eos_token_id: Optional[int] = LLADA_EOS_ID
    pad_token_id: Optional[int] = LLADA_EOS_ID
    mask_token_id: Optional[int] = LLADA_MASK_ID
    init_device: Optional[str] = None
    init_fn: str = "mitchell"
    init_std: float = 0.02
    init_cutoff_factor: Optional[float] = None
    precision: Optional[str] = None
    use_cache: bool = False

    @property
    def effective_n_kv_heads(self) -> int:
        """n_kv_heads, or n_heads when unset (1 with multi_query_attention), as LLaDA reads it."""
        if self.n_kv_heads is None:
            return 1 if self.multi_query_attention else self.n_heads
        if self.multi_query_attention is None:
            return self.n_kv_heads
        want = 1 if self.multi_query_attention else self.n_heads
        if self.n_kv_heads != want:
            raise ValueError("set either multi_query_attention or n_kv_heads, not both")
        return want

    @property
    def effective_mlp_hidden_size(self) -> int:
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @property
    def effective_embedding_size(self) -> int:
        return self.embedding_size or self.vocab_size


_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
_NORMS = ("rms", "gemma_rms", "default", "low_precision")


def _check_supported(config: LLaDAConfig) -> None:
    """Raise for the LLaDA options this implementation does not build."""
    def no(what):
        raise NotImplementedError(f"evofast.models.llada builds LLaDA's llama-block layout only: {what}")
    if str(config.block_type) != "llama":
        no(f"block_type={config.block_type!r} (needs 'llama')")
    if config.alibi or not config.rope:
        no("needs rope=True and alibi=False")
    if config.block_group_size != 1:
        no(f"block_group_size={config.block_group_size} (needs 1)")
    if str(config.activation_type) not in _ACTIVATIONS:
        no(f"activation_type={config.activation_type!r} (needs one of {sorted(_ACTIVATIONS)})")
    if str(config.layer_norm_type) not in _NORMS:
        no(f"layer_norm_type={config.layer_norm_type!r} (needs one of {_NORMS})")
    if config.d_model % config.n_heads:
        raise ValueError(f"d_model={config.d_model} is not a multiple of n_heads={config.n_heads}")
    if config.n_heads % config.effective_n_kv_heads:
        raise ValueError(f"n_heads={config.n_heads} is not a multiple of n_kv_heads={config.effective_n_kv_heads}")
    if config.effective_embedding_size < config.vocab_size:
        raise ValueError(f"embedding_size={config.embedding_size} is smaller than vocab_size={config.vocab_size}")


def _tag(module: nn.Module, role: str, d: int, layer_id: Optional[int] = None) -> nn.Module:
    """Record what LLaDA's init needs to know about a Linear / Embedding."""
    module._llada_init = (role, d, layer_id)
    return module


class LLaDALayerNorm(nn.Module):
    """LLaDA's norms: RMSNorm ("rms"), Gemma's RMSNorm with scale 1 + w ("gemma_rms"),
    or LayerNorm ("default", "low_precision"). RMS variants normalise in float32
    (float64 input: float64) and cast back to the input dtype before the affine, as LLaDA does."""

    def __init__(self, config: LLaDAConfig, size: int, affine: Optional[bool] = None):
        super().__init__()
        self.kind = str(config.layer_norm_type)
        self.eps = config.rms_norm_eps if "rms" in self.kind else 1e-5
        self.size = size
        affine = config.layer_norm_with_affine if affine is None else affine
        use_bias = config.bias_for_layer_norm
        use_bias = config.include_bias if use_bias is None else use_bias
        self.weight = nn.Parameter(torch.ones(size)) if affine else None
        self.bias = nn.Parameter(torch.zeros(size)) if affine and use_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "rms" not in self.kind:
            return F.layer_norm(x, (self.size,), self.weight, self.bias, self.eps)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        if self.weight is None:
            return x
        x = (1 + self.weight) * x if self.kind == "gemma_rms" else self.weight * x
        return x if self.bias is None else x + self.bias


class LLaDARotaryEmbedding(nn.Module):
    """RoPE angles for explicit positions. No parameters or buffers (nothing to load)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = float(theta)
        self._inv_freq = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        inv = self._inv_freq.get(device)
        if inv is None:
            exps = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim
            inv = self._inv_freq[device] = 1.0 / (self.theta ** exps)
        return inv

    def forward(self, position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B or 1, L) integer -> cos, sin float32 (B or 1, 1, L, head_dim)."""
        freqs = position_ids.to(torch.float32)[..., None] * self.inv_freq(position_ids.device)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]
        return angles.cos(), angles.sin()


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, full_precision: bool = True) -> torch.Tensor:
    """t * cos + rotate_half(t) * sin over the last dim, rotate_half(a, b) = (-b, a);
    t (B, H, L, hd), cos/sin broadcastable to it. Computed in (at least) float32 when
    full_precision, else in t's dtype."""
    tf = t.to(torch.promote_types(t.dtype, torch.float32)) if full_precision else t
    half = tf.shape[-1] // 2
    rotated = torch.cat((-tf[..., half:], tf[..., :half]), dim=-1)
    return (tf * cos.to(tf.dtype) + rotated * sin.to(tf.dtype)).to(t.dtype)


def key_padding_mask(attention_mask: Optional[torch.Tensor], batch: int, length: int) -> Optional[torch.Tensor]:
    """(B, L) with 1 = token, 0 = pad -> bool (B, 1, 1, L) for SDPA (True = may attend).

    Pad keys are hidden from every query; otherwise attention is bidirectional.
    A row without any real token attends to all its keys (meaningless but finite
    outputs, never NaN). A 4-D mask is passed through unchanged (bool: True
    attends; float: added to the scores)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        return attention_mask
    if attention_mask.shape != (batch, length):
        raise ValueError(f"attention_mask must be (B, L) = {(batch, length)}, got {tuple(attention_mask.shape)}")
    keep = attention_mask.bool()
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    return keep[:, None, None, :]


class LLaDABlock(GradientCheckpointingLayer):
    """LLaDA's llama block (``LLaDALlamaBlock`` in LLaDA's code): pre-norm
    bidirectional attention and a gated MLP, each with a residual."""

    def __init__(self, layer_id: int, config: LLaDAConfig):
        super().__init__()
        d = config.d_model
        hidden = config.effective_mlp_hidden_size
        self.layer_id = layer_id
        self.n_heads = config.n_heads
        self.n_kv_heads = config.effective_n_kv_heads
        self.head_dim = d // config.n_heads
        self.rope_full_precision = bool(config.rope_full_precision)
        self.attention_dropout = float(config.attention_dropout)
        self.residual_dropout = float(config.residual_dropout)
        self.act = _ACTIVATIONS[str(config.activation_type)]
        bias = bool(config.include_bias)
        qkv_bias = bias or bool(config.include_qkv_bias)
        kv_dim = self.n_kv_heads * self.head_dim

        self.q_norm = self.k_norm = None
        if config.attention_layer_norm:
            affine = config.attention_layer_norm_with_affine
            self.k_norm = LLaDALayerNorm(config, kv_dim, affine)
            self.q_norm = LLaDALayerNorm(config, d, affine)
        self.attn_out = _tag(nn.Linear(d, d, bias=bias), "out", d, layer_id)
        self.ff_out = _tag(nn.Linear(hidden, d, bias=bias), "residual", hidden, layer_id)
        self.attn_norm = LLaDALayerNorm(config, d)
        self.ff_norm = LLaDALayerNorm(config, d)
        self.q_proj = _tag(nn.Linear(d, d, bias=qkv_bias), "in", d)
        self.k_proj = _tag(nn.Linear(d, kv_dim, bias=qkv_bias), "in", d)
        self.v_proj = _tag(nn.Linear(d, kv_dim, bias=qkv_bias), "in", d)
        self.ff_proj = _tag(nn.Linear(d, hidden, bias=bias), "in", d)
        self.up_proj = _tag(nn.Linear(d, hidden, bias=bias), "in", d)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.residual_dropout > 0:
            return F.dropout(x, self.residual_dropout, training=True)
        return x

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: Optional[torch.Tensor] = None, kv=None) -> torch.Tensor:
        """x (B, L, d_model); cos/sin from LLaDARotaryEmbedding; attn_mask for SDPA or None;
        kv: None, or (BlockKVCache, start) when x holds the rows [start, start + L) (see attention)."""
        h = self.attn_norm(x)
        x = x + self._dropout(self.attention(self.q_proj(h), self.k_proj(h), self.v_proj(h), cos, sin, attn_mask,
                                             kv))
        h = self.ff_norm(x)
        h = self.act(self.ff_proj(h)) * self.up_proj(h)
        return x + self._dropout(self.ff_out(h))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  attn_mask: Optional[torch.Tensor] = None, kv=None) -> torch.Tensor:
        """Projections (B, L, *) -> attn_out(attention) (B, L, d_model).

        RoPE is applied to q and k at the given positions before
        ``forward_attention``. With ``kv = (cache, start)`` the rows are the
        window [start, start + L) of a longer sequence: their k, v (after RoPE)
        replace positions [start, start + L) of ``cache`` for this layer and the
        queries attend to the cache's keys of the whole sequence (attn_mask then
        covers those keys)."""
        B, L, _ = q.shape
        if self.q_norm is not None:
            dtype = k.dtype
            q, k = self.q_norm(q).to(dtype), self.k_norm(k).to(dtype)
        q = q.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin, self.rope_full_precision)
        k = apply_rotary(k, cos, sin, self.rope_full_precision)
        if kv is not None:
            k, v = kv[0].write(self.layer_id, kv[1], k, v)
        out = self.forward_attention(q, k, v, attn_mask)
        return self.attn_out(out.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))

    def forward_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Non-causal SDPA: q (B, H, Lq, hd), k/v (B, Hkv, Lk, hd) -> (B, H, Lq, hd).
        Query head i reads kv head i // (H / Hkv), as LLaDA's repeat_interleave."""
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        p = self.attention_dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=False)


class LLaDAModel(nn.Module):
    """The body: ``transformer`` holds wte, blocks, ln_f (and ff_out, the LM head,
    so that its checkpoint name is ``model.transformer.ff_out``)."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        d, vocab = config.d_model, config.effective_embedding_size
        self.transformer = nn.ModuleDict(dict(
            wte=_tag(nn.Embedding(vocab, d), "emb", d),
            emb_drop=nn.Dropout(float(config.embedding_dropout)),
            ln_f=LLaDALayerNorm(config, d),
            blocks=nn.ModuleList(LLaDABlock(i, config) for i in range(config.n_layers)),
        ))
        if not config.weight_tying:
            self.transformer["ff_out"] = _tag(nn.Linear(d, vocab, bias=bool(config.include_bias)), "final", d)
        self.rotary_emb = LLaDARotaryEmbedding(d // config.n_heads, config.rope_theta)

    def forward(self, input_ids: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                output_hidden_states: bool = False, kv_cache=None, cache_start: int = 0):
        """-> (ln_f(final hidden) (B, L, d_model), all hidden states or None).

        The tuple of hidden states is the input of every block followed by the
        final normed state (the LM head's input), as LLaDA returns them.

        With ``kv_cache`` (an ``evofast.cache.BlockKVCache``) the input holds the
        rows [cache_start, cache_start + L) of a sequence of ``kv_cache.length``
        positions, and ``attention_mask`` / ``position_ids`` cover that whole
        sequence: each block writes the window's keys and values into the cache
        and attends to all the cached keys (see ``LLaDABlock.attention``)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        if x.dim() != 3:
            raise ValueError(f"expected (B, L) input_ids or (B, L, d_model) inputs_embeds, got {tuple(x.shape)}")
        B, L = x.shape[:2]
        if self.config.input_emb_norm:
            x = x * (self.config.d_model ** 0.5)
        if self.training and self.transformer.emb_drop.p > 0:
            x = self.transformer.emb_drop(x)
        Lk, kv = L, None
        if kv_cache is not None:
            Lk, kv = kv_cache.length, (kv_cache, cache_start)
        if position_ids is None:
            position_ids = torch.arange(Lk, device=x.device)[None]
        elif position_ids.dim() == 1:
            position_ids = position_ids[None]
        if kv is not None:
            position_ids = position_ids[:, cache_start:cache_start + L]
        cos, sin = self.rotary_emb(position_ids)
        mask = key_padding_mask(attention_mask, B, Lk)
        hidden = [] if output_hidden_states else None
        for block in self.transformer.blocks:
            if hidden is not None:
                hidden.append(x)
            x = block(x, cos, sin, mask, kv)
        x = self.transformer.ln_f(x)
        if hidden is not None:
            hidden.append(x)
        return x, (tuple(hidden) if hidden is not None else None)


class LLaDAModelLM(PreTrainedModel):
    """LLaDA-8B architecture as a transformers model (``model_type="llada"``).

    ``forward(input_ids=None, inputs_embeds=None, attention_mask=None,
    position_ids=None, output_hidden_states=False, return_dict=True)`` returns
    ``.logits`` (B, L, embedding_size) and, when asked, ``.hidden_states``
    (``hidden_states[-1]`` is the normed state the LM head reads).
    ``attention_mask`` (B, L), 0 = pad: pad keys are masked out;
    ``position_ids`` (B, L) drive RoPE (default ``arange(L)`` for every row, so
    a left-padded row needs positions counted from its first real token).
    """

    config_class = LLaDAConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        _check_supported(config)
        self.model = LLaDAModel(config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """LLaDA's init for ``init_fn`` in normal / mitchell / fan_in / full_megatron /
        kaiming_normal (only random models need it: checkpoints overwrite it)."""
        if isinstance(module, LLaDALayerNorm):
            if module.weight is not None:
                hf_init.ones_(module.weight)
            if module.bias is not None:
                hf_init.zeros_(module.bias)
            return
        tag = getattr(module, "_llada_init", None)
        if tag is None:
            return
        cfg = self.config
        role, d, layer_id = tag
        w = module.weight
        fn = str(cfg.init_fn)
        factor = 0.5 * math.sqrt(cfg.d_model) if (role == "emb" and cfg.scale_logits) else 1.0
        cutoff = None
        if fn == "normal":
            std = cfg.init_std * factor
            if cfg.init_cutoff_factor is not None:
                cutoff = cfg.init_cutoff_factor * std
            if role == "residual":
                std, cutoff = std / math.sqrt(2 * cfg.n_layers), cutoff and cutoff / math.sqrt(2 * cfg.n_layers)
        elif fn in ("mitchell", "fan_in"):
            std = factor / math.sqrt(d)
            if fn == "mitchell":
                if layer_id is not None:
                    std /= math.sqrt(2 * (layer_id + 1))
                cutoff = 3 * std
        elif fn == "full_megatron":
            out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
            std = {"out": out_std, "residual": out_std, "final": cfg.d_model ** -0.5}.get(role, cfg.init_std)
            cutoff = (cfg.init_cutoff_factor if cfg.init_cutoff_factor is not None else 3) * std
        elif fn == "kaiming_normal":
            hf_init.kaiming_normal_(w, nonlinearity="relu")
            std = None
        else:
            raise NotImplementedError(f"init_fn={fn!r}")
        if std is not None:
            if cutoff is None:
                hf_init.normal_(w, mean=0.0, std=std)
            else:
                hf_init.trunc_normal_(w, mean=0.0, std=std, a=-cutoff, b=cutoff)
        if getattr(module, "bias", None) is not None:
            hf_init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Module:
        """The LM head: ``transformer.ff_out``, or ``wte`` when ``weight_tying``."""
        t = self.model.transformer
        return t.wte if self.config.weight_tying else t.ff_out

    def set_output_embeddings(self, value: nn.Module) -> None:
        if self.config.weight_tying:
            self.model.transformer.wte = value
        else:
            self.model.transformer.ff_out = value

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Normed hidden (..., d_model) -> logits (..., embedding_size)."""
        t = self.model.transformer
        logits = F.linear(hidden, t.wte.weight) if self.config.weight_tying else t.ff_out(hidden)
        if self.config.scale_logits:
            logits = logits * (1 / math.sqrt(self.config.d_model))
        return logits

    def forward(self, input_ids: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                output_hidden_states: Optional[bool] = False, return_dict: Optional[bool] = True):
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        hidden, all_hidden = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                        attention_mask=attention_mask, position_ids=position_ids,
                                        output_hidden_states=output_hidden_states)
        logits = self.compute_logits(hidden)
        if return_dict is False:
            return (logits,) + ((all_hidden,) if all_hidden is not None else ())
        return CausalLMOutputWithPast(logits=logits, hidden_states=all_hidden)


def tiny(vocab_size: int = LLADA_VOCAB_SIZE, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
         seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LLaDAModelLM:
    """A random-weight LLaDA-architecture model in eval mode, the same for the same seed.

    With the default ``vocab_size`` (126464) the token layout is LLaDA's: mask
    id 126336, eos/pad 126081. With a vocabulary too small for that layout the
    mask id is ``vocab_size - 1`` and eos/pad ``vocab_size - 2``. The MLP is
    ``3 * d_model`` wide (LLaDA-8B's ratio). ``overrides`` are any LLaDAConfig
    keys (``n_kv_heads``, ``mask_token_id``, ``init_fn``, ``weight_tying``, ...).
    The global RNG is left untouched.
    """
    llada_layout = vocab_size > LLADA_MASK_ID
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    cfg = dict(vocab_size=vocab_size, embedding_size=vocab_size, d_model=d_model, n_layers=n_layers,
               n_heads=n_heads, n_kv_heads=n_heads, mlp_hidden_size=3 * d_model,
               mask_token_id=LLADA_MASK_ID if llada_layout else vocab_size - 1,
               eos_token_id=LLADA_EOS_ID if llada_layout else max(vocab_size - 2, 0),
               pad_token_id=LLADA_EOS_ID if llada_layout else max(vocab_size - 2, 0))
    cfg.update(overrides)
    config = LLaDAConfig(**cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LLaDAModelLM(config)
    return model.to(dtype).eval()


def random_weights(config: LLaDAConfig, device, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> LLaDAModelLM:
    """A model of ``config`` with cheap random weights, built for benchmarks at full size.

    Built on the meta device (no memory, no init), allocated once on ``device``
    in ``dtype`` (an 8B model in bf16 takes 16 GB, never an fp32 copy), then
    filled from a generator on that device: normal(0, 0.02), norm weights 1.
    Seconds at LLaDA-8B size where ``tiny``'s init takes minutes. Eval mode.
    """
    device = torch.device(device)
    with torch.device("meta"):
        model = LLaDAModelLM(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    # norms start as the identity: weight 1 (gemma_rms scales by 1 + w: 0), bias 0
    identity = {id(m.weight): float(m.kind != "gemma_rms") for m in model.modules()
                if isinstance(m, LLaDALayerNorm) and m.weight is not None}
    identity.update({id(m.bias): 0.0 for m in model.modules() if isinstance(m, LLaDALayerNorm) and m.bias is not None})
    with torch.no_grad():
        for param in model.parameters():
            if id(param) in identity:
                param.fill_(identity[id(param)])
            else:
                param.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def register() -> None:
    """Map ``model_type="llada"`` to these classes in transformers' AutoConfig,
    AutoModel and AutoModelForMaskedLM, so ``AutoModel.from_pretrained(llada_dir)``
    loads LLaDA checkpoints without remote code. Idempotent. With
    ``trust_remote_code=True`` transformers still prefers the checkpoint's code."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    AutoConfig.register("llada", LLaDAConfig, exist_ok=True)
    AutoModel.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
    AutoModelForMaskedLM.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)

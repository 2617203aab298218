"""Adapter for LLaDA's remote-code class (`LLaDAModelLM` loaded with `trust_remote_code`).

LLaDA's own code (``modeling_llada.py`` of its checkpoints) runs bidirectional
attention but ignores padding and positions: its ``LLaDAModel.forward`` turns
``attention_mask`` into an attention bias that ``LLaDABlock.attention`` then
drops (it calls ``_scaled_dot_product_attention(q, k, v, attn_mask=None)``), and
``RotaryEmbedding.forward(q, k)`` always rotates by ``arange(L)``. A left-padded
row therefore attends to its pads and sees shifted positions.

`install` rebinds, on the live instance only (instance attributes that shadow
the class's methods; `remove` deletes them):

* ``block._scaled_dot_product_attention`` of every block: while an adapter
  `forward` is running, the bool key-padding mask ``(B, 1, 1, L)`` is passed as
  ``attn_mask`` to the original method (whose SDPA branch honours it);
* ``block.rotary_emb.forward``: while an adapter `forward` is running, RoPE is
  applied at the rows' ``position_ids``, gathered from the module's own sin/cos
  table (``get_rotary_embedding``) and applied with its own
  ``apply_rotary_pos_emb``, so an unpadded row gets bit-identical angles;
* ``transformer.ln_f.forward``: while an adapter `forward` is running, only rows
  ``[logits_from, L)`` are normed, so the LM head (``ff_out`` / tied ``wte``)
  runs on those rows only (the norm is per row, so nothing else changes).

Outside `Adapter.forward` every wrapper calls the original unchanged, so plain
``model(input_ids)`` gives exactly what it gave before `patch`. The adapter
calls the model with ``use_cache=False`` (needed under transformers 5) and no
``attention_mask`` (its bias would only be built and dropped).

KV cache: `forward_cached` runs the model on the window rows only (so RoPE,
gathered at the window's positions, sees equal query and key lengths) and the
``_scaled_dot_product_attention`` wrapper writes the window's keys and values
(after RoPE, before any head repetition) into the `BlockKVCache` and attends to
the whole cached sequence with the key-padding mask. LLaDA's own
``past_key_values`` is not used.

Not supported: LLaDA's KV-cache arguments (``past_key_values`` / ``replace_position``)
through the adapter, ``block_group_size > 1`` (``transformer.block_groups``),
ALiBi or learned positions, and activation checkpointing while gradients are
recorded (the recomputation in backward would run outside the adapter's mask
and positions), each refused with a TypeError / RuntimeError saying so.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor, nn

from ..base import HFAdapter, Inputs, InstancePatches, MethodHook, default_positions, keep_mask
from .llada_native import llada_default_mask_id


class _State:
    """What the wrappers read while one adapter forward is running."""

    __slots__ = ("mask", "positions", "logits_from", "tables", "logits_to", "cache", "start", "layers")

    def __init__(self, mask: Optional[Tensor], positions: Tensor, logits_from: int, logits_to: Optional[int] = None,
                 cache=None, start: int = 0, layers: Optional[dict] = None):
        self.mask = mask  # bool (B, 1, 1, L) or None (L: the whole sequence's keys)
        self.positions = positions  # int64 (B or 1, rows run)
        self.logits_from = logits_from  # relative to the rows run
        self.logits_to = logits_to
        self.tables = {}  # (dtype, device) -> gathered (sin, cos), shared by the blocks
        self.cache = cache  # BlockKVCache or None; the rows run are [start, start + n)
        self.start = start
        self.layers = layers  # id(block) -> layer index, with a cache


def _remote_layout_problem(model: nn.Module) -> Optional[str]:
    """What the remote-code layout lacks for this adapter, or None."""
    inner = getattr(model, "model", None)
    transformer = getattr(inner, "transformer", None)
    if transformer is None or not isinstance(getattr(transformer, "wte", None), nn.Embedding):
        return "no input embeddings at model.model.transformer.wte"
    if "blocks" not in transformer:
        if "block_groups" in transformer:
            return "block_group_size > 1 (transformer.block_groups) is not supported"
        return "no transformer.blocks"
    if "ln_f" not in transformer:
        return "no transformer.ln_f"
    cfg = getattr(inner, "config", None) or getattr(model, "config", None)
    if getattr(cfg, "alibi", False) or not getattr(cfg, "rope", True):
        return "only RoPE models are supported (alibi=True or rope=False)"
    for i, block in enumerate(transformer.blocks):
        rotary = getattr(block, "rotary_emb", None)
        if not callable(getattr(block, "_scaled_dot_product_attention", None)):
            return f"block {i} has no _scaled_dot_product_attention"
        for attr in ("get_rotary_embedding", "apply_rotary_pos_emb"):
            if not callable(getattr(rotary, attr, None)):
                return f"block {i}'s rotary_emb has no {attr}"
    return None


# -- what the hooks run (module-level so a patched model deep-copies and pickles) ----------
def _masked_sdpa(adapter: "LLaDARemoteAdapter", block: nn.Module, original, q, k, v, attn_mask=None,
                 dropout_p=0.0, is_causal=False):
    """block._scaled_dot_product_attention with the adapter's key-padding mask as attn_mask."""
    state = adapter._state
    if state is not None and state.cache is not None:
        k, v = state.cache.write(state.layers[id(block)], state.start, k, v)
    if state is not None and state.mask is not None:
        mask = state.mask
        if attn_mask is not None:  # LLaDA passes None; combine should a variant pass one
            mask = (mask & attn_mask if attn_mask.dtype == torch.bool
                    else attn_mask.masked_fill(~mask, torch.finfo(attn_mask.dtype).min))
        attn_mask = mask
    return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)


def _positioned_rope(adapter: "LLaDARemoteAdapter", rotary: nn.Module, original, q, k, *args, **kwargs):
    """rotary_emb.forward(q, k) at the adapter's positions, from the module's own sin/cos table."""
    state = adapter._state
    if state is None:
        return original(q, k, *args, **kwargs)
    if any(a is not None for a in args) or any(v is not None for v in kwargs.values()):
        raise RuntimeError("evofast's LLaDA remote adapter does not support KV-cache arguments "
                           "(block_end_index / replace_position)")
    if q.shape[-2] != k.shape[-2]:
        raise RuntimeError("evofast's LLaDA remote adapter runs without a KV cache (query and key "
                           f"lengths differ: {q.shape[-2]} vs {k.shape[-2]})")
    full = bool(getattr(rotary.config, "rope_full_precision", True))
    q_, k_ = (q.float(), k.float()) if full else (q, k)
    with torch.autocast(q.device.type, enabled=False):
        key = (q_.dtype, q_.device)
        table = state.tables.get(key)
        if table is None:  # gathered once per forward, shared by the blocks
            pos = state.positions.to(q_.device)
            n = int(pos.max()) + 1 if pos.numel() else 1
            sin, cos = rotary.get_rotary_embedding(n, q_.device)  # (1, 1, >= n, head_dim)
            table = state.tables[key] = (sin[0, 0].type_as(q_)[pos][:, None], cos[0, 0].type_as(q_)[pos][:, None])
        sin, cos = table
        q_ = rotary.apply_rotary_pos_emb(sin, cos, q_)
        k_ = rotary.apply_rotary_pos_emb(sin, cos, k_)
    return q_.type_as(q), k_.type_as(k)


def _sliced_ln_f(adapter: "LLaDARemoteAdapter", ln_f: nn.Module, original, x, *args, **kwargs):
    """ln_f on rows [logits_from, logits_to) only (default: to the end), so the LM head after it
    runs on those rows only."""
    state = adapter._state
    if state is not None and (state.logits_from or state.logits_to is not None):
        x = x[:, state.logits_from:state.logits_to]
    out = original(x, *args, **kwargs)
    captured = getattr(adapter, "_captured", None)
    if state is not None and captured is not None:  # hidden_states(): keep the normed rows, skip the LM head
        captured.append(out)
        out = out[:, :0]
    return out


class LLaDARemoteAdapter(HFAdapter):
    name = "llada-remote"
    cache_kinds = ("prefix", "dual")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        klass = type(model)
        if klass.__name__ != "LLaDAModelLM" or klass.__module__.startswith("evofast."):
            return False
        native = sys.modules.get("evofast.models.llada")
        return native is None or not isinstance(model, native.LLaDAModelLM)

    @classmethod
    def unsupported(cls, model: nn.Module) -> Optional[str]:
        return _remote_layout_problem(model)

    @classmethod
    def default_mask_id(cls, model: nn.Module) -> Optional[int]:
        return llada_default_mask_id(model.config)

    def __init__(self, model: nn.Module, mask_id: int):
        super().__init__(model, mask_id)
        self._patches = InstancePatches()
        self._state: Optional[_State] = None

    @property
    def transformer(self) -> nn.ModuleDict:
        return self.model.model.transformer

    def input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    @property
    def vocab_size(self) -> int:
        t = self.transformer
        return int((t.ff_out if "ff_out" in t else t.wte).weight.shape[0])

    @property
    def max_length(self) -> Optional[int]:
        n = getattr(self.model.config, "max_sequence_length", None)
        return int(n) if n is not None else None

    # -- rebinding -------------------------------------------------------------
    def install(self) -> None:
        problem = _remote_layout_problem(self.model)
        if problem is not None:
            raise TypeError(f"evofast.patch: {type(self.model).__name__} (LLaDA remote code): {problem}")
        p = self._patches
        for block in self.transformer.blocks:
            p.set(block, "_scaled_dot_product_attention",
                  MethodHook(self, block, "_scaled_dot_product_attention", _masked_sdpa))
            p.set(block.rotary_emb, "forward", MethodHook(self, block.rotary_emb, "forward", _positioned_rope))
        ln_f = self.transformer.ln_f
        p.set(ln_f, "forward", MethodHook(self, ln_f, "forward", _sliced_ln_f))

    def remove(self) -> None:
        skipped = self._patches.undo()
        if skipped:
            import warnings
            warnings.warn(f"evofast.unpatch: left alone (replaced after patch by something else): {skipped}")

    # -- what cts uses -------------------------------------------------------------
    def _hidden_states(self, x: Inputs) -> Tensor:
        """ln_f's output, caught by the ln_f hook (which hands the LM head zero rows)."""
        self._captured = []
        try:
            self._forward(x, 0)
            return self._captured[-1]
        finally:
            self._captured = None

    def output_head(self) -> tuple:
        t, cfg = self.transformer, self.model.config
        head = t.ff_out if "ff_out" in t else t.wte
        scale = 1.0 / float(cfg.d_model) ** 0.5 if getattr(cfg, "scale_logits", False) else 1.0
        return head.weight, getattr(head, "bias", None), scale

    # -- forward -----------------------------------------------------------------
    def cache_layout(self):
        blocks = self.transformer.blocks
        cfg = self.model.config
        head_dim = int(cfg.d_model) // int(cfg.n_heads)
        return len(blocks), int(blocks[0].k_proj.out_features) // head_dim, head_dim

    def _forward_cached(self, cache, start: int, x: Inputs, lo: int, hi: int) -> Tensor:
        n = (x.input_ids if x.input_ids is not None else x.inputs_embeds).shape[1]
        keep = keep_mask(x.attention_mask)
        positions = default_positions(x.attention_mask, x.position_ids, x.L, x.device)[:, start:start + n]
        layers = {id(block): i for i, block in enumerate(self.transformer.blocks)}
        state = _State(None if keep is None else keep[:, None, None, :], positions, lo, hi, cache, start, layers)
        return self._run(state, x.input_ids, x.inputs_embeds)

    def _forward(self, x: Inputs, logits_from: int) -> Tensor:
        keep = keep_mask(x.attention_mask)
        positions = default_positions(x.attention_mask, x.position_ids, x.L, x.device)
        return self._run(_State(None if keep is None else keep[:, None, None, :], positions, logits_from),
                         x.input_ids, x.inputs_embeds)

    def _run(self, state: _State, input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor]) -> Tensor:
        """The model's own forward with the wrappers reading `state`."""
        if not len(self._patches):
            raise RuntimeError("this adapter is not installed (use evofast.patch(model))")
        if torch.is_grad_enabled() and any(getattr(b, "_activation_checkpoint_fn", None) is not None
                                           for b in self.transformer.blocks):
            raise RuntimeError("LLaDA's remote code has activation checkpointing on: its recomputation in "
                               "backward would run without evofast's pad mask and positions; turn it off "
                               "(model.model.set_activation_checkpointing(None)) or use evofast.models.llada")
        if self._state is not None:
            raise RuntimeError("evofast's LLaDA remote adapter is not re-entrant")
        self._state = state
        try:
            out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, use_cache=False,
                             return_dict=True)
        finally:
            self._state = None
        return out.logits

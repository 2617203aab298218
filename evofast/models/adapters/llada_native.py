"""Adapter for evofast's own LLaDA implementation (`evofast.models.llada.LLaDAModelLM`).

That model already does what the adapter contract asks: bidirectional SDPA,
pad keys masked from `attention_mask`, RoPE at explicit `position_ids`. So
`install` rebinds nothing; `forward` runs the body and applies the LM head
(`compute_logits`) to rows `[logits_from, L)` only. The KV cache ("prefix" and
"dual") is the model's own (`LLaDAModel.forward(kv_cache=...)`).
"""
from __future__ import annotations

import math
import sys
from typing import Optional

from torch import Tensor, nn

from ..base import HFAdapter, check_cached, check_inputs, default_positions, keep_mask

LLADA_MASK_ID = 126336  # <|mdm_mask|> in LLaDA's 126464-token vocabulary
LLADA_VOCAB_SIZE = 126464


def llada_default_mask_id(config) -> Optional[int]:
    """config.mask_token_id, else LLaDA's <|mdm_mask|> when the vocabulary is LLaDA's."""
    mid = getattr(config, "mask_token_id", None)
    if mid is not None:
        return int(mid)
    size = getattr(config, "embedding_size", None) or getattr(config, "vocab_size", None)
    return LLADA_MASK_ID if size == LLADA_VOCAB_SIZE else None


def _native_class():
    """evofast.models.llada.LLaDAModelLM if that module is loaded (a model of it cannot exist otherwise)."""
    mod = sys.modules.get("evofast.models.llada")
    return getattr(mod, "LLaDAModelLM", None)


class LLaDANativeAdapter(HFAdapter):
    name = "llada-native"
    cache_kinds = ("prefix", "dual")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        klass = _native_class()
        return klass is not None and isinstance(model, klass)

    @classmethod
    def default_mask_id(cls, model: nn.Module) -> Optional[int]:
        return llada_default_mask_id(model.config)

    @property
    def max_length(self) -> Optional[int]:
        return int(self.model.config.max_sequence_length)

    def _body(self, input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor], attention_mask: Optional[Tensor],
              position_ids: Optional[Tensor], L: int, **cache) -> Tensor:
        """ln_f's output (the LM head's input) for checked inputs; `cache`: LLaDAModel's kv_cache, cache_start."""
        ref = input_ids if input_ids is not None else inputs_embeds
        pos = default_positions(attention_mask, position_ids, L, ref.device)
        return self.model.model(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                attention_mask=keep_mask(attention_mask), position_ids=pos, **cache)[0]

    def forward(self, *, input_ids: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                logits_from: int = 0) -> Tensor:
        B, L = check_inputs(input_ids, inputs_embeds, attention_mask, position_ids, logits_from, self.max_length)
        hidden = self._body(input_ids, inputs_embeds, attention_mask, position_ids, L)
        return self.model.compute_logits(hidden[:, logits_from:])

    def hidden_states(self, *, input_ids: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None,
                      attention_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None) -> Tensor:
        B, L = check_inputs(input_ids, inputs_embeds, attention_mask, position_ids, 0, self.max_length)
        return self._body(input_ids, inputs_embeds, attention_mask, position_ids, L)

    def output_head(self) -> tuple:
        cfg = self.model.config
        head = self.model.get_output_embeddings()
        scale = 1.0 / math.sqrt(cfg.d_model) if cfg.scale_logits else 1.0
        return head.weight, (None if cfg.weight_tying else head.bias), scale

    def cache_layout(self):
        blocks = self.model.model.transformer.blocks
        return len(blocks), blocks[0].n_kv_heads, blocks[0].head_dim

    def forward_cached(self, *, cache, start: int, input_ids: Optional[Tensor] = None,
                       inputs_embeds: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                       position_ids: Optional[Tensor] = None, logits_from: Optional[int] = None,
                       logits_to: Optional[int] = None) -> Tensor:
        b, n, L, lo, hi = check_cached(cache, start, input_ids, inputs_embeds, attention_mask, position_ids,
                                       logits_from, logits_to, self.max_length)
        hidden = self._body(input_ids, inputs_embeds, attention_mask, position_ids, L, kv_cache=cache,
                            cache_start=start)
        return self.model.compute_logits(hidden[:, lo:hi])

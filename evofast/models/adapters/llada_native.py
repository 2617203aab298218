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

from ..base import HFAdapter, Inputs, default_positions, keep_mask

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

    def _body(self, x: Inputs, **cache) -> Tensor:
        """ln_f's output (the LM head's input); `cache`: LLaDAModel's kv_cache, cache_start."""
        pos = default_positions(x.attention_mask, x.position_ids, x.L, x.device)
        return self.model.model(**x.model_kwargs(), attention_mask=keep_mask(x.attention_mask), position_ids=pos,
                                **cache)[0]

    def _forward(self, x: Inputs, logits_from: int) -> Tensor:
        return self.model.compute_logits(self._body(x)[:, logits_from:])

    def _hidden_states(self, x: Inputs) -> Tensor:
        return self._body(x)

    def output_head(self) -> tuple:
        cfg = self.model.config
        head = self.model.get_output_embeddings()
        scale = 1.0 / math.sqrt(cfg.d_model) if cfg.scale_logits else 1.0
        return head.weight, (None if cfg.weight_tying else head.bias), scale

    def cache_layout(self):
        blocks = self.model.model.transformer.blocks
        return len(blocks), blocks[0].n_kv_heads, blocks[0].head_dim

    def _forward_cached(self, cache, start: int, x: Inputs, lo: int, hi: int) -> Tensor:
        return self.model.compute_logits(self._body(x, kv_cache=cache, cache_start=start)[:, lo:hi])

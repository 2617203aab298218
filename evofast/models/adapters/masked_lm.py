"""Adapters for transformers' masked LMs: `BertForMaskedLM`, `RobertaForMaskedLM`,
`ModernBertForMaskedLM`.

These encoders are bidirectional and honour a 2-D `attention_mask` (pad keys get
no weight) and `position_ids` themselves, so `install` rebinds nothing. The
adapter's forward runs the encoder with the key-padding mask and explicit
positions, then the MLM head on rows `[logits_from, L)` only:

* BERT: absolute position embeddings at `position_ids` (0 at each row's first
  real token);
* RoBERTa: absolute position embeddings at `position_ids + padding_idx + 1`,
  RoBERTa's convention (its unpadded input counts from `padding_idx + 1`), so a
  left-padded row gets the positions its unpadded run gets;
* ModernBERT: RoPE at `position_ids`; its sliding-window layers mask by index
  distance, which left padding does not change for real tokens.

Mask id: `config.mask_token_id` when the config has one (checkpoint configs
usually do not: the mask id lives in the tokenizer, e.g. 103 for bert-base,
50264 for roberta-base, 50284 for ModernBERT-base), else `patch(model, mask_id=...)`.
A config with `is_decoder=True` (causal self-attention) is refused.

CTS training (`evofast.cts`) reads the head split in two: `hidden_states` is the
encoder's output through the head's transform (dense, activation, norm), and
`output_head` the vocabulary projection (`decoder`: weight and bias), so the fused
cross-entropy never builds the logits of every row.

KV cache: BERT and RoBERTa self-attention hand their keys and values to
`past_key_values.update`, so `forward_cached` passes an `evofast.cache`
positional `transformers.Cache` (the window replaces its positions, the queries
read the whole sequence) and a 4-D additive key mask. ModernBERT's attention has
no cache hook: it supports no cache (`generate(cache=...)` says so up front).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..base import HFAdapter, Inputs, additive_key_bias, default_positions, keep_mask


class _MaskedLMAdapter(HFAdapter):
    #: transformers class name this adapter serves, and the attributes of its body and head
    class_name: str = ""
    body_attr: str = ""

    @classmethod
    def _klass(cls):
        import transformers
        return getattr(transformers, cls.class_name, None)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        klass = cls._klass()
        return klass is not None and isinstance(model, klass)

    @classmethod
    def unsupported(cls, model: nn.Module) -> Optional[str]:
        if getattr(model.config, "is_decoder", False):
            return "causal-only attention (config.is_decoder=True); a masked LM needs is_decoder=False"
        return None

    @classmethod
    def default_mask_id(cls, model: nn.Module) -> Optional[int]:
        mid = getattr(model.config, "mask_token_id", None)
        return None if mid is None else int(mid)

    @property
    def body(self) -> nn.Module:
        return getattr(self.model, self.body_attr)

    @property
    def max_length(self) -> Optional[int]:
        return int(self.model.config.max_position_embeddings)

    def model_positions(self, positions: Tensor) -> Tensor:
        """Adapter positions (0 at the first real token) -> the position ids the model embeds."""
        return positions

    def head(self, hidden: Tensor) -> Tensor:
        """The MLM head: logits of the encoder's output rows."""
        raise NotImplementedError

    def transform(self, hidden: Tensor) -> Tensor:
        """The MLM head up to its vocabulary projection (`decoder`): `head = decoder(transform(.))`."""
        raise NotImplementedError

    def decoder(self) -> nn.Linear:
        raise NotImplementedError

    def _positions(self, x: Inputs) -> Tensor:
        return self.model_positions(default_positions(x.attention_mask, x.position_ids, x.L, x.device)).expand(x.B, x.L)

    def _encode(self, x: Inputs) -> Tensor:
        keep = keep_mask(x.attention_mask)
        out = self.body(**x.model_kwargs(), attention_mask=None if keep is None else keep.long(),
                        position_ids=self._positions(x))
        return out[0]

    def _forward(self, x: Inputs, logits_from: int) -> Tensor:
        return self.head(self._encode(x)[:, logits_from:])

    def _hidden_states(self, x: Inputs) -> Tensor:
        return self.transform(self._encode(x))

    def output_head(self) -> tuple:
        dec = self.decoder()
        return dec.weight, dec.bias, 1.0

    def cache_layout(self):
        if not self.cache_kinds:
            return super().cache_layout()
        cfg = self.model.config
        return int(cfg.num_hidden_layers), int(cfg.num_attention_heads), int(cfg.hidden_size // cfg.num_attention_heads)

    def _forward_cached(self, cache, start: int, x: Inputs, lo: int, hi: int) -> Tensor:
        from ...cache import transformers_cache
        n = (x.input_ids if x.input_ids is not None else x.inputs_embeds).shape[1]
        keep = keep_mask(x.attention_mask)
        bias = None
        if keep is not None:
            bias = additive_key_bias(keep, x.B, x.L, self.input_embeddings().weight.dtype, x.device)
        out = self.body(**x.model_kwargs(), attention_mask=bias, position_ids=self._positions(x)[:, start:start + n],
                        past_key_values=transformers_cache(cache, start), use_cache=False)
        return self.head(out[0][:, lo:hi])


class BertMLMAdapter(_MaskedLMAdapter):
    name = "bert-mlm"
    cache_kinds = ("prefix", "dual")
    class_name = "BertForMaskedLM"
    body_attr = "bert"

    def head(self, hidden: Tensor) -> Tensor:
        return self.model.cls(hidden)

    def transform(self, hidden: Tensor) -> Tensor:
        return self.model.cls.predictions.transform(hidden)

    def decoder(self) -> nn.Linear:
        return self.model.cls.predictions.decoder


class RobertaMLMAdapter(_MaskedLMAdapter):
    name = "roberta-mlm"
    cache_kinds = ("prefix", "dual")
    class_name = "RobertaForMaskedLM"
    body_attr = "roberta"

    @property
    def padding_idx(self) -> int:
        return int(self.body.embeddings.padding_idx)

    @property
    def max_length(self) -> Optional[int]:
        return int(self.model.config.max_position_embeddings) - self.padding_idx - 1

    def model_positions(self, positions: Tensor) -> Tensor:
        return positions + (self.padding_idx + 1)

    def head(self, hidden: Tensor) -> Tensor:
        return self.model.lm_head(hidden)

    def transform(self, hidden: Tensor) -> Tensor:
        from transformers.models.roberta.modeling_roberta import gelu   # the activation RobertaLMHead calls
        head = self.model.lm_head
        return head.layer_norm(gelu(head.dense(hidden)))

    def decoder(self) -> nn.Linear:
        return self.model.lm_head.decoder


class ModernBertMLMAdapter(_MaskedLMAdapter):
    name = "modernbert-mlm"
    class_name = "ModernBertForMaskedLM"
    body_attr = "model"

    @classmethod
    def unsupported(cls, model: nn.Module) -> Optional[str]:
        return None  # an encoder only; it has no causal mode

    def head(self, hidden: Tensor) -> Tensor:
        return self.model.decoder(self.model.head(hidden))

    def transform(self, hidden: Tensor) -> Tensor:
        return self.model.head(hidden)

    def decoder(self) -> nn.Linear:
        return self.model.decoder

"""Adapter for Dream-style models: the Qwen2 architecture with non-causal attention.

Two classes are served:

* transformers' `Qwen2ForCausalLM` (model_type "qwen2"). transformers runs it
  causally; `patch` leaves it so (plain `model(input_ids)` calls are unchanged),
  and only calls through the adapter run bidirectionally.
* Dream's remote-code class (`DreamModel`, model_type "Dream", loaded with
  `trust_remote_code`): bidirectional by design, same module layout
  (`model.model.embed_tokens`, `model.lm_head`). Its code cannot be downloaded
  in evofast's test environment; the tests run on it when
  EVOFAST_DREAM_REMOTE_DIR names a copy (tests/test_adapters.py). Under
  transformers 5 its checkpoints load with uninitialised RoPE buffers (they
  are built in ``__init__``, which loading from the meta device skips): `patch`
  checks them and asks for Dream's ``model.reset_rope_parameters()``.

Masks and positions: the adapter's forward passes the body a float 4-D mask
`(B, 1, 1, L)`, 0 on real keys and `finfo(dtype).min` on pad keys (all zeros
when nothing is padded). transformers uses a 4-D mask as given (no causal mask
is built, and SDPA runs with `is_causal=False` because a mask is present);
Dream's code adds it to the scores likewise. `position_ids` (0 at each row's
first real token) drive RoPE in both.

Logit alignment: Dream was trained from an autoregressive model and keeps its
shift: the logits at row i predict token i + 1. Dream's own sampler realigns
them as ``cat(logits[:, :1], logits[:, :-1])``; the adapter does the same when
`shift_logits` is true, per row: a left-padded row's first real token reads
its own hidden state, as row 0 of its unpadded run does, not the pad's before it
(Dream's batch code would give it the pad's; those are prompt rows, never
decoded). Default: true for Dream's class, false for Qwen2, so a
Qwen2 model trained as a plain masked diffusion LM reads row i at row i). Set
``evofast.get_adapter(model).shift_logits`` to override.

CTS training (`evofast.cts`): `hidden_states` gives the final hidden states
realigned the same way (row i holds what row i's logits are computed from) and
`output_head` the `lm_head` weight and bias.

Not supported (TypeError at `patch`): sliding-window layers, and attention
implementations that cannot take a 4-D float mask (only "eager" and "sdpa" can).

KV cache: the attention modules hand their keys and values (after RoPE) to
`past_key_values.update`, so `forward_cached` passes an `evofast.cache`
positional `transformers.Cache` and the additive key mask (as transformers'
ready mask mapping for transformers' Qwen2, so no causal mask is built). With
`shift_logits` the logits of row i read hidden row i - 1, so a cached window
starts one row before its first logits row (`cache_lead`). Dream's own remote
class goes through the same calls.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..base import HFAdapter, Inputs, additive_key_bias, default_positions, keep_mask

_MASK_READY_IMPLEMENTATIONS = (None, "eager", "sdpa")


def _is_dream(model: nn.Module) -> bool:
    model_type = str(getattr(getattr(model, "config", None), "model_type", "")).lower()
    return type(model).__name__ == "DreamModel" or model_type == "dream"


def _rope_problem(model: nn.Module) -> Optional[str]:
    """What is wrong with the model's RoPE inverse frequencies, if anything (default RoPE only).

    Dream's remote class keeps them in non-persistent buffers computed in
    ``__init__``; loaded with transformers 5 (which materialises such models
    from the meta device) they hold uninitialised memory, silently."""
    cfg = model.config
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict):
        kind, theta = params.get("rope_type", "default"), params.get("rope_theta")
    else:
        scaling = getattr(cfg, "rope_scaling", None) or {}
        kind, theta = scaling.get("rope_type", scaling.get("type", "default")), getattr(cfg, "rope_theta", None)
    if kind != "default" or not theta:
        return None
    for name, module in model.named_modules():
        inv = getattr(module, "inv_freq", None)
        if not isinstance(inv, Tensor) or inv.dim() != 1 or inv.device.type == "meta":
            continue
        dim = 2 * inv.numel()
        want = 1.0 / float(theta) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        got = inv.detach().to("cpu", torch.float64)
        rtol = max(1e-4, 2 * torch.finfo(inv.dtype).eps)       # a bf16 model holds them in bf16
        if not bool(torch.isclose(got, want, rtol=rtol, atol=0).all()):
            return (f"{name}.inv_freq holds {got[:3].tolist()}..., not RoPE's 1 / theta^(2i/d) for theta "
                    f"{float(theta):g}")
    return None


class DreamAdapter(HFAdapter):
    name = "dream"
    cache_kinds = ("prefix", "dual")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if _is_dream(model):
            return True
        from transformers import Qwen2ForCausalLM
        return isinstance(model, Qwen2ForCausalLM)

    @classmethod
    def unsupported(cls, model: nn.Module) -> Optional[str]:
        body = getattr(model, "model", None)
        if not isinstance(getattr(body, "embed_tokens", None), nn.Embedding):
            return "no input embeddings at model.model.embed_tokens"
        if not isinstance(getattr(model, "lm_head", None), nn.Module):
            return "no LM head (model.lm_head)"
        config = model.config
        layer_types = getattr(config, "layer_types", None) or ()
        if "sliding_attention" in layer_types:
            return "sliding-window attention layers are not supported (config.layer_types)"
        impl = getattr(config, "_attn_implementation", None)
        if not _is_dream(model) and impl not in _MASK_READY_IMPLEMENTATIONS:
            return (f"attention implementation {impl!r} cannot take the non-causal 4-D mask the adapter "
                    "passes; load the model with attn_implementation='sdpa' or 'eager'")
        return None

    @classmethod
    def default_mask_id(cls, model: nn.Module) -> Optional[int]:
        mid = getattr(model.config, "mask_token_id", None)
        return None if mid is None else int(mid)

    def __init__(self, model: nn.Module, mask_id: int):
        problem = _rope_problem(model) if _is_dream(model) else None
        if problem:
            raise ValueError(f"evofast.patch: {problem}. Dream's remote code loaded with transformers 5 leaves "
                             "these buffers uninitialised; call model.reset_rope_parameters() (Dream's own "
                             "method) after loading, then patch")
        super().__init__(model, mask_id)
        #: realign Dream's next-token logits to their own rows (see the module docstring)
        self.shift_logits: bool = _is_dream(model)

    def input_embeddings(self) -> nn.Embedding:
        return self.model.model.embed_tokens

    @property
    def vocab_size(self) -> int:
        return int(self.model.lm_head.weight.shape[0])

    @property
    def max_length(self) -> Optional[int]:
        n = getattr(self.model.config, "max_position_embeddings", None)
        return int(n) if n is not None else None

    def _forward(self, x: Inputs, logits_from: int) -> Tensor:
        return self.model.lm_head(self._hidden(x, logits_from))

    def _hidden_states(self, x: Inputs) -> Tensor:
        """The LM head's input per row, realigned like the logits (`shift_logits`): row i holds the
        hidden state whose logits `forward` gives at row i."""
        return self._hidden(x, 0)

    def output_head(self) -> tuple:
        head = self.model.lm_head
        return head.weight, head.bias, 1.0

    def _hidden(self, x: Inputs, logits_from: int) -> Tensor:
        """Rows [logits_from, L) of the final hidden states, realigned when `shift_logits`."""
        keep, bias, positions = self._masks(x)
        out = self.model.model(**x.model_kwargs(), attention_mask=bias,
                               position_ids=positions, use_cache=False, output_attentions=False,
                               output_hidden_states=False, return_dict=True)
        hidden = out[0]
        if self.shift_logits:
            return self._shift(hidden, keep, logits_from)
        return hidden[:, logits_from:]

    @property
    def cache_lead(self) -> int:
        return 1 if self.shift_logits else 0

    def cache_layout(self):
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return int(cfg.num_hidden_layers), int(cfg.num_key_value_heads), int(head_dim)

    def _forward_cached(self, cache, start: int, x: Inputs, lo: int, hi: int) -> Tensor:
        from ...cache import transformers_cache
        if self.shift_logits and start > 0 and lo == 0:
            raise ValueError(f"logits_from: with shift_logits the logits of row {start} read row {start - 1}, "
                             f"outside the window starting at {start} (start the window one row earlier)")
        n = (x.input_ids if x.input_ids is not None else x.inputs_embeds).shape[1]
        keep, bias, positions = self._masks(x)
        from transformers import Qwen2Model
        if isinstance(self.model.model, Qwen2Model):
            bias = {"full_attention": bias}  # transformers' ready mapping: no causal mask is built
        out = self.model.model(**x.model_kwargs(), attention_mask=bias, position_ids=positions[:, start:start + n],
                               past_key_values=transformers_cache(cache, start), use_cache=False,
                               output_attentions=False, output_hidden_states=False, return_dict=True)
        hidden = out[0]
        if self.shift_logits:
            return self.model.lm_head(self._shift(hidden, keep, start + lo, offset=start)[:, :hi - lo])
        return self.model.lm_head(hidden[:, lo:hi])

    def _masks(self, x: Inputs):
        """(keep, additive key bias, positions (B, L)) of a forward over a sequence of L positions;
        checks first that the model is still supported (its attention implementation can change
        after patch)."""
        problem = self.unsupported(self.model)
        if problem is not None:
            raise TypeError(f"evofast dream adapter: {type(self.model).__name__}: {problem}")
        dtype = x.inputs_embeds.dtype if x.inputs_embeds is not None else self.input_embeddings().weight.dtype
        keep = keep_mask(x.attention_mask)
        bias = additive_key_bias(keep, x.B, x.L, dtype, x.device)
        positions = default_positions(x.attention_mask, x.position_ids, x.L, x.device).expand(x.B, x.L)
        return keep, bias, positions

    @staticmethod
    def _shift(hidden: Tensor, keep: Optional[Tensor], logits_from: int, offset: int = 0) -> Tensor:
        """Rows [logits_from, offset + n) of Dream's realignment: row i reads hidden row i - 1, except
        each row's first real token (and row 0), which reads its own, as in an unpadded run.
        `hidden` holds rows [offset, offset + n) (a cached window; `logits_from > offset` then,
        unless offset is 0); `keep` covers the whole sequence."""
        n = hidden.shape[1]
        lf = logits_from - offset
        prev = torch.cat((hidden[:, :1], hidden[:, :n - 1]), dim=1)[:, lf:]
        if keep is None:
            return prev
        first = keep.clone()
        first[:, 1:] &= ~keep[:, :-1]  # a real token after a pad (or at 0)
        first = first[:, logits_from:offset + n, None].to(hidden.device)
        return torch.where(first, hidden[:, lf:], prev)

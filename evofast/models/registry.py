"""`evofast.patch` / `evofast.unpatch` / `get_adapter`: the model-type table.

`patch(model)` looks the model's ``config.model_type`` up in `MODEL_TYPES`,
takes the first listed adapter whose `matches` accepts the instance, checks
the mask id, lets the adapter rebind what it needs on this live instance
(`Adapter.install`), and stores the adapter on the instance as
``model._evofast_adapter``. Weights are never copied or changed, and plain
``model(input_ids)`` calls give what they gave before. `unpatch` undoes it all.

Adapters are imported on first use, so importing this module (or evofast)
does not import transformers.
"""
from __future__ import annotations

import importlib
import inspect
import operator
from typing import Dict, Optional, Tuple, Type, Union

from torch import nn

from .base import Adapter

__all__ = ["patch", "unpatch", "get_adapter", "is_patched", "adapter_class", "register_adapter", "unwrap",
           "MODEL_TYPES"]

#: attribute of a patched model holding its adapter
ATTR = "_evofast_adapter"

AdapterRef = Union[str, Type[Adapter]]  # "module:Class" under evofast.models, or the class

#: config.model_type (lower case) -> adapters to try, in order
MODEL_TYPES: Dict[str, Tuple[AdapterRef, ...]] = {
    "llada": ("adapters.llada_native:LLaDANativeAdapter", "adapters.llada_remote:LLaDARemoteAdapter"),
    "bert": ("adapters.masked_lm:BertMLMAdapter",),
    "roberta": ("adapters.masked_lm:RobertaMLMAdapter",),
    "modernbert": ("adapters.masked_lm:ModernBertMLMAdapter",),
    "qwen2": ("adapters.dream:DreamAdapter",),
    "dream": ("adapters.dream:DreamAdapter",),
}

SUPPORTED = ("evofast.models.llada.LLaDAModelLM, LLaDA's remote-code LLaDAModelLM, BertForMaskedLM, "
             "RobertaForMaskedLM, ModernBertForMaskedLM, Qwen2ForCausalLM (run bidirectionally), "
             "Dream's DreamModel")


def register_adapter(model_type: str, adapter: AdapterRef, *, first: bool = True) -> None:
    """Add an adapter for `model_type` (tried before the existing ones when `first`)."""
    key = model_type.lower()
    old = tuple(a for a in MODEL_TYPES.get(key, ()) if a != adapter)
    MODEL_TYPES[key] = (adapter,) + old if first else old + (adapter,)


def _load(ref: AdapterRef) -> Type[Adapter]:
    if not isinstance(ref, str):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "").lower()


def _why_unsupported(model: nn.Module, model_type: str) -> str:
    """What an unmatched model lacks, most basic first."""
    name = type(model).__name__
    getter = getattr(model, "get_input_embeddings", None)
    try:
        emb = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        emb = None
    if not isinstance(emb, nn.Embedding):
        return (f"{name} has no input embeddings (get_input_embeddings() gives no nn.Embedding): "
                "soft tokens are mixtures of embedding rows")
    params = inspect.signature(model.forward).parameters
    if "inputs_embeds" not in params:
        return f"{name}.forward takes no inputs_embeds: soft tokens enter the model as input embeddings"
    config = getattr(model, "config", None)
    if (getattr(config, "is_decoder", False) or name.endswith("ForCausalLM") or name.endswith("LMHeadModel")):
        return (f"{name} has causal-only attention (model_type {model_type!r}): EvoToken decoding needs "
                "bidirectional attention, and evofast has no adapter that makes this architecture bidirectional")
    if model_type in MODEL_TYPES:
        return (f"{name} (model_type {model_type!r}) is not a class evofast's adapters serve "
                f"(a language-model head is needed)")
    return f"no evofast adapter for {name} (model_type {model_type!r})"


def adapter_class(model: nn.Module) -> Type[Adapter]:
    """The adapter class for `model`; TypeError naming what is missing when there is none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"evofast.patch expects a torch.nn.Module, got {type(model).__name__}")
    model_type = _model_type(model)
    tried = []
    candidates = list(MODEL_TYPES.get(model_type, ()))
    candidates += [ref for refs in MODEL_TYPES.values() for ref in refs if ref not in candidates]
    for ref in candidates:
        if ref in tried:
            continue
        tried.append(ref)
        cls = _load(ref)
        if cls.matches(model):
            problem = getattr(cls, "unsupported", lambda m: None)(model)
            if problem is not None:
                raise TypeError(f"evofast.patch: {type(model).__name__} is not supported: {problem}")
            return cls
    raise TypeError(f"evofast.patch: {_why_unsupported(model, model_type)}. Supported: {SUPPORTED}.")


def unwrap(model: nn.Module) -> nn.Module:
    """The model under wrappers that only forward to it: peft's `PeftModel`
    (`get_base_model()`: the model whose layers peft replaced by LoRA layers, which
    stay active and unmerged) and DDP / FSDP (`.module`), in any nesting."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
    return model


def is_patched(model: nn.Module) -> bool:
    return isinstance(getattr(model, "__dict__", {}).get(ATTR), Adapter)


def patch(model: nn.Module, mask_id: Optional[int] = None) -> nn.Module:
    """Make `model` usable by `evofast.generate` and `evofast.cts`; returns the same object.

    A peft `PeftModel` (LoRA, unmerged) or a DDP / FSDP wrapper is supported around
    any supported model: the model inside is patched, its LoRA layers stay active,
    and the wrapper holds the same adapter (`unpatch` on the wrapper undoes it).

    Idempotent: patching a patched model returns it untouched (a different
    `mask_id` is a ValueError: unpatch first). `mask_id` defaults to the
    config's (`mask_token_id`); a model whose config has none (BERT-like
    checkpoints keep it in the tokenizer) needs it passed. Unsupported models
    get a TypeError naming what is missing.
    """
    inner = unwrap(model) if isinstance(model, nn.Module) else model
    if inner is not model:            # a peft / DDP wrapper: the adapter serves the model inside
        model.__dict__[ATTR] = get_adapter(inner, mask_id)
        return model
    current = model.__dict__.get(ATTR) if isinstance(model, nn.Module) else None
    if current is not None:
        if mask_id is not None and _as_int(mask_id) != current.mask_id:
            raise ValueError(f"evofast.patch: {type(model).__name__} is already patched with mask_id="
                             f"{current.mask_id}; call evofast.unpatch(model) before patching with mask_id={mask_id}")
        return model
    cls = adapter_class(model)
    mid = mask_id if mask_id is not None else cls.default_mask_id(model)
    if mid is None:
        raise ValueError(f"evofast.patch: {type(model).__name__}'s config has no mask id (config.mask_token_id); "
                         "pass evofast.patch(model, mask_id=tokenizer.mask_token_id)")
    adapter = cls(model, _as_int(mid))
    rows = int(adapter.input_embeddings().weight.shape[0])
    if not 0 <= adapter.mask_id < rows:
        raise ValueError(f"evofast.patch: mask_id={adapter.mask_id} is outside the model's vocabulary "
                         f"(input embeddings have {rows} rows)")
    try:
        adapter.install()
    except BaseException:
        adapter.remove()
        raise
    model.__dict__[ATTR] = adapter
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch` (a no-op on a model that is not patched); returns the same object."""
    adapter = model.__dict__.pop(ATTR, None) if isinstance(model, nn.Module) else None
    inner = unwrap(model) if isinstance(model, nn.Module) else model
    if inner is not model:
        unpatch(inner)
    elif adapter is not None:
        adapter.remove()
    return model


def get_adapter(model: nn.Module, mask_id: Optional[int] = None) -> Adapter:
    """The model's adapter, patching it first when needed (same rules as `patch`)."""
    patch(model, mask_id)
    return model.__dict__[ATTR]


def _as_int(v) -> int:
    if isinstance(v, bool):
        raise ValueError(f"mask_id must be an int, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise ValueError(f"mask_id must be an int, got {v!r}") from None

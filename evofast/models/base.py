"""The adapter contract: what `generate` and `cts` need from a model.

An adapter wraps one live model instance (weights never copied) and gives:
its mask id, its input embedding matrix, and a forward that takes either token
ids or input embeddings plus a key-padding mask and explicit positions, runs
bidirectional attention with pad keys masked, and returns logits. Adapters know
nothing of evofast's kernels; `generate` and `cts` compose the two.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

import torch
from torch import Tensor, nn


class Adapter:
    """Base class of the per-architecture adapters (one module each under evofast/models/)."""

    #: short name shown in errors and reprs
    name: ClassVar[str] = "base"

    def __init__(self, model: nn.Module, mask_id: int):
        self.model = model
        self.mask_id = int(mask_id)

    # -- discovery --------------------------------------------------------
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """True when this adapter is the one for `model` (class, config model_type, ...)."""
        raise NotImplementedError

    @classmethod
    def default_mask_id(cls, model: nn.Module) -> Optional[int]:
        """The mask id from the model's config, or None when it has none."""
        return None

    def install(self) -> None:
        """Rebind whatever the model needs (e.g. attention that honours pad masks); undone by `remove`."""

    def remove(self) -> None:
        """Undo `install`: the model behaves exactly as before `patch`."""

    # -- what generate / cts use -------------------------------------------
    def input_embeddings(self) -> nn.Embedding:
        """The embedding whose `weight (V, d)` soft tokens mix."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Width of the logits (columns), >= the embedding rows the tokenizer uses."""
        raise NotImplementedError

    @property
    def max_length(self) -> Optional[int]:
        """Longest sequence the model accepts (None: unbounded)."""
        return None

    def forward(self, *, input_ids: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                logits_from: int = 0) -> Tensor:
        """Logits `(B, L - logits_from, V)` of rows `[logits_from, L)`.

        Exactly one of `input_ids (B, L)` / `inputs_embeds (B, L, d)`.
        `attention_mask (B, L)`: 1 real, 0 pad; pad keys get no attention weight.
        `position_ids (B, L)` (or `(1, L)` / `(L,)`, shared by the rows): the
        positions the model's position encoding uses, counted from 0 at the row's
        first real token (a left-padded row counts from its first real token);
        the adapter maps them to the model's own convention (RoBERTa adds
        `padding_idx + 1`). None: counted from each row's first real token of
        `attention_mask` (`arange(L)` without a mask), see `default_positions`.
        `logits_from`: adapters that can apply the LM head to only the last rows do
        so (saves the V-wide matmul for rows nobody reads); others slice.
        """
        B, L = check_inputs(input_ids, inputs_embeds, attention_mask, position_ids, logits_from, self.max_length)
        return self._forward(Inputs(input_ids, inputs_embeds, attention_mask, position_ids, B, L), logits_from)

    @torch.no_grad()
    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.input_embeddings()(input_ids)

    # -- what cts uses: the LM head split off (evofast.ops.linear_cross_entropy) --
    def hidden_states(self, *, input_ids: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None,
                      attention_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None) -> Tensor:
        """The LM head's input `(B, L, d)` (final-norm output), same arguments as `forward`."""
        B, L = check_inputs(input_ids, inputs_embeds, attention_mask, position_ids, 0, self.max_length)
        return self._hidden_states(Inputs(input_ids, inputs_embeds, attention_mask, position_ids, B, L))

    def output_head(self) -> tuple:
        """`(weight (V, d), bias (V,) or None, scale)`: logits = scale * (hidden @ weight.T + bias)."""
        raise TypeError(f"evofast's {self.name} adapter does not expose its output embedding: "
                        "CTS training (evofast.cts) needs it")

    # -- KV cache (evofast.cache.BlockKVCache) ------------------------------------
    #: the `generate(cache=...)` kinds this adapter can run ("prefix", "dual"); () = none
    cache_kinds: ClassVar[Tuple[str, ...]] = ()
    #: rows before the first logits row that a cached window must include (1 for models whose
    #: logits at row i read the hidden state of row i - 1, e.g. Dream)
    cache_lead: int = 0

    def cache_layout(self) -> Tuple[int, int, int]:
        """(attention layers, key/value heads, head_dim) of the model, for `new_cache`."""
        raise NotImplementedError(f"the {self.name} adapter has no KV cache")

    def new_cache(self, batch: int, length: int):
        """A `BlockKVCache` for `batch` rows of `length` positions in the model's dtype and device."""
        from ..cache import BlockKVCache
        layers, heads, head_dim = self.cache_layout()
        w = self.input_embeddings().weight
        return BlockKVCache(layers, batch, heads, length, head_dim, dtype=w.dtype, device=w.device)

    def forward_cached(self, *, cache, start: int, input_ids: Optional[Tensor] = None,
                       inputs_embeds: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                       position_ids: Optional[Tensor] = None, logits_from: Optional[int] = None,
                       logits_to: Optional[int] = None) -> Tensor:
        """The forward of the window rows `[start, start + n)` of a sequence of `cache.length` positions.

        `input_ids (b, n)` / `inputs_embeds (b, n, d)`: the window rows only (b <= cache.batch
        rows, the cache's first b slots). `attention_mask` / `position_ids`: as in `forward`,
        for the whole sequence `(b, cache.length)`. The window's keys and values (after the
        position encoding) replace positions `[start, start + n)` of `cache`; its queries
        attend to all `cache.length` keys of the cache (pad keys masked). So with every
        position written from the same inputs, this equals `forward` on rows
        `[start, start + n)` (fp32 rounding). Returns the logits of rows
        `[logits_from, logits_to)` (absolute rows, default the whole window).
        """
        if not self.cache_kinds:
            raise NotImplementedError(f"the {self.name} adapter has no KV cache")
        b, n, L, lo, hi = check_cached(cache, start, input_ids, inputs_embeds, attention_mask, position_ids,
                                       logits_from, logits_to, self.max_length)
        return self._forward_cached(cache, start, Inputs(input_ids, inputs_embeds, attention_mask, position_ids, b, L),
                                    lo, hi)

    # -- the bodies an adapter implements: arguments already checked, once, above ----------
    def _forward(self, x: "Inputs", logits_from: int) -> Tensor:
        """Logits of rows [logits_from, L)."""
        raise NotImplementedError

    def _hidden_states(self, x: "Inputs") -> Tensor:
        raise TypeError(f"evofast's {self.name} adapter cannot give hidden states before the LM head: "
                        "CTS training (evofast.cts) needs them; use evofast.models.llada or LLaDA's remote code")

    def _forward_cached(self, cache, start: int, x: "Inputs", lo: int, hi: int) -> Tensor:
        """Logits of the window's rows [start + lo, start + hi); `x` holds the window's inputs and the
        whole sequence's mask and positions (x.L = cache.length)."""
        raise NotImplementedError(f"the {self.name} adapter has no KV cache")


@dataclass
class Inputs:
    """The checked inputs of one forward (exactly one of input_ids / inputs_embeds)."""

    input_ids: Optional[Tensor]
    inputs_embeds: Optional[Tensor]
    attention_mask: Optional[Tensor]
    position_ids: Optional[Tensor]
    B: int
    L: int                 # the sequence length (a cached window's whole sequence)

    @property
    def device(self) -> torch.device:
        return (self.input_ids if self.input_ids is not None else self.inputs_embeds).device

    def model_kwargs(self) -> dict:
        return dict(input_ids=self.input_ids, inputs_embeds=self.inputs_embeds)


# -- helpers shared by the adapters (torch only; nothing here imports transformers) --

class HFAdapter(Adapter):
    """Defaults for adapters of models with transformers' embedding accessors
    (`get_input_embeddings()` / `get_output_embeddings()`)."""

    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def vocab_size(self) -> int:
        head = self.model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if weight is None:
            return int(self.input_embeddings().weight.shape[0])
        return int(weight.shape[0])

    def __repr__(self) -> str:
        return f"<evofast {self.name} adapter of {type(self.model).__name__}, mask_id={self.mask_id}>"


def check_inputs(input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor], attention_mask: Optional[Tensor],
                 position_ids: Optional[Tensor], logits_from: int, max_length: Optional[int] = None):
    """Validate `Adapter.forward`'s arguments; -> (B, L). Failures are ValueErrors naming the argument."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids: expected a (B, L) integer tensor, got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
        B, L = input_ids.shape
    else:
        if inputs_embeds.dim() != 3 or not inputs_embeds.dtype.is_floating_point:
            raise ValueError(f"inputs_embeds: expected a (B, L, d) floating tensor, got "
                             f"{tuple(inputs_embeds.shape)} {inputs_embeds.dtype}")
        B, L = inputs_embeds.shape[:2]
    if attention_mask is not None and tuple(attention_mask.shape) != (B, L):
        raise ValueError(f"attention_mask: expected shape (B, L) = {(B, L)}, got {tuple(attention_mask.shape)}")
    if position_ids is not None:
        shape = tuple(position_ids.shape)
        if shape not in ((B, L), (1, L), (L,)) or position_ids.dtype.is_floating_point:
            raise ValueError(f"position_ids: expected an integer tensor of shape (B, L) = {(B, L)}, (1, L) or "
                             f"(L,), got {shape} {position_ids.dtype}")
    if isinstance(logits_from, bool) or not isinstance(logits_from, int) or not 0 <= logits_from <= L:
        raise ValueError(f"logits_from: expected an int in [0, L] = [0, {L}], got {logits_from!r}")
    if max_length is not None and L > max_length:
        raise ValueError(f"sequence length {L} exceeds the model's maximum of {max_length} positions")
    return B, L


def check_cached(cache, start: int, input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor],
                 attention_mask: Optional[Tensor], position_ids: Optional[Tensor], logits_from: Optional[int],
                 logits_to: Optional[int], max_length: Optional[int] = None):
    """Validate `Adapter.forward_cached`'s arguments; -> (b, n, L, logits_from, logits_to) with
    the logits bounds made relative to the window. ValueErrors naming the argument."""
    from ..cache import BlockKVCache
    if not isinstance(cache, BlockKVCache):
        raise ValueError(f"cache: expected an evofast.cache.BlockKVCache, got {type(cache).__name__}")
    if isinstance(start, bool) or not isinstance(start, int):
        raise ValueError(f"start: expected an int, got {start!r}")
    L = cache.length
    ref = input_ids if input_ids is not None else inputs_embeds
    b = ref.shape[0] if ref is not None and ref.dim() >= 2 else 0
    check_inputs(input_ids, inputs_embeds, None, None, 0)
    n = ref.shape[1]
    if not 1 <= b <= cache.batch:
        raise ValueError(f"input: {b} rows, the cache holds {cache.batch}")
    if not (0 <= start and start + n <= L):
        raise ValueError(f"start: window [{start}, {start + n}) outside the cached length {L}")
    check_inputs(torch.empty(b, L, dtype=torch.long, device="meta"), None, attention_mask, position_ids, 0, max_length)
    lo = start if logits_from is None else logits_from
    hi = start + n if logits_to is None else logits_to
    if not start <= lo <= hi <= start + n:
        raise ValueError(f"logits_from, logits_to: expected start <= from <= to <= start + n = {start + n}, "
                         f"got {lo}, {hi} (start {start})")
    return b, n, L, lo - start, hi - start


def keep_mask(attention_mask: Optional[Tensor]) -> Optional[Tensor]:
    """(B, L) with 1 = token, 0 = pad -> bool (B, L), True = a key that may be attended,
    or None when nothing is padded (one host sync; under torch.compile the mask is kept
    instead: a data-dependent branch would break the graph). A row without any real token
    keeps all its keys (meaningless but finite outputs, never NaN)."""
    if attention_mask is None:
        return None
    keep = attention_mask.bool()
    if not torch.compiler.is_compiling() and bool(keep.all()):
        return None
    return keep | ~keep.any(dim=-1, keepdim=True)


def default_positions(attention_mask: Optional[Tensor], position_ids: Optional[Tensor], length: int,
                      device: torch.device) -> Tensor:
    """The positions `Adapter.forward` uses: `position_ids` as given ((L,) -> (1, L)), else
    each row counted from its first real token of `attention_mask` (pad positions 0),
    else `arange(L)` of shape (1, L). int64."""
    if position_ids is not None:
        pos = position_ids.to(device=device, dtype=torch.int64)
        return pos[None] if pos.dim() == 1 else pos
    if attention_mask is None:
        return torch.arange(length, device=device)[None]
    mask = attention_mask.to(device=device, dtype=torch.int64)
    return (mask.cumsum(-1) - 1).clamp_min(0)


def additive_key_bias(keep: Optional[Tensor], batch: int, length: int, dtype: torch.dtype,
                      device: torch.device) -> Tensor:
    """Float (B, 1, 1, L) attention bias for a non-causal 4-D mask: 0 on kept keys,
    `finfo(dtype).min` on pad keys (zeros when `keep` is None)."""
    if keep is None:
        return torch.zeros(batch, 1, 1, length, dtype=dtype, device=device)
    bias = torch.zeros(keep.shape, dtype=dtype, device=device)
    bias.masked_fill_(~keep.to(device), torch.finfo(dtype).min)
    return bias[:, None, None, :]


_MISSING = object()


class InstancePatches:
    """Attributes set in live objects' instance ``__dict__`` (so they shadow class
    methods on that one instance only), undone by `undo` in reverse order.

    `undo` restores an attribute only while it still holds the value set here; one
    that something else has replaced since is left alone and reported."""

    def __init__(self):
        self._done = []

    def set(self, obj: object, name: str, value: object) -> None:
        had = name in obj.__dict__
        self._done.append((obj, name, value, had, obj.__dict__.get(name)))
        obj.__dict__[name] = value

    def undo(self) -> list:
        """-> descriptions of the attributes that could not be restored (replaced by someone else)."""
        skipped = []
        while self._done:
            obj, name, value, had, prev = self._done.pop()
            if obj.__dict__.get(name, _MISSING) is not value:
                skipped.append(f"{type(obj).__name__}.{name}")
                continue
            if had:
                obj.__dict__[name] = prev
            else:
                del obj.__dict__[name]
        return skipped

    def __len__(self) -> int:
        return len(self._done)


class MethodHook:
    """A callable put in a live object's instance ``__dict__`` in place of one of its
    methods: calls ``impl(owner, obj, original, *args, **kwargs)``, where `original` is
    what the name meant before (an earlier instance override, else the class's method
    bound to `obj`). `impl` must be a module-level function and `owner` the object whose
    state it reads, so a patched model survives ``copy.deepcopy`` (the hook is copied
    with the model, pointing at the copies) and pickling."""

    __slots__ = ("owner", "obj", "name", "impl", "prev")

    def __init__(self, owner: object, obj: object, name: str, impl):
        self.owner = owner
        self.obj = obj
        self.name = name
        self.impl = impl
        self.prev = obj.__dict__.get(name)

    def original(self):
        if self.prev is not None:
            return self.prev
        return getattr(type(self.obj), self.name).__get__(self.obj, type(self.obj))

    def __call__(self, *args, **kwargs):
        return self.impl(self.owner, self.obj, self.original(), *args, **kwargs)

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state):
        for k, v in state.items():
            object.__setattr__(self, k, v)

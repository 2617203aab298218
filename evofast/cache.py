"""`BlockKVCache`: preallocated per-layer key/value buffers for blockwise diffusion decoding.

Masked diffusion decoding recomputes the whole sequence at every step; a block
cache keeps the keys and values of the positions a step does not recompute:

* prefix cache: the finished blocks and the prompt, `[0, block_start)`;
* dual cache: also the still-masked suffix `[block_end, L)`.

Unlike an autoregressive cache nothing is appended: a forward over the window
`[start, start + n)` *replaces* those positions (`write`) and its queries read
the keys and values of the whole sequence `[0, length)` (`write` returns the
views). The buffers are allocated once, `(batch, kv_heads, length, head_dim)`
per layer in the model dtype, so a step allocates nothing and the per-step
forward has static shapes (CUDA-graph capturable). A forward on fewer rows
than `batch` uses the slots `[0, rows)`.

What a cached entry was computed from matters with soft tokens (its input was a
mixture that has moved on since), so the cache records, per position, the step
that last wrote it (`source`, -1: never): `generate` refreshes the whole
sequence at the first step of every block (and every `cache_refresh` steps).

Nothing here imports model code; the adapters (`evofast.models`) call `write`
from their attention.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["BlockKVCache", "transformers_cache"]


class BlockKVCache:
    """Keys and values of `n_layers` attention layers for `batch` sequences of `length` positions.

    Args:
        n_layers: attention layers (one key and one value buffer each).
        batch: rows (slots); a forward may use fewer, the first ones.
        kv_heads, head_dim: per layer, keys/values are `(batch, kv_heads, length, head_dim)`.
        length: sequence length L (prompt + generation).
        dtype, device: those of the keys the model computes (its parameters').

    Memory: `nbytes = 2 * n_layers * batch * kv_heads * length * head_dim * itemsize`, exactly.
    """

    def __init__(self, n_layers: int, batch: int, kv_heads: int, length: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None):
        for name, v in (("n_layers", n_layers), ("batch", batch), ("kv_heads", kv_heads), ("length", length),
                        ("head_dim", head_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        self.n_layers, self.batch, self.kv_heads = n_layers, batch, kv_heads
        self.length, self.head_dim, self.dtype = length, head_dim, dtype
        shape = (batch, kv_heads, length, head_dim)
        self.keys: List[Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values: List[Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        #: per position, the step whose forward last wrote it (-1: never); host-side bookkeeping
        self.source = torch.full((length,), -1, dtype=torch.long)

    @staticmethod
    def size_of(n_layers: int, batch: int, kv_heads: int, length: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes the buffers of such a cache take."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * n_layers * batch * kv_heads * length * head_dim * itemsize

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def _window(self, layer: int, start: int, n: int, rows: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.n_layers})")
        if not (0 <= start and start + n <= self.length):
            raise IndexError(f"window [{start}, {start + n}) outside the cached length {self.length}")
        if not 1 <= rows <= self.batch:
            raise IndexError(f"{rows} rows, the cache holds {self.batch}")

    def write(self, layer: int, start: int, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """Replace positions `[start, start + n)` of the first `b` slots of `layer` with `k`, `v`
        `(b, kv_heads, n, head_dim)` (in place, cast to the cache dtype); -> the layer's keys and
        values over the whole sequence, views `(b, kv_heads, length, head_dim)`."""
        b, h, n, d = k.shape
        if tuple(v.shape) != (b, h, n, d) or h != self.kv_heads or d != self.head_dim:
            raise ValueError(f"k, v: expected (b, {self.kv_heads}, n, {self.head_dim}) each, got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        self._window(layer, start, n, b)
        K, Vb = self.keys[layer][:b], self.values[layer][:b]
        K[:, :, start:start + n].copy_(k)
        Vb[:, :, start:start + n].copy_(v)
        return K, Vb

    def read(self, layer: int, start: int = 0, end: Optional[int] = None,
             rows: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """Views of the keys and values of positions `[start, end)` of the first `rows` slots."""
        end = self.length if end is None else end
        rows = self.batch if rows is None else rows
        self._window(layer, start, end - start, rows)
        return self.keys[layer][:rows, :, start:end], self.values[layer][:rows, :, start:end]

    def mark(self, start: int, end: int, step: int) -> None:
        """Record that the forward of `step` wrote positions `[start, end)` (every layer)."""
        self.source[start:end] = step

    def valid(self, start: int = 0, end: Optional[int] = None) -> bool:
        """Whether every position of `[start, end)` holds a written entry."""
        end = self.length if end is None else end
        return bool((self.source[start:end] >= 0).all())

    def reset(self) -> None:
        """Forget every entry (the buffers are kept; no allocation)."""
        self.source.fill_(-1)

    def __repr__(self) -> str:
        return (f"BlockKVCache(n_layers={self.n_layers}, batch={self.batch}, kv_heads={self.kv_heads}, "
                f"length={self.length}, head_dim={self.head_dim}, dtype={self.dtype}, "
                f"{self.nbytes / 2**20:.2f} MiB)")


_HF_CACHE_CLASS = None


def transformers_cache(cache: BlockKVCache, start: int):
    """A `transformers.Cache` whose `update(k, v, layer_idx)` replaces positions `[start, start + n)`
    of `cache` (`BlockKVCache.write`) and returns the whole sequence's keys and values, for
    transformers attention modules (Qwen2, BERT, RoBERTa) that call `past_key_values.update`.
    One is made per forward (a few attributes, no tensors). transformers is imported here only."""
    global _HF_CACHE_CLASS
    if _HF_CACHE_CLASS is None:
        from transformers import Cache

        class PositionalCache(Cache):
            """transformers' Cache API over an evofast BlockKVCache window (positional replace, no append)."""

            is_compileable = False

            def __init__(self, block: BlockKVCache, start: int):
                super().__init__(layers=[])
                self.block, self.start = block, start

            def update(self, key_states, value_states, layer_idx, *args, **kwargs):
                return self.block.write(layer_idx, self.start, key_states, value_states)

            def get_seq_length(self, layer_idx: int = 0) -> int:
                return self.block.length

            def get_mask_sizes(self, *args, **kwargs):
                return self.block.length, 0

        _HF_CACHE_CLASS = PositionalCache
    return _HF_CACHE_CLASS(cache, start)

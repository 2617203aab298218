"""Argument checks shared by the ops: each failure is a ValueError naming the argument."""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def fail(name: str, problem: str):
    raise ValueError(f"{name}: {problem}")


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def tensor(name: str, t, *, dim: int | None = None, dtypes=None, device=None) -> Tensor:
    if not isinstance(t, Tensor):
        fail(name, f"expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type == "meta":
        fail(name, "is on the meta device: it holds no values")
    if dim is not None and t.dim() != dim:
        fail(name, f"expected {dim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        fail(name, f"dtype {t.dtype} not supported; expected one of {[str(d) for d in dtypes]}")
    if device is not None and t.device != device:
        fail(name, f"is on {t.device}, expected {device} (the device of the logits / weight)")
    return t


def integer(name: str, v, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        fail(name, f"expected an int, got {v!r}")
    v = int(v)
    if not INT64_MIN <= v <= INT64_MAX:
        fail(name, f"must fit in int64, got {v}")
    if lo is not None and v < lo:
        fail(name, f"must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        fail(name, f"must be <= {hi}, got {v}")
    return v


def boolean(name: str, v) -> bool:
    if not isinstance(v, bool):
        fail(name, f"expected True or False, got {v!r}")
    return v


def real(name: str, v, lo: float | None = None, hi: float | None = None, *, hi_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        fail(name, f"expected a number, got {v!r}")
    v = float(v)
    if v != v or v in (float("inf"), float("-inf")):
        fail(name, f"must be finite, got {v}")
    if lo is not None and v < lo:
        fail(name, f"must be >= {lo}, got {v}")
    if hi is not None and (v >= hi if hi_open else v > hi):
        fail(name, f"must be {'<' if hi_open else '<='} {hi}, got {v}")
    return v


def per_row(name: str, v, B: int, lo: int, hi: int | None) -> Tensor:
    """An int or a (B,) integer tensor -> its (B,) int64 values on the host, in [lo, hi]
    (a tensor on a device is copied to the host: one sync)."""
    if isinstance(v, Tensor):
        if v.device.type == "meta":
            fail(name, "is on the meta device: it holds no values")
        if v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool:
            fail(name, f"expected an integer tensor, got dtype {v.dtype}")
        if v.dim() == 0:
            v = v.reshape(1).expand(B)
        if tuple(v.shape) != (B,):
            fail(name, f"expected an int or a tensor of shape ({B},), got shape {tuple(v.shape)}")
        host = v.detach().to("cpu", torch.int64).contiguous()
        if B and (int(host.min()) < lo or (hi is not None and int(host.max()) > hi)):
            fail(name, f"values must lie in [{lo}, {'inf' if hi is None else hi}], got {host.tolist()}")
        return host
    return torch.full((B,), integer(name, v, lo, hi), dtype=torch.int64)


def per_rows(device: torch.device, *rows: Tensor) -> list:
    """Host (B,) int64 rows -> the same rows on `device`. A row of one value (an int argument)
    becomes a device fill: asynchronous and capturable in a CUDA graph, where a copy from
    pageable host memory would synchronise the stream first; other rows go through pinned
    memory on CUDA (asynchronous too)."""
    if device.type == "cpu":
        return list(rows)
    out = []
    for r in rows:
        if r.numel() and bool((r == r[0]).all()):
            out.append(torch.full(r.shape, int(r[0]), dtype=torch.int64, device=device))
        elif device.type == "cuda":  # through pinned memory: an asynchronous copy
            out.append(r.pin_memory().to(device, non_blocking=True))
        else:
            out.append(r.to(device))
    return out


def sampling_filters(top_k, top_p) -> tuple:
    """(top_k, top_p) checked: None, or an int >= 1 / a number in (0, 1]."""
    if top_k is not None:
        top_k = integer("top_k", top_k, 1)
    if top_p is not None:
        top_p = real("top_p", top_p, 0.0, 1.0)
        if top_p == 0.0:
            fail("top_p", "must be > 0 (a nucleus holds at least one token)")
    return top_k, top_p

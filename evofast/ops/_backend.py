"""Which implementation runs an op: backend discovery, the user's choice, "auto".

Backends: "torch" (the reference, always there), "cpp" (evofast._C, CPU
tensors), "triton" (GPU tensors, or CPU tensors under TRITON_INTERPRET=1) and
"cuda" (evofast._C_cuda, GPU tensors). Nothing here compiles code or touches
CUDA at import; probes run on first use and are cached.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import warnings

import torch

log = logging.getLogger("evofast")

BACKENDS = ("torch", "cpp", "triton", "cuda")
_choice = os.environ.get("EVOFAST_BACKEND", "auto")


_probed: dict[str, bool] = {}  # a plain dict (not lru_cache) so torch.compile traces lookups cleanly


def _load_extension(name: str) -> bool:
    """Import evofast.<name> once; True when it loaded and registered its ops."""
    if name not in _probed:
        _probed[name] = _import_extension(name)
    return _probed[name]


def _import_extension(name: str) -> bool:
    try:
        importlib.import_module(f"evofast.{name}")
        return True
    except ImportError as err:  # not built, or built against another torch
        if name == "_C":
            warnings.warn(
                f"evofast._C could not be loaded ({err}); evofast falls back to the Triton / torch "
                "backends. Build it with `pip install --no-build-isolation -e .`.",
                RuntimeWarning, stacklevel=3)
        else:
            log.info("evofast.%s not available: %s", name, err)
        return False


def has_cpp() -> bool:
    return _load_extension("_C")


def has_cuda_kernels() -> bool:
    return torch.cuda.is_available() and has_cpp() and _load_extension("_C_cuda")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def has_triton() -> bool:
    if "triton" not in _probed:
        _probed["triton"] = importlib.util.find_spec("triton") is not None
    return _probed["triton"]


def backends() -> list[str]:
    """Names of the backends usable in this process, fastest last."""
    names = ["torch"]
    if has_cpp():
        names.append("cpp")
    if has_triton() and (torch.cuda.is_available() or triton_interpreted()):
        names.append("triton")
    if has_cuda_kernels():
        names.append("cuda")
    return names


def set_backend(name: str) -> None:
    """Force one backend for every op ("auto" restores the automatic pick).

    An explicit backend that cannot run on the given tensors raises when an op
    is called; "auto" falls back silently.
    """
    global _choice
    _check_name(name)
    _choice = name


def _check_name(name) -> None:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend: must be 'auto' or one of {BACKENDS}, got {name!r}")


def get_backend() -> str:
    return _choice


def usable(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "cpp":
        return device.type == "cpu" and has_cpp()
    if name == "triton":
        return has_triton() and (device.type == "cuda" or (device.type == "cpu" and triton_interpreted()))
    if name == "cuda":
        return device.type == "cuda" and has_cuda_kernels()
    return False


def resolve(device: torch.device, backend: str | None = None) -> str:
    """The backend an op on `device` runs with: explicit > set_backend > auto."""
    name = backend or _choice
    if name == "auto":
        order = ("cuda", "triton") if device.type == "cuda" else ("cpp",)
        return next((b for b in order if usable(b, device)), "torch")
    _check_name(name)
    if not usable(name, device):
        hint = {"cpp": "evofast._C is not built or the tensors are not on the CPU",
                "cuda": "evofast._C_cuda is not built or the tensors are not on a GPU",
                "triton": "triton is missing, or CPU tensors without TRITON_INTERPRET=1"}[name]
        raise RuntimeError(f"backend {name!r} cannot run on {device.type} tensors here: {hint}")
    return name

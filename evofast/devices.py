"""Small device helpers every layer may use (they import nothing of evofast's)."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["synchronize", "pick_device"]


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): for honest timings."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_device(name: Optional[str]) -> torch.device:
    """"auto" / None: a GPU when there is one, else the CPU; otherwise the named device
    (SystemExit when it names a GPU that is not there)."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    return dev

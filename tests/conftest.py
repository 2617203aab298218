"""Shared fixtures: which backends to test and on which device.

Collection never touches a GPU: torch.cuda.is_available() only asks the driver.
Without a GPU, Triton kernels run in the interpreter on CPU tensors.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from evofast.ops import _backend  # noqa: E402

FUSED = ("cpp", "triton", "cuda")


def backend_device(name: str) -> torch.device:
    if name == "cpp":
        return torch.device("cpu")
    if name == "triton":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device("cuda")


def skip_unless_usable(name: str):
    dev = backend_device(name)
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    if not _backend.usable(name, dev):
        pytest.skip(f"backend {name} not usable here")
    return dev


@pytest.fixture(params=FUSED)
def fused(request):
    """(backend name, device) for every fused backend usable here."""
    return request.param, skip_unless_usable(request.param)


@pytest.fixture
def one_torch_thread():
    """Tiny models: a second torch thread only adds synchronisation (and is very slow on a busy
    2-core CI machine). Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""Backend discovery and choice."""
import os
import subprocess
import sys

import pytest
import torch

import evofast
from evofast.ops import _backend


def test_cpp_backend_is_built():
    # make test builds evofast._C; a silent fallback to torch would hide a broken build.
    assert "cpp" in evofast.ops.backends()


def test_triton_available_in_tests():
    assert "triton" in evofast.ops.backends()


def test_auto_picks_cpp_on_cpu():
    assert _backend.resolve(torch.device("cpu")) == "cpp"


def test_set_backend_roundtrip():
    try:
        evofast.set_backend("torch")
        assert _backend.resolve(torch.device("cpu")) == "torch"
    finally:
        evofast.set_backend("auto")
    with pytest.raises(ValueError, match="backend"):
        evofast.set_backend("fortran")


def test_explicit_unusable_backend_raises():
    if torch.cuda.is_available():
        pytest.skip("cuda is usable here")
    with pytest.raises(RuntimeError, match="cuda"):
        _backend.resolve(torch.device("cpu"), "cuda")


def test_import_compiles_nothing_and_touches_no_cuda():
    code = ("import sys, evofast, torch; "
            "assert 'evofast._C' not in sys.modules; "
            "assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_env_var_choice():
    code = "import evofast, torch; from evofast.ops import _backend; print(_backend.resolve(torch.device('cpu')))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "EVOFAST_BACKEND": "torch"}).stdout
    assert out.strip() == "torch"

"""The CUDA sources under csrc/cuda compile cleanly, with no GPU needed.

* every ``.cu`` file compiles with nvcc for sm_80 and sm_90a with every warning
  an error (nvcc front end, ptxas and the host compiler), with the flags the
  real build uses (setup.py's plus torch's CUDAExtension defaults);
* the kernels stay torch-free: no ``.cu`` / ``.cuh`` / ``.h`` under csrc/cuda
  includes a torch, ATen, c10, pybind11 or Python header;
* ``evofast_cuda.h`` is plain C++ (the binding's host compiler includes it);
* ``bindings_cuda.cpp`` passes a syntax check against the installed torch's
  headers when they include the c10 CUDA headers (CPU wheels do).

Skipped cleanly where nvcc (or a host compiler) is not on PATH. The compiles
run in parallel, once per session; on two cores the module takes about three
minutes (evo_step.cu alone about 2.5 minutes per architecture).
"""
from __future__ import annotations

import concurrent.futures
import os
import pathlib
import re
import shutil
import subprocess
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = {
    "sm80": "arch=compute_80,code=sm_80",
    "sm90a": "arch=compute_90a,code=sm_90a",
}
# setup.py's nvcc flags, torch's CUDAExtension defaults, and warnings as errors.
NVCC_FLAGS = [
    "-std=c++17", "-O3", "--use_fast_math", "-lineinfo",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
    "-Werror", "all-warnings",  # cudafe --promote_warnings, ptxas --warning-as-error
    "-Xcompiler=-Wall,-Wextra,-Werror",
    "-I", str(ROOT / "csrc"),
]
TIMEOUT_S = 300
FORBIDDEN_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10|caffe2|pybind11|Python)\b', re.M)


def _nvcc() -> str:
    path = shutil.which("nvcc")
    if path is None:
        pytest.skip("nvcc is not on PATH")
    return path


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)


def _cuda_include_dir(nvcc: str) -> str:
    """The CUDA include directory nvcc itself uses (nvcc may be a wrapper script)."""
    res = _run([nvcc, "--dryrun", "-x", "c++", "-E", os.devnull])
    m = re.search(r'INCLUDES="-I([^"]+)"', res.stdout + res.stderr)
    if m is None:
        pytest.skip("cannot find nvcc's include directory")
    return m.group(1).strip()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(file name, arch) -> CompletedProcess, all compiled in parallel once."""
    nvcc = _nvcc()
    out = tmp_path_factory.mktemp("cuda_objs")
    jobs = {
        (cu.name, arch): [nvcc, *NVCC_FLAGS, "-gencode", gencode, "-c", str(cu),
                          "-o", str(out / f"{cu.stem}.{arch}.o")]
        for cu in CU_FILES for arch, gencode in ARCHS.items()
    }
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {key: pool.submit(_run, cmd) for key, cmd in jobs.items()}
        return {key: f.result() for key, f in futures.items()}


def test_there_are_cuda_sources():
    assert CU_FILES, f"no .cu files under {CUDA_DIR}"
    assert (CUDA_DIR / "evofast_cuda.h").is_file()
    assert (CUDA_DIR / "bindings_cuda.cpp").is_file()


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("cu", [p.name for p in CU_FILES])
def test_cu_compiles_without_warnings(compiled, cu, arch):
    res = compiled[(cu, arch)]
    assert res.returncode == 0, f"nvcc failed on {cu} for {arch}:\n{res.stdout}\n{res.stderr}"
    # -Werror already fails on warnings; also catch anything nvcc merely prints.
    text = (res.stdout + res.stderr).strip()
    assert "warning" not in text.lower(), f"nvcc printed diagnostics for {cu} ({arch}):\n{text}"


@pytest.mark.parametrize(
    "src", [p.name for p in sorted(CUDA_DIR.iterdir()) if p.suffix in (".cu", ".cuh", ".h")])
def test_kernels_are_torch_free(src):
    text = (CUDA_DIR / src).read_text()
    bad = FORBIDDEN_INCLUDE.findall(text)
    assert not bad, f"{src} includes torch / Python headers ({bad}); only CUDA headers are allowed"


def test_launcher_header_is_plain_cpp(tmp_path):
    nvcc = _nvcc()
    src = tmp_path / "use_header.cpp"
    src.write_text('#include "cuda/evofast_cuda.h"\n'
                   "int main() { return static_cast<int>(evofast::cuda::DType::kFloat32); }\n")
    res = _run([nvcc, "-x", "c++", "-std=c++17", "-Xcompiler=-Wall,-Wextra,-Werror",
                "-I", str(ROOT / "csrc"), "-c", str(src), "-o", str(tmp_path / "use_header.o")])
    assert res.returncode == 0, res.stdout + res.stderr


def test_binding_syntax(tmp_path):
    """g++ -fsyntax-only on bindings_cuda.cpp against the installed torch headers."""
    nvcc = _nvcc()
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler on PATH")
    torch = pytest.importorskip("torch")
    from torch.utils.cpp_extension import include_paths

    incs = include_paths()
    if not any((pathlib.Path(p) / "c10" / "cuda" / "CUDAGuard.h").is_file() for p in incs):
        pytest.skip("this torch ships no c10/cuda headers")
    # CPU wheels lack this generated header; a CUDA torch has the real one (found first).
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cuda_inc = _cuda_include_dir(nvcc)
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-I", str(ROOT / "csrc")]
    for p in incs:
        cmd += ["-isystem", p]
    cmd += ["-isystem", str(tmp_path / "stub"), "-isystem", str(cuda_inc),
            "-isystem", sysconfig.get_paths()["include"],
            f"-D_GLIBCXX_USE_CXX11_ABI={int(getattr(torch._C, '_GLIBCXX_USE_CXX11_ABI', True))}",
            str(CUDA_DIR / "bindings_cuda.cpp")]
    res = _run(cmd)
    assert res.returncode == 0, res.stdout + res.stderr

"""Build evofast and its compiled kernels.

`evofast._C` (the C++ CPU kernels and the op schemas) is built whenever torch is
importable at build time; `evofast._C_cuda` (the CUDA kernels) additionally when
torch has CUDA and nvcc is found. The CUDA part is an optional extension: a
failure there leaves a working CPU install.

Build with the torch you already have (never a second one):
    pip install --no-build-isolation -e .

Environment switches:
    EVOFAST_SKIP_BUILD=1        pure-Python install (torch / Triton backends only)
    EVOFAST_SKIP_CUDA_BUILD=1   never build the CUDA part
    EVOFAST_FORCE_CUDA=1        build the CUDA part even if torch sees no GPU
                                (needs a CUDA torch and nvcc)
    EVOFAST_CUDA_ARCHS="8.0;9.0a"  architectures for nvcc (TORCH_CUDA_ARCH_LIST wins)
    MAX_JOBS                    parallel compile jobs (honoured by torch)
"""
import glob
import os

from setuptools import setup


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("EVOFAST_SKIP_BUILD"):
        print("evofast: EVOFAST_SKIP_BUILD set, building no extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("evofast: torch is not importable in the build environment; installing without "
              "the compiled kernels. Use `pip install --no-build-isolation .` to build them.")
        return [], {}

    # -fopenmp: at::parallel_for is header-inline and runs threads only under OpenMP
    # (the library it links, libgomp, is the one torch itself ships).
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    exts = [
        CppExtension(
            "evofast._C",
            sorted(["csrc/bindings.cpp"] + glob.glob("csrc/cpu/*.cpp")),
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]
    want_cuda = not _flag("EVOFAST_SKIP_CUDA_BUILD") and torch.version.cuda is not None and CUDA_HOME is not None
    if want_cuda and not (torch.cuda.is_available() or _flag("EVOFAST_FORCE_CUDA")):
        print("evofast: no GPU visible; set EVOFAST_FORCE_CUDA=1 to build the CUDA kernels anyway")
        want_cuda = False
    if want_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("EVOFAST_CUDA_ARCHS", "8.0;9.0a")
        exts.append(
            CUDAExtension(
                "evofast._C_cuda",
                sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")),
                include_dirs=[os.path.abspath("csrc")],
                extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                    "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
                optional=True,  # setuptools: a failed build warns instead of failing the install
            )
        )
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

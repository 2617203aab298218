"""evofast: exact, fast EvoToken soft-token decoding and CTS training for masked
diffusion language models.

Importing evofast compiles nothing and never touches CUDA.
"""
from . import ops
from .generation import generate
from .models import get_adapter, patch, unpatch
from .ops import set_backend

__version__ = "0.1.0"
__all__ = ["ops", "set_backend", "generate", "patch", "unpatch", "get_adapter", "__version__"]

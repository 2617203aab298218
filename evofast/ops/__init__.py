"""evofast's kernels: `evo_step` (one fused EvoToken decoding step) and
`soft_embed` (the soft-token embedding gather), each with torch / cpp / triton /
cuda backends behind `torch.library` custom ops."""
from ._backend import backends, get_backend, set_backend
from .evo_step import NonFiniteLogitsError, evo_step
from .linear_ce import LinearCrossEntropyFunction, linear_cross_entropy
from .soft_embed import SoftEmbedFunction, soft_embed
from .stdd import STDD, stdd_reset, stdd_state

__all__ = ["evo_step", "soft_embed", "SoftEmbedFunction", "NonFiniteLogitsError",
           "linear_cross_entropy", "LinearCrossEntropyFunction",
           "backends", "set_backend", "get_backend", "STDD", "stdd_state", "stdd_reset"]

"""`evofast.generate` (kept importable from here; the decoding engine lives in `evofast.decode`)."""
from .decode import CACHES, MODES, generate

__all__ = ["generate", "MODES", "CACHES"]

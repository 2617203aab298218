"""Model code for evofast: one small module per architecture.

`evofast.models.llada` is evofast's own implementation of the LLaDA-8B
architecture (it needs transformers, so it is imported on use, not here).
"""

from .registry import get_adapter, patch, unpatch  # noqa: E402  (torch only; adapters load on use)

__all__ = ["patch", "unpatch", "get_adapter"]

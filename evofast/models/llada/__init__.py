"""evofast's LLaDA: the LLaDA-8B architecture written from scratch with LLaDA's checkpoint names
(`model.py`). A model, not an adapter: its adapter is `evofast.models.adapters.llada_native`."""
from .model import *  # noqa: F401,F403
from .model import __all__ as _model_all
from .model import LLaDALayerNorm  # noqa: F401  (tests build one directly)

__all__ = list(_model_all)

"""The model forward of one step: the rows still generating, logits of the window rows only."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["ModelForward"]


class ModelForward:
    """Runs the adapter's forward (or `forward_cached` with a cache) for a step and returns the
    logits of the window rows [step.row0, step.end). With `compile` the forward goes through
    `torch.compile` (CUDA graphs on a GPU); a compile failure warns once and runs eagerly."""

    #: graphs per call: a prefix / dual window starts at every block (ints are specialised)
    RECOMPILE_LIMIT = 256

    def __init__(self, adapter, config, state):
        from .cache_plan import CachePlan

        self.adapter = adapter
        self.kv = adapter.new_cache(state.B, state.L) if config.cache is not None else None
        self.plan = (CachePlan(config.cache, config.cache_refresh, adapter.cache_lead, state.L)
                     if self.kv is not None else None)
        self.eager = adapter.forward if self.kv is None else adapter.forward_cached
        self.compiled = None
        if config.compile:
            self._compile(config.cache)

    def __call__(self, state, step, xs):
        kw = state.attention_kwargs(step)
        if self.kv is None:
            logits = self._run(**state.model_inputs(step, xs, 0, state.L), logits_from=step.row0, **kw)
            want = state.L
        else:
            a, b, want = self.plan.window(state, step)
            logits = self._run(**state.model_inputs(step, xs, a, b), cache=self.kv, start=a,
                               logits_from=step.row0, logits_to=want, **kw)
            self.kv.mark(a, b, step.index)
        if logits.shape[1] != want - step.row0:
            raise RuntimeError(f"the adapter returned logits for {logits.shape[1]} rows, expected "
                               f"{want - step.row0} (rows [{step.row0}, {want}))")
        if logits.dtype == torch.float64:
            logits = logits.float()
        return logits if want <= step.end else logits[:, :step.end - step.row0]

    # ------------------------------------------------------------------ torch.compile
    def _compile(self, cache: Optional[str]):
        try:
            on_cuda = self.adapter.input_embeddings().weight.is_cuda
            if on_cuda and self.kv is not None:                  # CUDA graphs may then write them in place
                for t in self.kv.keys + self.kv.values:
                    torch._dynamo.mark_static_address(t)
            self.compiled = torch.compile(self.eager, mode="reduce-overhead" if on_cuda else None,
                                          dynamic=False if cache == "dual" else None)
        except Exception as e:                                   # noqa: BLE001 (any failure: eager)
            self._fall_back(e)

    def _fall_back(self, err):
        import warnings
        warnings.warn(f"evofast.generate(compile=True): torch.compile is unavailable here "
                      f"({type(err).__name__}: {err}); running eagerly", RuntimeWarning, stacklevel=4)
        self.compiled = None

    def _run(self, **kw):
        if self.compiled is not None:
            try:
                with torch._dynamo.config.patch(recompile_limit=self.RECOMPILE_LIMIT):
                    return self.compiled(**kw)
            except Exception as e:                               # noqa: BLE001
                self._fall_back(e)
        return self.eager(**kw)

"""Observers: code that watches a generation step by step without changing it.

`generate(..., observers=[...])` calls every observer's hooks; nothing else
reaches into the loop. The hooks, in order:

    on_start(state)                      before the first forward
    before_forward(state, step)          per step: the model forward ...
    after_forward(state, step, logits)   ... returned the window's logits
    after_evo_step(state, step, out)     the step (evo_step) returned `out`
    end_of_step(state, step, out)        the state has moved on (blocks advanced)
    on_end(state)                        after the last step (also on an error)

`out` is a `StepOutput`: the window's logits and what evo_step gave. Built in:
`ProgressBar` (tqdm), `TraceRecorder` (the `Trace` of `return_trace=True`) and
`StepTimer` (device-synchronised seconds in the forward and in evo_step, for
benchmarks).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from ..devices import synchronize

__all__ = ["Observer", "StepOutput", "ProgressBar", "TraceRecorder", "StepTimer"]


@dataclass
class StepOutput:
    logits: Tensor            # (rows stepped, window rows, V)
    ids: Tensor               # evo_step's new representation ids (rows stepped, window rows, k + 1)
    w: Tensor                 # and weights
    transfer: Tensor          # (rows stepped, window rows) bool: decoded by this step


class Observer:
    """Base class: every hook is a no-op."""

    def on_start(self, state) -> None:
        pass

    def before_forward(self, state, step) -> None:
        pass

    def after_forward(self, state, step, logits: Tensor) -> None:
        pass

    def after_evo_step(self, state, step, out: StepOutput) -> None:
        pass

    def end_of_step(self, state, step, out: StepOutput) -> None:
        pass

    def on_end(self, state) -> None:
        pass


class ProgressBar(Observer):
    """A tqdm bar over the forwards (its total: the steps, when the policy fixes them)."""

    def __init__(self, policy):
        self.fixed = policy.fixed_steps
        self.bar = None

    def on_start(self, state) -> None:
        from tqdm.auto import tqdm
        self.bar = tqdm(total=state.config.steps if self.fixed else None, desc="evofast generate", unit="step")

    def end_of_step(self, state, step, out) -> None:
        blocks = state.config.blocks
        self.bar.update(1)
        self.bar.set_postfix(block=f"{min(min(state.block), blocks - 1) + 1}/{blocks}", refresh=False)

    def on_end(self, state) -> None:
        if self.bar is None:
            return
        if self.bar.total is not None and self.bar.n != self.bar.total:
            self.bar.total = self.bar.n
            self.bar.refresh()
        self.bar.close()


class StepTimer(Observer):
    """Seconds inside the model forwards and inside evo_step, each bracketed by device
    synchronisations (which slow the generation a little: time it apart)."""

    def __init__(self, device):
        self.device = device
        self.forward_s = self.evo_step_s = 0.0
        self.forwards = 0
        self._t = None

    def before_forward(self, state, step) -> None:
        synchronize(self.device)
        self._t = time.perf_counter()

    def after_forward(self, state, step, logits) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.forward_s += now - self._t
        self.forwards += 1
        self._t = now

    def after_evo_step(self, state, step, out) -> None:
        synchronize(self.device)
        self.evo_step_s += time.perf_counter() - self._t


class TraceRecorder(Observer):
    """Records the `Trace` of a generation (`evofast.trace`): the state before the first forward and
    after every step."""

    def __init__(self):
        self.trace = None

    def on_start(self, state) -> None:
        from ..trace import Trace
        c = state.config
        self.trace = Trace(mode=c.mode, mask_id=state.mask_id, prompt_length=state.P, gen_length=c.gen_length,
                           block_length=c.block_length, steps_per_block=c.steps_per_block, k_soft=c.k_soft,
                           alpha=c.alpha, pad=list(state.pads))
        self._record(state, -1, [], [-1] * state.B, (state.L, state.L), None)

    def end_of_step(self, state, step, out) -> None:
        row0 = step.row0
        self._record(state, step.index, step.rows, step.blocks, (row0, row0 + out.logits.shape[1]), out.logits)

    def _record(self, state, index, rows, blocks, window, lg: Optional[Tensor]) -> None:
        from ..trace import record_step
        soft = state.config.soft
        self.trace.records.append(record_step(
            index, rows, blocks, window, state.x, state.conf, state.rep_ids if soft else None,
            state.rep_w if soft else None, state.mask_id, state.config.k_soft, self.trace.records,
            lg=lg, temperature=state.config.temperature))

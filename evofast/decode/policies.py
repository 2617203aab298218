"""Transfer policies: which eligible positions a step decodes.

A policy turns the state of the rows being stepped into the transfer arguments of
`evofast.ops.evo_step`; a new policy is one small class:

    Schedule()        the authors' schedule: each block's masks split evenly over its
                      steps (`DecodeConfig.schedule`), one token per extra step when
                      mask tokens in the prompt used up the schedule
    Threshold(tau)    every eligible position whose confidence is at least tau, in order
                      of confidence, the most confident always (parallel decoding); the
                      number of forwards then depends on the model: `steps` sets nothing
                      (a block takes at most block_length forwards)
    Stdd(STDD(...))   a threshold per position that rises while the position's confidence
                      still moves (over its last few steps in the block) or its logits
                      disagree with its neighbours' (`evofast.ops.STDD`); with both lambdas
                      0 it is `Threshold(tau)` exactly. Like Threshold, `steps` sets nothing.

`generate(policy=...)` takes a policy object (or an `evofast.ops.STDD`, for `Stdd` of it);
each call works on its own copy, so one object can serve many calls.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from ..ops import STDD, stdd_state

__all__ = ["TransferPolicy", "Schedule", "Threshold", "Stdd", "policy_for", "per_row"]


def per_row(values: list):
    """Per-row ints -> an int when they are all equal (no tensor), else a (B,) tensor."""
    first = values[0]
    if all(v == first for v in values):
        return first
    return torch.tensor(values, dtype=torch.long)


class TransferPolicy:
    """Base class: `step_kwargs(state, step)` gives evo_step's transfer arguments,
    `after_step(state, step)` runs once evo_step has updated the stepped rows."""

    name = "base"
    #: forwards per block are the schedule's (a progress bar knows its total)
    fixed_steps = False

    def start(self, state) -> None:
        """Called once before the first forward."""
        self.schedule = state.config.schedule()

    def step_kwargs(self, state, step) -> dict:
        raise NotImplementedError

    def after_step(self, state, step) -> None:
        """Called after each evo_step (nothing to do for a policy without state)."""

    def _scheduled(self, state, step):
        s = len(self.schedule)
        return per_row([self.schedule[state.step_in_block[r]] if state.step_in_block[r] < s else 1
                        for r in step.rows])


class Schedule(TransferPolicy):
    name = "schedule"
    fixed_steps = True

    def step_kwargs(self, state, step) -> dict:
        return {"num_transfer": self._scheduled(state, step), "threshold": None}


class Threshold(TransferPolicy):
    name = "threshold"

    def __init__(self, tau: float):
        self.tau = tau

    def step_kwargs(self, state, step) -> dict:
        # num_transfer is ignored by evo_step under a threshold; the schedule's value keeps it valid
        return {"num_transfer": self._scheduled(state, step), "threshold": self.tau}


class Stdd(TransferPolicy):
    """STDD's per-position thresholds (`evofast.ops.STDD`, docs/semantics.md). Owns the
    confidence history the rule reads: one ring of `window` values per position, emptied for
    a block's positions when a row starts that block."""

    name = "stdd"

    def __init__(self, params: Optional[STDD] = None):
        if params is None:
            params = STDD()
        if not isinstance(params, STDD):
            raise ValueError(f"policy: Stdd takes an evofast.ops.STDD, got {type(params).__name__}")
        self.params = params

    def start(self, state) -> None:
        super().start(state)
        self.history, self.count = stdd_state(state.B, state.L, self.params.window, state.x.device)
        self._rows = None

    def step_kwargs(self, state, step) -> dict:
        bl = state.config.block_length
        for j, r in enumerate(step.rows):
            if state.step_in_block[r] == 0:                      # the row's block starts
                self.count[r, step.block_start[j]:step.block_start[j] + bl] = 0
        # rows that stopped generating are not stepped: theirs are copies, written back after
        self._rows = (step.rows_of(self.history), step.rows_of(self.count))
        return {"num_transfer": self._scheduled(state, step), "threshold": None, "stdd": self.params,
                "stdd_history": self._rows[0], "stdd_count": self._rows[1]}

    def after_step(self, state, step) -> None:
        if step.sel is not None:
            self.history.index_copy_(0, step.sel, self._rows[0])
            self.count.index_copy_(0, step.sel, self._rows[1])
        self._rows = None


def policy_for(threshold: Optional[float], policy=None) -> TransferPolicy:
    """The policy a `generate` call asks for (arguments already checked by DecodeConfig): a fresh
    copy of `policy`, `Stdd(policy)` for an STDD, else Threshold / Schedule from `threshold`."""
    if isinstance(policy, STDD):
        return Stdd(policy)
    if policy is not None:
        return copy.copy(policy)
    return Schedule() if threshold is None else Threshold(threshold)

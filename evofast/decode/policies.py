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
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["TransferPolicy", "Schedule", "Threshold", "policy_for", "per_row"]


def per_row(values: list):
    """Per-row ints -> an int when they are all equal (no tensor), else a (B,) tensor."""
    first = values[0]
    if all(v == first for v in values):
        return first
    return torch.tensor(values, dtype=torch.long)


class TransferPolicy:
    """Base class: `step_kwargs(state, step)` gives evo_step's transfer arguments."""

    name = "base"
    #: forwards per block are the schedule's (a progress bar knows its total)
    fixed_steps = False

    def start(self, state) -> None:
        """Called once before the first forward."""
        self.schedule = state.config.schedule()

    def step_kwargs(self, state, step) -> dict:
        raise NotImplementedError

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


def policy_for(threshold: Optional[float]) -> TransferPolicy:
    """The policy `generate(threshold=...)` asks for."""
    return Schedule() if threshold is None else Threshold(threshold)

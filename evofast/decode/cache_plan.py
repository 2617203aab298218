"""`CachePlan`: with a KV cache, which positions each forward runs.

A *refresh* forward runs the whole sequence from exactly the inputs the uncached
loop would use and writes every position's keys and values; its step is the
uncached step. Refreshes happen at the first step of every block of any row,
when the set of rows still generating changes (the cache's slots follow the
rows), every `cache_refresh` forwards, and when a step's window reaches below
the refreshed one. Between refreshes a forward runs only the window: "prefix"
the rows [lo, L) (lo: the window start at the refresh), "dual" the rows
[lo, last block end); the other positions' keys and values come from the cache
as the refresh left them (approximate by design, as in Fast-dLLM).
"""
from __future__ import annotations

from typing import Optional

__all__ = ["CachePlan"]


class CachePlan:
    def __init__(self, kind: str, refresh_every: Optional[int], lead: int, length: int):
        self.kind, self.every, self.lead, self.L = kind, refresh_every, lead, length
        self.rows = None                 # the rows whose slots the cache holds
        self.lo = length                 # window start at the last refresh
        self.since = 0                   # forwards since the last refresh

    def window(self, state, step) -> tuple:
        """(a, b, want): run positions [a, b), return logits of rows [step.row0, want)."""
        refresh = (self.rows != step.rows or step.row0 < self.lo
                   or any(state.step_in_block[r] == 0 for r in step.rows)
                   or (self.every is not None and self.since >= self.every))
        self.since += 1
        if refresh:                                              # the whole sequence, as uncached
            self.lo, self.rows, self.since = step.row0, list(step.rows), 1
            return 0, self.L, step.end
        a = max(0, self.lo - self.lead)
        b = self.L if self.kind == "prefix" else max(step.block_end)
        return a, b, min(b, step.end)

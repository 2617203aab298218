"""`StepStream`: an observer that hands every step of a running generation to the page.

It records steps exactly as `generate(..., return_trace=True)` does (it is a
`TraceRecorder`) and turns each into the data the trace page draws
(`evofast.trace.step_payload`), so the live page and the static one show the same
thing. Events, in order (dicts, one JSON line each on the wire):

    {"event": "start", "meta": ..., "row": ..., "vocab": ...}    before the first forward
    {"event": "step", "step": ..., "vocab": ...}                 the state before the first
                                                                 forward, then after each step
Only batch row 0 is streamed (the demo runs one prompt). "vocab" holds the text of the
token ids first named by that event. Setting `stop` ends the generation before its next
forward (`Cancelled` is raised through `generate`).
"""
from __future__ import annotations

import threading
from typing import Callable

from ..decode import TraceRecorder
from ..trace import page_meta, page_vocab, row_start, step_payload

__all__ = ["StepStream", "Cancelled"]


class Cancelled(Exception):
    """The generation was stopped."""


class StepStream(TraceRecorder):
    def __init__(self, tokenizer, emit: Callable[[dict], None], stop: threading.Event):
        super().__init__()
        self.tokenizer, self.emit, self.stop = tokenizer, emit, stop
        self.sent: set = set()          # token ids whose text the page has
        self.first = None               # the first position the page shows

    def on_start(self, state) -> None:
        super().on_start(state)
        trace = self.trace
        row = row_start(trace.records[0], 0, int(trace.pad[0]), trace.prompt_length, trace.mask_id)
        self.first = row["first"]
        self.emit({"event": "start", "meta": page_meta(trace), "row": row, "vocab": self._new_vocab(row["prompt"])})
        self._send_last()

    def before_forward(self, state, step) -> None:
        if self.stop.is_set():
            raise Cancelled()

    def end_of_step(self, state, step, out) -> None:
        super().end_of_step(state, step, out)
        self._send_last()
        del self.trace.records[:-1]     # the next step needs only this one (its transfers)

    def _send_last(self) -> None:
        used: set = set()
        payload = step_payload(self.trace.records[-1], 0, self.first, used)
        self.emit({"event": "step", "step": payload, "vocab": self._new_vocab(used)})

    def _new_vocab(self, ids) -> dict:
        new = set(ids) - self.sent
        self.sent |= new
        return page_vocab(self.tokenizer, new, self.trace.mask_id)

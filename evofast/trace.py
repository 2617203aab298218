"""What `evofast.generate(..., return_trace=True)` records, and its HTML page.

A `Trace` holds the state of every position before the first step and after
each step (one `TraceStep` per model forward): the token record `x`, the
confidence record, the representation the next forward reads (its ids and
weights), the position's state and the model's top-k prediction at that step.

States, by the representation the next forward reads:

    mask       x = M, plain E[M]            (before the first forward; mask tokens of the prompt)
    soft-mask  x = M, soft: top-k + E[M]    (Soft(MASK u V))
    soft       x decoded, soft: top-k       (Soft(V))
    decoded    x decoded, plain E[x]        ([Decode]; the prompt too)

`to_html(trace, tokenizer=None, path=None)` renders one self-contained page
(no network): per batch row, a grid of steps x positions coloured by state with
the intensity of the confidence (token chosen) or of the top-1 probability
(masked), rings on the positions whose token was chosen or revised at that step,
the top-k on hover, and a step slider over the text. The page's template, style
sheet and scripts are package data (evofast/trace_page), inlined into the page:
view.js draws steps as they come (the live `evofast demo` page draws with it
too, fed by `row_start`, `step_payload`, `page_meta` and `page_vocab`), page.js
hands it a finished trace.
"""
from __future__ import annotations

import functools
import html
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

__all__ = ["Trace", "TraceStep", "to_html", "record_step", "STATE_NAMES", "MASK", "SOFT_MASK", "SOFT", "DECODED",
           "row_start", "step_payload", "page_meta", "page_vocab", "page_asset", "token_text"]

MASK, SOFT_MASK, SOFT, DECODED = 0, 1, 2, 3
STATE_NAMES = ("mask", "soft-mask", "soft", "decoded")


@dataclass
class TraceStep:
    """The sequence after one step (tensors on the CPU; B = batch, L = P + gen_length).

    step:      index of the forward (0-based); -1 for the state before the first forward.
    rows:      batch rows the step post-processed (rows already done are left out).
    block:     per batch row, the block it was in at this step (-1: done).
    window:    (row0, end): the sequence rows whose logits the step read.
    x:         (B, L) int64 token record after the step.
    conf:      (B, L) float64 confidence record after the step.
    state:     (B, L) uint8, one of MASK / SOFT_MASK / SOFT / DECODED: what the next forward reads.
    rep_ids:   (B, L, k + 1) int64 and rep_w (B, L, k + 1) float32: that representation
               (top-k ids then x, and their weights; plain rows weigh x alone).
    transfer:  (B, L) bool: positions decoded by this step.
    topk_ids:  (B, L, k) int64 and topk_p (B, L, k) float32: the model's top-k prediction at this
               step (softmax in float64, the mask token excluded as the step excludes it);
               -1 / NaN outside the window and for rows that did not step.
    """
    step: int
    rows: list
    block: list
    window: tuple
    x: Tensor
    conf: Tensor
    state: Tensor
    rep_ids: Tensor
    rep_w: Tensor
    transfer: Tensor
    topk_ids: Tensor
    topk_p: Tensor


@dataclass
class Trace:
    """Everything `generate` did, step by step (see the module docstring)."""
    mode: str
    mask_id: int
    prompt_length: int            # P, the (padded) prompt width of input_ids
    gen_length: int
    block_length: int
    steps_per_block: int
    k_soft: int
    alpha: float
    pad: list                     # left pads per batch row
    records: list = field(default_factory=list)   # TraceStep, the first one (step -1) before any forward

    @property
    def batch_size(self) -> int:
        return len(self.pad)

    @property
    def num_steps(self) -> int:
        """Forwards run (records after the initial one)."""
        return max(len(self.records) - 1, 0)

    def states(self, row: int = 0) -> Tensor:
        """(records, L) uint8: each position's state over time for one batch row."""
        return torch.stack([r.state[row] for r in self.records])

    def tokens(self, row: int = 0) -> Tensor:
        """(records, L) int64: the token record over time for one batch row."""
        return torch.stack([r.x[row] for r in self.records])

    def to_html(self, tokenizer=None, path=None, *, title: Optional[str] = None, rows=None) -> str:
        """Same as `evofast.trace.to_html(self, tokenizer, path)`."""
        return to_html(self, tokenizer, path, title=title, rows=rows)


def record_step(step: int, rows: list, block: list, window: tuple, x: Tensor, conf: Tensor,
                rep_ids: Optional[Tensor], rep_w: Optional[Tensor], mask_id: int, k: int, records: list, *,
                lg: Optional[Tensor] = None, temperature: float = 0.0) -> TraceStep:
    """A TraceStep of the state after a step of the batch rows `rows` (CPU copies). `lg`: their
    window logits, (len(rows), R, V) from row window[0]; None before the first forward. `records`:
    the steps recorded so far (the last one gives the transfers)."""
    B, L = x.shape
    M, row0 = mask_id, window[0]
    xc = x.detach().to("cpu").clone()
    if rep_w is None:
        rid = torch.zeros(B, L, k + 1, dtype=torch.long)
        rid[..., k] = xc
        rw = torch.zeros(B, L, k + 1, dtype=torch.float32)
        rw[..., k] = 1
    else:
        rid = rep_ids.detach().to("cpu").clone()
        rw = rep_w.detach().to("cpu", torch.float32)
    topk_ids = torch.full((B, L, k), -1, dtype=torch.long)
    topk_p = torch.full((B, L, k), float("nan"), dtype=torch.float32)
    transfer = torch.zeros(B, L, dtype=torch.bool)
    if lg is not None:                                           # row by row: no (B, R, V) temporaries
        R = lg.shape[1]
        for j, r in enumerate(rows):
            lr = lg[j].float()
            if temperature == 0:                                 # as the step: M out of the softmax
                lr = lr.clone()
                lr[:, M] = -torch.inf
            top, ti = lr.topk(k, dim=-1)
            tp = (top - torch.logsumexp(lr, dim=-1, keepdim=True)).exp()
            topk_ids[r, row0:row0 + R] = ti.cpu()
            topk_p[r, row0:row0 + R] = tp.cpu()
        transfer = (records[-1].x == M) & (xc != M)
    state = state_of(xc, None if rep_w is None else rw, M)
    return TraceStep(step=step, rows=list(rows), block=list(block), window=tuple(window), x=xc,
                     conf=conf.detach().to("cpu").clone(), state=state, rep_ids=rid, rep_w=rw, transfer=transfer,
                     topk_ids=topk_ids, topk_p=topk_p)


def state_of(x: Tensor, rep_w: Optional[Tensor], mask_id: int) -> Tensor:
    """(B, L) uint8 states from the token record and the representation weights (None: all plain)."""
    masked = x == mask_id
    if rep_w is None:
        plain = torch.ones_like(masked)
    else:
        plain = (rep_w[..., :-1] == 0).all(dim=-1)
    state = torch.where(masked, torch.where(plain, MASK, SOFT_MASK), torch.where(plain, DECODED, SOFT))
    return state.to(torch.uint8)


# --------------------------------------------------------------------------- HTML
_SLOT = re.compile(r"__(TITLE|CSS|JS|DATA)__")


@functools.lru_cache(maxsize=1)
def _page_parts() -> dict:
    """The page template, the stylesheet and the script it inlines (package data in evofast/trace_page:
    view.js draws steps, page.js draws a finished trace with it; `evofast demo` serves view.js too)."""
    parts = {key: page_asset(name) for key, name in (("HTML", "page.html"), ("CSS", "page.css"))}
    parts["JS"] = page_asset("view.js") + "\n" + page_asset("page.js")
    for key in ("CSS", "JS"):                   # inlined: they must not end their element early
        if re.search(r"</(script|style)", parts[key], re.I):
            raise RuntimeError(f"evofast/trace_page: the {key.lower()} file contains a closing </script> or </style>")
    return parts


def page_asset(name: str) -> str:
    """The text of a file of the trace page's package data (evofast/trace_page/NAME)."""
    return (resources.files("evofast") / "trace_page" / name).read_text(encoding="utf-8")


def token_text(tokenizer, tid: int, mask_id: int) -> str:
    """How the page shows token `tid`: [M] for the mask, the tokenizer's text, else the id."""
    if tid == mask_id:
        return "[M]"
    if tokenizer is None:
        return str(tid)
    for fn in (lambda: tokenizer.decode([tid], skip_special_tokens=False),
               lambda: tokenizer.convert_ids_to_tokens(tid)):
        try:
            text = fn()
        except Exception:  # noqa: BLE001 - any tokenizer quirk falls back to the id
            continue
        if isinstance(text, str):
            return text
    return str(tid)


def _rounded(t: Tensor, nd: int = 4) -> list:
    """t's values rounded to nd decimals, as (nested) lists; rounded by torch, as Python's round
    is slow enough to dominate a live page's steps."""
    return t.double().mul(10 ** nd).round().div(10 ** nd).tolist()


def _none_if_nan(v: float):
    return None if v != v else v


def row_start(first: TraceStep, b: int, pad: int, prompt_length: int, mask_id: int) -> dict:
    """What the page knows of batch row `b` (with `pad` left pads) from the record before the first
    forward: the first position its grid shows (the prompt's first mask token, else the first
    generated position) and the prompt tokens before it."""
    x0 = first.x[b]
    prompt_masks = (x0[pad:prompt_length] == mask_id).nonzero().flatten()
    lo = pad + int(prompt_masks[0]) if prompt_masks.numel() else prompt_length
    return {"row": b, "pad": pad, "first": lo, "prompt": x0[pad:lo].tolist()}


def step_payload(rec: TraceStep, b: int, lo: int, used: set) -> dict:
    """One step of batch row `b` as the page draws it: positions [lo, L) (`row_start`'s "first");
    every token id it names is added to `used` (the page's vocabulary)."""
    x = rec.x[b, lo:].tolist()
    used.update(x)
    tid = rec.topk_ids[b, lo:].tolist()
    tp = _rounded(rec.topk_p[b, lo:])
    for ids in tid:
        used.update(i for i in ids if i >= 0)
    rid = rec.rep_ids[b, lo:].tolist()
    rw = _rounded(rec.rep_w[b, lo:])
    for ids, ws in zip(rid, rw):
        used.update(i for i, w in zip(ids, ws) if w > 0)
    return {
        "step": rec.step,
        "block": int(rec.block[b]) if rec.block else -1,
        "window": list(rec.window),
        "x": x,
        "conf": [_none_if_nan(c) for c in _rounded(rec.conf[b, lo:])],
        "state": rec.state[b, lo:].tolist(),
        "transfer": [int(t) for t in rec.transfer[b, lo:].tolist()],
        "topk": [[[i, _none_if_nan(p)] for i, p in zip(ids, ps) if i >= 0] for ids, ps in zip(tid, tp)],
        "rep": [[[i, w] for i, w in zip(ids, ws) if w > 0] for ids, ws in zip(rid, rw)],
    }


def page_meta(trace: Trace) -> dict:
    """The settings the page shows (and the state names it colours)."""
    return {"mode": trace.mode, "mask_id": trace.mask_id, "prompt_length": trace.prompt_length,
            "gen_length": trace.gen_length, "block_length": trace.block_length,
            "steps_per_block": trace.steps_per_block, "k_soft": trace.k_soft, "alpha": trace.alpha,
            "forwards": trace.num_steps, "states": list(STATE_NAMES)}


def page_vocab(tokenizer, ids, mask_id: int) -> dict:
    """id (as a string) -> the text the page shows for it."""
    return {str(i): token_text(tokenizer, int(i), mask_id) for i in sorted(ids)}


def _row_payload(trace: Trace, b: int, used: set) -> dict:
    start = row_start(trace.records[0], b, int(trace.pad[b]), trace.prompt_length, trace.mask_id)
    used.update(start["prompt"])
    steps = [step_payload(rec, b, start["first"], used) for rec in trace.records if rec.step < 0 or b in rec.rows]
    return {**start, "steps": steps}


def to_html(trace: Trace, tokenizer=None, path=None, *, title: Optional[str] = None, rows=None) -> str:
    """Render `trace` as one self-contained HTML page; write it to `path` when given; return it.

    `tokenizer` (optional) turns ids into text (`decode([id])`, else
    `convert_ids_to_tokens`); without one the page shows ids. `rows`: the batch
    rows to show (default all; a page holds steps x positions cells per row).
    """
    if not isinstance(trace, Trace):
        raise TypeError(f"trace: expected an evofast.trace.Trace, got {type(trace).__name__}")
    if not trace.records:
        raise ValueError("trace: no records (was it returned by generate(..., return_trace=True)?)")
    shown = range(trace.batch_size) if rows is None else [int(r) for r in rows]
    for r in shown:
        if not 0 <= r < trace.batch_size:
            raise ValueError(f"rows: {r} is not a batch row of this trace (B = {trace.batch_size})")
    used: set = set()
    rows = [_row_payload(trace, b, used) for b in shown]
    vocab = page_vocab(tokenizer, used, trace.mask_id)
    meta = page_meta(trace)
    data = json.dumps({"meta": meta, "vocab": vocab, "rows": rows}, separators=(",", ":"))
    data = data.replace("<", "\\u003c")        # no token text can close or comment out the <script> element
    title = title or f"evofast generate trace ({trace.mode})"
    parts = dict(_page_parts(), TITLE=html.escape(title), DATA=data)
    page = _SLOT.sub(lambda m: parts[m.group(1)], parts["HTML"])      # one pass: nothing inserted is re-read
    if path is not None:
        Path(path).write_text(page, encoding="utf-8")
    return page


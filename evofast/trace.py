"""What `evofast.generate(..., return_trace=True)` records, and its HTML page.

A `Trace` holds the state of every position before the first step and after
each step (one `TraceStep` per model forward): the token record `x`, the
confidence record, the representation the next forward reads (its ids and
weights), the position's state and the model's top-k prediction at that step.

States (spec/evotoken.md section 1), by the representation the next forward reads:

    mask       x = M, plain E[M]            (before the first forward; mask tokens of the prompt)
    soft-mask  x = M, soft: top-k + E[M]    (Soft(MASK u V))
    soft       x decoded, soft: top-k       (Soft(V))
    decoded    x decoded, plain E[x]        ([Decode]; the prompt too)

`to_html(trace, tokenizer=None, path=None)` renders one self-contained page
(inline CSS and JavaScript, no network): per batch row, a grid of steps x
positions coloured by state with the intensity of the confidence (decoded) or of
the top-1 probability (masked / soft), the top-k on hover, and a step slider over
the text.
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

__all__ = ["Trace", "TraceStep", "to_html", "record_step", "STATE_NAMES", "MASK", "SOFT_MASK", "SOFT", "DECODED"]

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
def _token_text(tokenizer, tid: int, mask_id: int) -> str:
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


def _r(v: float, nd: int = 4):
    return None if (v is None or math.isnan(v)) else round(float(v), nd)


def _row_payload(trace: Trace, b: int, used: set) -> dict:
    P, L = trace.prompt_length, trace.prompt_length + trace.gen_length
    first = trace.records[0]
    x0 = first.x[b]
    pad = int(trace.pad[b])
    prompt_masks = (x0[pad:P] == trace.mask_id).nonzero().flatten()
    lo = pad + int(prompt_masks[0]) if prompt_masks.numel() else P        # first position shown in the grid
    steps = []
    for rec in trace.records:
        if rec.step >= 0 and b not in rec.rows:
            continue
        x = rec.x[b, lo:L].tolist()
        used.update(x)
        tid = rec.topk_ids[b, lo:L].tolist()
        tp = rec.topk_p[b, lo:L].tolist()
        for ids in tid:
            used.update(i for i in ids if i >= 0)
        rid = rec.rep_ids[b, lo:L].tolist()
        rw = rec.rep_w[b, lo:L].tolist()
        steps.append({
            "step": rec.step,
            "block": int(rec.block[b]) if rec.block else -1,
            "window": list(rec.window),
            "x": x,
            "conf": [_r(c) for c in rec.conf[b, lo:L].tolist()],
            "state": rec.state[b, lo:L].tolist(),
            "transfer": [int(t) for t in rec.transfer[b, lo:L].tolist()],
            "topk": [[[i, _r(p)] for i, p in zip(ids, ps) if i >= 0] for ids, ps in zip(tid, tp)],
            "rep": [[[i, _r(w)] for i, w in zip(ids, ws) if w and w > 0] for ids, ws in zip(rid, rw)],
        })
        for ids, ws in zip(rid, rw):
            used.update(i for i, w in zip(ids, ws) if w and w > 0)
    prompt = x0[pad:lo].tolist()
    used.update(prompt)
    return {"row": b, "pad": pad, "first": lo, "prompt": prompt, "steps": steps}


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
    vocab = {str(i): _token_text(tokenizer, int(i), trace.mask_id) for i in sorted(used)}
    meta = {"mode": trace.mode, "mask_id": trace.mask_id, "prompt_length": trace.prompt_length,
            "gen_length": trace.gen_length, "block_length": trace.block_length,
            "steps_per_block": trace.steps_per_block, "k_soft": trace.k_soft, "alpha": trace.alpha,
            "forwards": trace.num_steps, "states": list(STATE_NAMES)}
    data = json.dumps({"meta": meta, "vocab": vocab, "rows": rows}, separators=(",", ":"))
    data = data.replace("</", "<\\/")           # nothing in the JSON can close the <script> element
    title = title or f"evofast generate trace ({trace.mode})"
    page = _PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", data)
    if path is not None:
        Path(path).write_text(page, encoding="utf-8")
    return page


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.2em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .3em; }
h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
.meta { color: #555; margin-bottom: .6em; }
.legend span.sw { display: inline-block; width: 1.1em; height: 1.1em; vertical-align: middle; margin: 0 .3em 0 .9em;
  border-radius: 2px; border: 1px solid #0002; }
.prompt { white-space: pre-wrap; background: #f3f3f3; padding: .4em .6em; border-radius: 4px; }
.text { white-space: pre-wrap; font-family: ui-monospace, Menlo, Consolas, monospace; line-height: 1.9; }
.text .tok { padding: 1px 1px; border-radius: 3px; margin-right: 1px; }
.controls { margin: .5em 0; }
.controls input[type=range] { width: 40em; max-width: 70vw; vertical-align: middle; }
.gridwrap { overflow: auto; max-height: 70vh; border: 1px solid #ddd; }
table.grid { border-collapse: collapse; font: 10px ui-monospace, Menlo, Consolas, monospace; }
table.grid td, table.grid th { padding: 0; }
table.grid th { position: sticky; top: 0; background: #fff; font-weight: normal; color: #777; min-width: 14px; }
table.grid th.stepno { position: sticky; left: 0; z-index: 2; }
table.grid td.stepno { position: sticky; left: 0; background: #fff; color: #777; padding-right: 4px; text-align: right; }
td.cell { width: 14px; height: 14px; min-width: 14px; border: 1px solid #fff; cursor: default; }
td.cell.blk { border-left: 2px solid #333; }
td.cell.tr { outline: 2px solid #000; outline-offset: -2px; }
tr.sel td.stepno { background: #ffe08a; }
#tip { position: fixed; pointer-events: none; background: #222; color: #eee; padding: .45em .6em; border-radius: 4px;
  font: 12px ui-monospace, Menlo, Consolas, monospace; white-space: pre; display: none; z-index: 10; max-width: 40em; }
</style>
</head>
<body>
<h1>__TITLE__</h1>
<div class="meta" id="meta"></div>
<div class="legend" id="legend"></div>
<div id="rows"></div>
<div id="tip"></div>
<script type="application/json" id="trace-data">__DATA__</script>
<script>
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("trace-data").textContent);
  const M = D.meta, V = D.vocab;
  const HUE = [0, 275, 35, 135];            // mask, soft-mask, soft, decoded
  const tok = (i) => (V[String(i)] !== undefined ? V[String(i)] : String(i));
  const show = (s) => JSON.stringify(s).slice(1, -1);
  function colour(state, c) {
    c = (c === null || c === undefined || isNaN(c)) ? 0 : Math.max(0, Math.min(1, c));
    if (state === 0) return "hsl(0, 0%, 80%)";
    const light = 92 - 50 * c;
    return "hsl(" + HUE[state] + ", " + (state === 3 ? 55 : 75) + "%, " + light + "%)";
  }
  function strength(s, j) {            // confidence when decoded, else the top-1 probability
    if (s.state[j] === 3 || s.state[j] === 2) return s.conf[j] || (s.topk[j][0] ? s.topk[j][0][1] : 0);
    return s.topk[j][0] ? s.topk[j][0][1] : 0;
  }
  let CMAX = 1e-9;                      // colours are relative to the most confident value on the page
  D.rows.forEach((row) => row.steps.forEach((s) => s.x.forEach((_, j) => { CMAX = Math.max(CMAX, strength(s, j)); })));
  const shade = (s, j) => colour(s.state[j], Math.sqrt(strength(s, j) / CMAX));
  const el = (tag, attrs, text) => {
    const e = document.createElement(tag);
    for (const k in (attrs || {})) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  document.getElementById("meta").textContent =
    "mode " + M.mode + " | gen_length " + M.gen_length + " | block_length " + M.block_length +
    " | steps per block " + M.steps_per_block + " | k_soft " + M.k_soft + " | alpha " + M.alpha +
    " | prompt width " + M.prompt_length + " | " + M.forwards + " forwards | mask id " + M.mask_id;
  const legend = document.getElementById("legend");
  legend.appendChild(document.createTextNode("state:"));
  M.states.forEach((name, s) => {
    const sw = el("span", {class: "sw"}); sw.style.background = colour(s, 0.75);
    legend.appendChild(sw); legend.appendChild(document.createTextNode(name));
  });
  legend.appendChild(document.createTextNode("  (darker = more confident: confidence once decoded, else top-1 probability, " +
    "relative to the page's highest, " + CMAX.toFixed(3) + "; outlined = decoded at that step; hover a cell for the top-k)"));
  const tip = document.getElementById("tip");
  function describe(row, s, j) {
    const pos = row.first + j;
    let t = "position " + pos + " (gen " + (pos - M.prompt_length) + ")  step " + s.step +
            (s.block >= 0 ? "  block " + s.block : "") + "\\nstate " + M.states[s.state[j]] +
            "  x = " + (s.x[j] === M.mask_id ? "[M]" : '"' + show(tok(s.x[j])) + '" (' + s.x[j] + ")") +
            "  confidence " + (s.conf[j] === null ? "-" : s.conf[j].toFixed(4)) +
            (s.transfer[j] ? "  decoded now" : "");
    if (s.topk[j].length) {
      t += "\\ntop-" + s.topk[j].length + " prediction:";
      s.topk[j].forEach(([i, p]) => { t += "\\n  " + (p === null ? "-" : p.toFixed(4)) + '  "' + show(tok(i)) + '" (' + i + ")"; });
    }
    if (s.rep[j].length && !(s.rep[j].length === 1 && s.rep[j][0][1] === 1)) {
      t += "\\nnext input (soft weights):";
      s.rep[j].forEach(([i, w]) => { t += "\\n  " + w.toFixed(4) + '  "' + show(tok(i)) + '" (' + i + ")"; });
    }
    return t;
  }
  function text(row, s, into) {
    into.textContent = "";
    s.x.forEach((x, j) => {
      const span = el("span", {class: "tok"}, x === M.mask_id ? "\\u2591" : tok(x));
      span.style.background = shade(s, j);
      span.dataset.j = j;
      into.appendChild(span);
    });
  }
  const root = document.getElementById("rows");
  D.rows.forEach((row) => {
    const sec = el("section", {class: "row", "data-row": row.row});
    sec.appendChild(el("h2", {}, "batch row " + row.row + (row.pad ? " (" + row.pad + " pad token" + (row.pad > 1 ? "s" : "") + ")" : "")));
    sec.appendChild(el("div", {class: "prompt"}, row.prompt.map(tok).join("")));
    const controls = el("div", {class: "controls"});
    const label = el("span", {});
    const slider = el("input", {type: "range", min: 0, max: row.steps.length - 1, value: row.steps.length - 1});
    controls.appendChild(el("span", {}, "step "));
    controls.appendChild(slider);
    controls.appendChild(label);
    sec.appendChild(controls);
    const txt = el("div", {class: "text"});
    sec.appendChild(txt);
    const wrap = el("div", {class: "gridwrap"});
    const table = el("table", {class: "grid"});
    const head = el("tr", {});
    head.appendChild(el("th", {class: "stepno"}, "step"));
    const ncol = row.steps[0].x.length;
    for (let j = 0; j < ncol; j++) {
      const pos = row.first + j;
      head.appendChild(el("th", {}, (pos - M.prompt_length) % 8 === 0 ? String(pos - M.prompt_length) : ""));
    }
    table.appendChild(head);
    const trs = [];
    row.steps.forEach((s, si) => {
      const tr = el("tr", {"data-step": s.step});
      tr.appendChild(el("td", {class: "stepno"}, s.step < 0 ? "init" : String(s.step)));
      for (let j = 0; j < ncol; j++) {
        const pos = row.first + j;
        let cls = "cell";
        if (pos >= M.prompt_length && (pos - M.prompt_length) % M.block_length === 0) cls += " blk";
        if (s.transfer[j]) cls += " tr";
        const td = el("td", {class: cls, "data-pos": pos, "data-state": M.states[s.state[j]]});
        td.style.background = shade(s, j);
        td.addEventListener("mouseenter", () => { tip.textContent = describe(row, s, j); tip.style.display = "block"; });
        td.addEventListener("mousemove", (ev) => {
          tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8) + "px";
          tip.style.top = Math.min(ev.clientY + 14, window.innerHeight - tip.offsetHeight - 8) + "px";
        });
        td.addEventListener("mouseleave", () => { tip.style.display = "none"; });
        td.addEventListener("click", () => { slider.value = si; update(); });
        tr.appendChild(td);
      }
      trs.push(tr);
      table.appendChild(tr);
    });
    wrap.appendChild(table);
    sec.appendChild(wrap);
    function update() {
      const si = Number(slider.value), s = row.steps[si];
      label.textContent = "  " + (s.step < 0 ? "before the first forward" : "after step " + s.step +
        (s.block >= 0 ? " (block " + s.block + ")" : ""));
      text(row, s, txt);
      trs.forEach((tr, k) => tr.classList.toggle("sel", k === si));
    }
    txt.addEventListener("mouseover", (ev) => {
      const j = ev.target.dataset ? ev.target.dataset.j : undefined;
      if (j === undefined) return;
      tip.textContent = describe(row, row.steps[Number(slider.value)], Number(j)); tip.style.display = "block";
    });
    txt.addEventListener("mousemove", (ev) => { tip.style.left = (ev.clientX + 14) + "px"; tip.style.top = (ev.clientY + 14) + "px"; });
    txt.addEventListener("mouseout", () => { tip.style.display = "none"; });
    slider.addEventListener("input", update);
    update();
    root.appendChild(sec);
  });
  document.body.setAttribute("data-rendered", "1");
})();
</script>
</body>
</html>
"""

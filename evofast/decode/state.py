"""`DecodeState`: what a batch of generations holds between forwards.

Per row: the token record x and confidence record conf (evo_step updates them),
the block it is in and its step within that block, the forwards it took part
in, and the first mask token left in its prompt. For the batch: the soft
representation (ids and weights per position, the next forward's input) and
`soft_from`, the first position that reads it (everything before is [Decode]).

Rows move on independently: every forward steps every row still generating;
a row whose block holds no mask after a step starts its next block at the next
forward, and a row done with its last block drops out (`Step.rows`). Each row
therefore sees exactly the forwards and steps of its batch-1 run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import DecodeConfig

__all__ = ["DecodeState", "Step"]


@dataclass
class Step:
    """One forward and step: the rows still generating and their window."""

    index: int                 # the forward's index (0-based)
    rows: list                 # batch rows still generating
    block_start: list          # per such row
    block_end: list
    row0: int                  # first row a step can change (block start or a prompt mask)
    end: int                   # last row (exclusive) whose logits the step reads
    sel: Optional[Tensor]      # index of `rows` in the batch (None: every row)
    blocks: list               # per batch row, its block at this step (-1: done)

    def rows_of(self, t: Tensor) -> Tensor:
        return t if self.sel is None else t.index_select(0, self.sel)


class DecodeState:
    """The decoding state of a batch (see the module docstring)."""

    def __init__(self, input_ids: Tensor, am: Optional[Tensor], pads: list, config: DecodeConfig, mask_id: int,
                 embedding: Tensor):
        self.config = config
        self.mask_id = M = mask_id
        self.E = embedding
        device = embedding.device
        B, P = input_ids.shape
        self.B, self.P, self.L = B, P, P + config.gen_length
        self.input_ids, self.pads = input_ids, list(pads)
        self.real = torch.ones(B, P, dtype=torch.bool, device=device) if am is None else am.bool()
        self.x = torch.full((B, self.L), M, dtype=torch.long, device=device)
        self.x[:, :P] = input_ids
        self.full_mask = self.position_ids = None
        if am is not None:                                       # pads: never eligible, never masked
            self.x[:, :P] = torch.where(self.real, input_ids, torch.full_like(input_ids, 0 if M != 0 else 1))
            self.full_mask = torch.cat([am, torch.ones(B, config.gen_length, dtype=am.dtype, device=device)], 1)
            self.position_ids = (self.full_mask.cumsum(dim=1) - 1).clamp_min(0)
        self.conf = torch.zeros(B, self.L, dtype=torch.float64, device=device)
        prompt_masks = (self.x[:, :P] == M) & self.real
        self.first_pm = [self.L] * B                             # first mask left in each prompt (L: none)
        if bool(prompt_masks.any()):
            has = prompt_masks.any(dim=1).tolist()
            idx = prompt_masks.to(torch.int8).argmax(dim=1).tolist()
            self.first_pm = [i if h else self.L for i, h in zip(idx, has)]
        self.track_prompt_masks = any(f < P for f in self.first_pm)
        self.block = [0] * B                                     # current block per row (blocks: done)
        self.step_in_block = [0] * B
        self.row_forwards = [0] * B
        self.rep_ids = self.rep_w = None                         # (B, L, k + 1), made at the first step
        self.soft_from = self.L                                  # rows below it read plain E[x]
        self.forwards = 0
        self.pos = torch.arange(self.L, device=device)

    # ------------------------------------------------------------------ the next step
    def next_step(self) -> Optional[Step]:
        """The rows still generating and their window, or None when every row is done."""
        c = self.config
        rows = [r for r in range(self.B) if self.block[r] < c.blocks]
        if not rows:
            return None
        bs = [self.P + self.block[r] * c.block_length for r in rows]
        be = [b + c.block_length for b in bs]
        row0 = min(min(bs), min(self.first_pm[r] for r in rows))
        sel = None if len(rows) == self.B else torch.tensor(rows, device=self.x.device)
        blocks = [b if b < c.blocks else -1 for b in self.block]
        return Step(self.forwards, rows, bs, be, row0, self.L if c.soft else max(be), sel, blocks)

    def attention_kwargs(self, step: Step) -> dict:
        if self.full_mask is None:
            return {}
        return dict(attention_mask=step.rows_of(self.full_mask), position_ids=step.rows_of(self.position_ids))

    def model_inputs(self, step: Step, xs: Tensor, a: int, b: int) -> dict:
        """Model inputs of positions [a, b): plain E[x] below soft_from, the soft tokens from it."""
        from ..ops import soft_embed

        if self.soft_from >= b:
            return dict(input_ids=xs[:, a:b])
        cut = max(a, self.soft_from)
        mixed = soft_embed(self.E, step.rows_of(self.rep_ids[:, cut:b]), step.rows_of(self.rep_w[:, cut:b]),
                           backend=self.config.backend, check_ids=False)
        if cut == a:
            return dict(inputs_embeds=mixed.to(self.E.dtype))
        plain = F.embedding(xs[:, a:cut], self.E)
        return dict(inputs_embeds=torch.cat([plain, mixed.to(plain.dtype)], dim=1))

    # ------------------------------------------------------------------ after the step
    def write_back(self, step: Step, xs: Tensor, cs: Tensor) -> None:
        """Copy the stepped rows' records back into the batch (a no-op when every row stepped)."""
        if step.sel is not None:
            self.x.index_copy_(0, step.sel, xs)
            self.conf.index_copy_(0, step.sel, cs)

    def set_representation(self, step: Step, ids: Tensor, w: Tensor) -> None:
        """The soft representation the next forward reads: the step's ids / weights on its rows,
        [Decode] below its window (those positions are final for this block)."""
        c = self.config
        if self.rep_ids is None:
            self.rep_ids = torch.zeros(self.B, self.L, c.k_soft + 1, dtype=torch.long, device=self.x.device)
            self.rep_ids[..., c.k_soft] = self.x
            self.rep_w = torch.zeros(self.B, self.L, c.k_soft + 1, dtype=w.dtype, device=self.x.device)
            self.rep_w[..., c.k_soft] = 1
        row0 = step.row0
        hi = row0 + ids.shape[1]                                 # < L: a dual-cache step (suffix kept)
        rows = slice(None) if step.sel is None else step.sel
        self.rep_ids[rows, row0:hi] = ids
        self.rep_w[rows, row0:hi] = w
        if self.soft_from < row0:
            self.rep_w[rows, self.soft_from:row0] = _one_hot_last(c.k_soft, w.dtype, w.device)
        self.soft_from = row0

    def advance(self, step: Step, xs: Tensor) -> None:
        """Per stepped row: count the step, and start the next block when this one holds no mask
        (one host sync per step)."""
        c, M = self.config, self.mask_id
        bs = step.block_start
        if all(b == bs[0] for b in bs):
            counts = (xs[:, bs[0]:bs[0] + c.block_length] == M).sum(dim=1)
        else:
            bs_t = torch.tensor(bs, device=xs.device)[:, None]
            counts = ((xs == M) & (self.pos >= bs_t) & (self.pos < bs_t + c.block_length)).sum(dim=1)
        if self.track_prompt_masks:
            pm = (xs[:, :self.P] == M) & step.rows_of(self.real)
            first = torch.where(pm.any(dim=1), pm.to(torch.int8).argmax(dim=1), self.L)
            counts = torch.stack([counts, first])
        counts = counts.tolist()
        left = counts[0] if self.track_prompt_masks else counts
        for j, r in enumerate(step.rows):
            self.step_in_block[r] += 1
            self.row_forwards[r] += 1
            if self.track_prompt_masks:
                self.first_pm[r] = counts[1][j]
            if left[j] == 0:
                self.block[r] += 1
                self.step_in_block[r] = 0
        self.forwards += 1

    def decoded_tokens(self) -> int:
        """Generated positions already in a finished block, over the batch (a progress measure)."""
        return sum(min(b, self.config.blocks) for b in self.block) * self.config.block_length

    def output(self) -> Tensor:
        """The prompts (pads as given) and the generated tokens."""
        out = self.x
        if self.full_mask is not None:
            P = self.P
            out[:, :P] = torch.where(self.real, out[:, :P], self.input_ids)   # prompt masks stay filled
        return out


_ONE_HOT = {}


def _one_hot_last(k_soft, dtype, device):
    key = (k_soft, dtype, device)
    t = _ONE_HOT.get(key)
    if t is None:
        t = _ONE_HOT[key] = torch.zeros(k_soft + 1, dtype=dtype, device=device)
        t[k_soft] = 1
    return t

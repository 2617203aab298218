"""STDD: a per-position dynamic threshold for the transfer rule (docs/semantics.md, "STDD").

`STDD` holds the parameters. The caller owns the temporal history that `evo_step` reads and
updates: `stdd_state` allocates it, `stdd_reset` clears positions when their block starts. The
torch functions below are the reference (the executable definition) that every fused backend
is tested against.

Definition, per batch row and step, for every eligible window row `i` with confidence `q_i`:

* `TV_i`: population standard deviation of the last `window` confidences recorded at position
  `i` (this step's `q_i` included); 0 with fewer than two values.
* `SD_i = 1 - cos(l_i, m_i)`: `l_i` the row's logits without the mask column, `m_i` the mean of
  the rows `l_j`, `0 < |j - i| <= radius`, of the same window; 0 without a neighbour or when a
  norm is 0 or not finite; clamped to `[0, 2]`.
* `tau_i = clamp(tau + lam_t * TV_i + lam_s * SD_i, tau_min, tau_max)` (a term whose lambda is 0
  is 0, whatever its value).
* Transfer every eligible row with `q_i >= tau_i`; when none passes, the eligible row that
  comes first in the order (`q_i - tau_i` larger, then `q_i` larger, then the smaller position).
  With `lam_t = lam_s = 0` every `tau_i` is `tau` and this is the global threshold rule exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import Tensor

from . import _checks

MAX_WINDOW = 64
MAX_RADIUS = 16


@dataclass(frozen=True)
class STDD:
    """Parameters of the STDD transfer rule (see the module docstring).

    The defaults are provisional placeholders for probability-like confidences
    (remasking "low_confidence" / "topk_margin"): they will be chosen on a validation split
    of the quality study. `tau_min <= tau <= tau_max` is required, so that zero lambdas give
    the global threshold `tau` exactly; `tau_min` / `tau_max` may be infinite (no clamp).
    """

    tau: float = 0.9
    lam_t: float = 1.0
    lam_s: float = 1.0
    tau_min: float = 0.0
    tau_max: float = 1.0
    window: int = 3
    radius: int = 1

    def __post_init__(self):
        for name in ("tau", "lam_t", "lam_s"):
            object.__setattr__(self, name, _checks.real(name, getattr(self, name)))
        for name in ("tau_min", "tau_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                _checks.fail(name, f"expected a number (or +-inf), got {v!r}")
            object.__setattr__(self, name, float(v))
        if not self.tau_min <= self.tau <= self.tau_max:
            _checks.fail("tau", f"must lie in [tau_min, tau_max] = [{self.tau_min}, {self.tau_max}], "
                                f"got {self.tau}")
        object.__setattr__(self, "window", _checks.integer("window", self.window, 1, MAX_WINDOW))
        object.__setattr__(self, "radius", _checks.integer("radius", self.radius, 0, MAX_RADIUS))

    def params(self) -> list[float]:
        """[tau, lam_t, lam_s, tau_min, tau_max]: the float parameters as the kernels take them."""
        return [self.tau, self.lam_t, self.lam_s, self.tau_min, self.tau_max]


def stdd_state(batch: int, length: int, window: int = 3, device=None) -> tuple[Tensor, Tensor]:
    """A fresh (empty) STDD history for `batch` sequences of `length` positions:
    `(history (batch, length, window) float64, count (batch, length) int64)`, all zeros.

    `count[b, i]` is how many confidences position `i` has recorded since its last reset;
    value number `s` (from 0) sits in `history[b, i, s % window]`. `evo_step(stdd=...)`
    appends the step's `q` at every eligible window row of a finite step.
    """
    batch = _checks.integer("batch", batch, 1)
    length = _checks.integer("length", length, 1)
    window = _checks.integer("window", window, 1, MAX_WINDOW)
    history = torch.zeros(batch, length, window, dtype=torch.float64, device=device)
    return history, torch.zeros(batch, length, dtype=torch.int64, device=device)


def stdd_reset(count: Tensor, start, end) -> None:
    """Forget the history of positions `[start, end)` (ints, or `(B,)` tensors per row):
    call it for a block's positions when that block starts."""
    _checks.tensor("count", count, dim=2, dtypes=(torch.int64,))
    B, L = count.shape
    start = _checks.per_row("start", start, B, 0, L).to(count.device)
    end = _checks.per_row("end", end, B, 0, L).to(count.device)
    pos = torch.arange(L, device=count.device)
    count.masked_fill_((pos >= start[:, None]) & (pos < end[:, None]), 0)


# ---------------------------------------------------------------------------
# Reference (torch). Window rows only: history / count are (B, R, W) / (B, R) views.

def temporal_variance(history: Tensor, count: Tensor, q: Tensor) -> Tensor:
    """TV per row: population std of the last W values, q appended (values summed oldest first)."""
    W = history.shape[-1]
    cnt = count.clamp_min(0)
    n = (cnt + 1).clamp(max=W)
    first = cnt + 1 - n                                                 # sequence number of the oldest
    vals = []
    acc = torch.zeros_like(q)
    for j in range(W):
        s = first + j
        v = torch.where(s == cnt, q, history.gather(-1, (s % W).unsqueeze(-1)).squeeze(-1))
        valid = j < n
        vals.append((v, valid))
        acc = acc + torch.where(valid, v, 0.0)
    mean = acc / n
    acc2 = torch.zeros_like(q)
    for v, valid in vals:
        d = v - mean
        acc2 = acc2 + torch.where(valid, d * d, 0.0)
    return torch.where(n >= 2, torch.sqrt(acc2 / n), 0.0)


def record(history: Tensor, count: Tensor, q: Tensor, rows: Tensor) -> None:
    """Append q at the rows (bool mask) of the ring buffer, in place."""
    W = history.shape[-1]
    cnt = count.clamp_min(0)
    slot = (cnt % W).unsqueeze(-1)
    history.scatter_(-1, slot, torch.where(rows, q, history.gather(-1, slot).squeeze(-1)).unsqueeze(-1))
    count.copy_(torch.where(rows, cnt + 1, count))


def gram_band(logits: Tensor, mask_id: int, width: int) -> Tensor:
    """G[b, i, d] = <l_i, l_{i+d}> in float64 over the columns except the mask column, for
    d = 0..width (0 where i + d lies outside the window)."""
    B, R, _ = logits.shape
    lf = logits.to(torch.float64)
    lf[..., mask_id] = 0.0                                              # a copy: never the caller's
    band = torch.zeros(B, R, width + 1, dtype=torch.float64, device=logits.device)
    for d in range(min(width, R - 1) + 1):
        band[:, :R - d, d] = (lf[:, :R - d] * lf[:, d:]).sum(-1)
    return band


def spatial_deviance_from_band(band: Tensor, radius: int) -> Tensor:
    """SD per row from the Gram band (width >= 2 * radius); sums in the order every backend uses:
    neighbour offsets a = -r..r (a != 0) ascending, and pairs (a, b) with a outer."""
    B, R, _ = band.shape
    dev = band.device
    i = torch.arange(R, device=dev)

    def G(u, v):  # (R,) row indices u, v with |u - v| <= 2r, clamped where invalid
        lo = torch.minimum(u, v).clamp(0, R - 1)
        d = (u - v).abs()
        return band[:, lo, d]

    offs = [a for a in range(-radius, radius + 1) if a != 0]
    valid = {a: (i + a >= 0) & (i + a < R) for a in offs}
    zero = torch.zeros(B, R, dtype=torch.float64, device=dev)
    dot, nm = zero.clone(), zero.clone()
    for a in offs:
        dot = dot + torch.where(valid[a], G(i, i + a), 0.0)
    for a in offs:
        for b in offs:
            nm = nm + torch.where(valid[a] & valid[b], G(i + a, i + b), 0.0)
    ni = band[:, :, 0]
    has = torch.zeros(R, dtype=torch.bool, device=dev)
    for a in offs:
        has |= valid[a]
    cos = dot / (torch.sqrt(ni) * torch.sqrt(nm))
    ok = has & (ni > 0) & (nm > 0) & torch.isfinite(ni) & torch.isfinite(nm) & torch.isfinite(cos)
    return torch.where(ok, (1.0 - cos).clamp(0.0, 2.0), 0.0)


def thresholds(stdd: STDD, tv: Tensor, sd: Tensor) -> Tensor:
    """tau_i = clamp(tau + lam_t * TV + lam_s * SD, tau_min, tau_max), in that order."""
    t = stdd.tau + stdd.lam_t * tv
    t = t + stdd.lam_s * sd
    return t.clamp(stdd.tau_min, stdd.tau_max)


def stdd_transfer(stdd: STDD, logits: Tensor, q: Tensor, eligible: Tensor, mask_id: int,
                  history: Tensor, count: Tensor) -> Tensor:
    """The rows STDD transfers (B, R) bool; appends q to the history of the eligible rows."""
    tv = temporal_variance(history, count, q) if stdd.lam_t != 0 else torch.zeros_like(q)
    if stdd.lam_s != 0 and stdd.radius > 0:
        sd = spatial_deviance_from_band(gram_band(logits, mask_id, 2 * stdd.radius), stdd.radius)
    else:
        sd = torch.zeros_like(q)
    tau = thresholds(stdd, tv, sd)
    transfer = eligible & (q >= tau)
    diff = q - tau
    for b in range(q.shape[0]):
        if bool(transfer[b].any()) or not bool(eligible[b].any()):
            continue
        rows = eligible[b].nonzero().flatten()                           # ascending positions
        d = diff[b, rows]
        rows, qq = rows[d == d.max()], q[b, rows[d == d.max()]]
        transfer[b, rows[qq == qq.max()][0]] = True
    record(history, count, q, eligible)
    return transfer


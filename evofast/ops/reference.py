"""The `torch` backend: docs/semantics.md made executable, in plain PyTorch.

Written for clarity, line by line after that document (its item numbers in the
comments); every faster backend is tested against these functions. Arguments are
already validated and normalised by `evofast.ops.evo_step` / `soft_embed`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .stdd import STDD, stdd_transfer


def evo_step_reference(
    logits: Tensor,          # (B, R, V): rows [row0, row0 + R) of the sequence
    x: Tensor,               # (B, L) int64, updated in place
    conf: Tensor,            # (B, L) float64, updated in place
    num_transfer: Tensor,    # (B,) int64
    block_start: Tensor,     # (B,) int64
    block_end: Tensor,       # (B,) int64
    prompt_len: Tensor,      # (B,) int64
    row0: int,
    mask_id: int,
    k_soft: int,
    alpha: float,
    temperature: float,
    random_remask: bool,
    threshold: Optional[float],
    exclude_mask: bool,
    noise: Optional[Tensor],      # (B, R, V) float64 U(0,1): the Gumbel draw (temperature > 0)
    rand_conf: Optional[Tensor],  # (B, R) float64 U(0,1): the "random" remasking draw
    *,
    confidence: str = "prob",     # what q measures without random remasking: prob | margin | entropy
    top_k: Optional[int] = None,  # sampling filters (temperature > 0 only)
    top_p: Optional[float] = None,
    stdd: Optional[STDD] = None,  # the STDD transfer rule, with its history (B, L, W) / count (B, L)
    stdd_history: Optional[Tensor] = None,
    stdd_count: Optional[Tensor] = None,
    return_probs: bool = False,
):
    """One decoding step (docs/semantics.md, decoding items 2-7). Returns (ids, w, transfer, status), and with
    return_probs also (tp (B, R, k) float32: the top-k probabilities of p, q (B, R) float64)."""
    B, R, V = logits.shape
    M = mask_id
    pos = torch.arange(row0, row0 + R, device=logits.device)           # sequence position of each row
    xw = x[:, row0:row0 + R]                                            # views: writes land in x / conf
    cw = conf[:, row0:row0 + R]

    # 2. eligible: still masked, and not in a later block.
    eligible = (xw == M) & (pos[None, :] < block_end[:, None])

    # 3. x0 = argmax(g(logits)), g(logits)[..., M] = -inf.
    if temperature > 0:
        g = logits.to(torch.float64).exp() / (-torch.log(noise)) ** temperature
    else:
        g = logits.clone()  # the authors' g returns the logits themselves; evofast never writes them
    if exclude_mask:
        g[..., M] = -torch.inf
    # Sampling filters (Dream's order: top_p, then top_k) on the tempered distribution the
    # draw samples from; the confidence then uses that filtered distribution (Dream's choice).
    filtered = temperature > 0 and (top_k is not None or top_p is not None)
    if filtered:
        lt = logits.to(torch.float64) / temperature
        if exclude_mask:
            lt[..., M] = -torch.inf
        keep = sampling_filter(lt, top_k, top_p)
        g = g.masked_fill(~keep, -torch.inf)
        p_filtered = torch.softmax(lt.masked_fill(~keep, -torch.inf), dim=-1)
    x0 = torch.argmax(g, dim=-1)

    # 4. p = softmax(float64(logits)). At temperature 0 the authors' code writes the
    # -inf of column M into the logits the softmax reads, so p excludes M (a quirk we keep).
    p_source = g if (temperature == 0) else logits
    p = torch.softmax(p_source.to(torch.float64), dim=-1)
    p_conf = p_filtered if filtered else p                              # the distribution q measures
    finite = torch.isfinite(p).all(dim=-1) & torch.isfinite(p_conf).all(dim=-1)  # NaN / inf rows
    if not bool(finite.all()):
        bad = int((~finite).flatten().nonzero()[0])
        status = torch.tensor([bad], dtype=torch.int64, device=logits.device)
        out = _empty_outputs(logits, k_soft) + (status,)
        return out + _empty_probs(logits, k_soft) if return_probs else out
    if random_remask:
        q = rand_conf
    else:
        q = confidence_of(p_conf, x0, confidence)

    # 5. transfer: the n largest q among eligible rows (all eligible rows when
    # fewer), or with a threshold every eligible row sorted by q, keeping the
    # first always and dropping each later one below the threshold.
    transfer = torch.zeros(B, R, dtype=torch.bool, device=logits.device)
    candidates = torch.where(eligible, q, -torch.inf)
    for b in range(B if stdd is None else 0):
        n_eligible = int(eligible[b].sum())
        n = n_eligible if threshold is not None else min(int(num_transfer[b]), n_eligible)
        _, chosen = torch.topk(candidates[b], k=n)
        if threshold is not None and n > 1:
            keep = torch.ones(n, dtype=torch.bool, device=logits.device)
            keep[1:] = q[b, chosen[1:]] >= threshold
            chosen = chosen[keep]
        transfer[b, chosen] = True
    if stdd is not None:  # STDD replaces the transfer rule (and records q in its history)
        transfer = stdd_transfer(stdd, logits, q, eligible, M, stdd_history[:, row0:row0 + R],
                                 stdd_count[:, row0:row0 + R])
    xw[transfer] = x0[transfer]
    cw[transfer] = q[transfer]

    # 6. revision: decoded rows of the current block onwards take a more
    # confident prediction.
    frozen_end = torch.maximum(block_start, prompt_len)                 # rows before it are [Decode]
    revise = (pos[None, :] >= frozen_end[:, None]) & (xw != M) & (q > cw)
    if exclude_mask:
        revise &= x0 != M
    xw[revise] = x0[revise]
    cw[revise] = q[revise]

    # 7. new representation: top-k of p plus x itself, with the mask weight
    # e = sum(tp) / (1 - a) * a on rows still masked.
    tp, ti = torch.topk(p, k=k_soft, dim=-1)
    e = torch.where(xw == M, tp.sum(dim=-1) / (1.0 - alpha) * alpha, torch.zeros_like(q))
    ids = torch.cat([ti, xw.unsqueeze(-1)], dim=-1)
    w = torch.cat([tp, e.unsqueeze(-1)], dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    decoded = pos[None, :] < frozen_end[:, None]                        # prompt and earlier blocks
    w[decoded] = 0.0
    w[..., -1][decoded] = 1.0
    status = torch.full((1,), -1, dtype=torch.int64, device=logits.device)
    out = ids, w.to(logits.dtype), transfer, status
    return out + (tp.to(torch.float32), q.clone()) if return_probs else out


def sampling_filter(lt: Tensor, top_k: Optional[int], top_p: Optional[float]) -> Tensor:
    """The columns the sampling filters keep (bool, like lt): lt are the tempered float64
    logits with excluded columns at -inf. top_p (first): the smallest set of the most probable
    columns whose probability reaches top_p (columns in order of lt, the smaller index first
    among equal values; a column is kept when the mass before it is < top_p). top_k: the
    columns whose value is at least the k-th largest (ties with it are kept)."""
    keep = torch.ones_like(lt, dtype=torch.bool)
    if top_p is not None:
        vals, order = torch.sort(lt, dim=-1, descending=True, stable=True)
        mass = torch.softmax(vals, dim=-1).cumsum(dim=-1)
        before = torch.cat([torch.zeros_like(mass[..., :1]), mass[..., :-1]], dim=-1)
        keep = torch.zeros_like(keep).scatter_(-1, order, before < top_p)
    if top_k is not None:
        kth = torch.topk(lt, k=min(top_k, lt.shape[-1]), dim=-1).values[..., -1:]
        keep &= lt >= kth
    return keep


def confidence_of(p: Tensor, x0: Tensor, confidence: str) -> Tensor:
    """q per row from the distribution p: p[x0] ("prob"), the top-1 minus the top-2
    probability ("margin"), or the negative entropy sum p log p, 0 log 0 = 0 ("entropy")."""
    if confidence == "margin":
        top2 = torch.topk(p, k=2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if confidence == "entropy":
        return torch.special.xlogy(p, p).sum(dim=-1)
    return torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)


def _empty_outputs(logits: Tensor, k_soft: int):
    B, R, _ = logits.shape
    ids = torch.zeros(B, R, k_soft + 1, dtype=torch.int64, device=logits.device)
    w = torch.zeros(B, R, k_soft + 1, dtype=logits.dtype, device=logits.device)
    return ids, w, torch.zeros(B, R, dtype=torch.bool, device=logits.device)


def _empty_probs(logits: Tensor, k_soft: int):
    B, R, _ = logits.shape
    return (torch.zeros(B, R, k_soft, dtype=torch.float32, device=logits.device),
            torch.zeros(B, R, dtype=torch.float64, device=logits.device))


def normalised_weights(w: Tensor) -> Tensor:
    """The normalised weights of docs/semantics.md §1: w' = clamp(w, min=0) / max(sum(clamp(w, min=0)), 1e-12)."""
    c = w.clamp_min(0)
    return c / c.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def soft_embed_spec(weight: Tensor, ids: Tensor, w: Tensor) -> Tensor:
    """The soft input embedding (docs/semantics.md §1) exactly as the authors' model computes
    it (autograd does the rest).

    Used by the tests as ground truth, including for gradients.
    """
    return (normalised_weights(w).unsqueeze(-1) * weight[ids]).sum(dim=-2)


def product_weights(weight: Tensor, w: Tensor) -> Tensor:
    """The normalised weights as the formula multiplies them: `normalised_weights(w)` in
    w's dtype (torch's own reductions and roundings), promoted to the product dtype
    `promote(w.dtype, weight.dtype)` (exact: a promotion only widens). The compiled
    kernels compute the same with the same ATen ops (csrc/product_weights.h)."""
    return normalised_weights(w).to(torch.promote_types(w.dtype, weight.dtype))


def soft_embed_fwd_reference(weight: Tensor, ids: Tensor, w: Tensor) -> Tensor:
    """`soft_embed_spec(weight, ids, w)` in weight.dtype: each product rounded to the
    product dtype, summed by torch's reduction (fp32 accumulation for 16-bit dtypes)."""
    wn = product_weights(weight, w)
    return (wn.unsqueeze(-1) * weight[ids]).sum(dim=-2).to(weight.dtype)


def soft_embed_bwd_reference(grad: Tensor, weight: Tensor, ids: Tensor, w: Tensor,
                             need_weight: bool, need_w: bool):
    """Gradients of the soft input embedding (docs/semantics.md §1) for weight (rows ids, fp32
    accumulation) and for w."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    g = grad.to(acc)
    wf = w.to(acc)
    c = wf.clamp_min(0)
    S = c.sum(dim=-1, keepdim=True)
    D = S.clamp_min(1e-12)
    wn = c / D
    grad_weight = grad.new_empty(0, dtype=weight.dtype)
    grad_w = grad.new_empty(0, dtype=w.dtype)
    if need_weight:
        d = weight.shape[1]
        contrib = wn.unsqueeze(-1) * g.unsqueeze(-2)                     # (B, R, J, d)
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        gw.index_add_(0, ids.reshape(-1), contrib.reshape(-1, d))
        grad_weight = gw.to(weight.dtype)
    if need_w:
        gj = (weight[ids].to(acc) * g.unsqueeze(-2)).sum(dim=-1)         # <grad, E[ids_j]>
        through_sum = (gj * c).sum(dim=-1, keepdim=True) / (D * D) * (S >= 1e-12)
        grad_w = ((gj / D - through_sum) * (wf >= 0)).to(w.dtype)
    return grad_weight, grad_w

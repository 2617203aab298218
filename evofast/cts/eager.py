"""The straightforward eager CTS loss: docs/semantics.md §3 as the authors' trainer runs it.

Every step computes full-vocabulary logits for every position, the cross-entropy
over them with `ignore_index`, a float64 softmax of every position for the soft
representation (one batch row at a time, as the authors' `process_soft_token`),
and the soft input embedding by autograd (docs/semantics.md §1); all K graphs stay alive for
one backward. It is the ground truth of the tests and the baseline of
`evofast bench cts`; nothing in it is fused.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.registry import get_adapter
from ..ops.reference import soft_embed_spec
from .loss import base_model, check_batch, draw_alphas


@torch.no_grad()
def soft_representation(logits: Tensor, x: Tensor, conf: Tensor, *, mask_id: int, k_soft: int, alpha: float,
                        block_start: int, prompt_len: int):
    """CTS loss item 4 (docs/semantics.md §3) for one row: logits (1, N, V), x (1, N) and
    conf (1, N) float64 updated in place
    -> ids (1, N, k+1), w (1, N, k+1) in the logits dtype."""
    x0 = logits.argmax(dim=-1)                              # M not excluded
    p = torch.softmax(logits.to(torch.float64), dim=-1)     # p includes M
    q = p.gather(-1, x0[..., None]).squeeze(-1)
    frozen = max(block_start, prompt_len)
    revise = (x != mask_id) & (q > conf)                    # as the authors' code: x0 may be M
    revise[:, :frozen] = False
    x[revise] = x0[revise]
    conf[revise] = q[revise]
    tp, ti = torch.topk(p, k=k_soft, dim=-1)
    extra = torch.where((x == mask_id)[..., None], tp.sum(-1, keepdim=True) / (1.0 - alpha) * alpha,
                        torch.zeros_like(tp[..., :1]))
    ids = torch.cat([ti, x[..., None]], dim=-1)
    w = torch.cat([tp, extra], dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    w[:, :frozen] = 0.0
    w[:, :frozen, -1] = 1.0
    return ids, w.to(logits.dtype)


def eager_cts_loss(model: nn.Module, batch: dict, k_soft: int = 3, alphas: Optional[Tensor] = None, *,
                   generator: Optional[torch.Generator] = None, mask_id: Optional[int] = None) -> Tensor:
    """`sum_k loss_k / K` with the graph of every step alive (call `.backward()` on it)."""
    adapter = get_adapter(base_model(model), mask_id)
    emb = adapter.input_embeddings().weight
    b = check_batch(batch, emb.device)
    ids, nxt = b["input_ids"].clone(), b["next_positions"]
    B, N = ids.shape
    K = nxt.shape[1]
    a = draw_alphas(K, B, alphas, generator)
    pos = torch.arange(N, device=ids.device)
    labels = b["labels"].clone()
    labels[(pos[None, :] < b["block_start"][:, None]) | (pos[None, :] > b["block_end"][:, None])] = -100
    M = adapter.mask_id
    conf = torch.zeros(B, N, dtype=torch.float64, device=ids.device)
    soft = None
    loss = 0.0
    for k in range(K):
        if soft is None:
            logits = adapter.forward(input_ids=ids)
        else:
            logits = adapter.forward(inputs_embeds=soft_embed_spec(emb, soft[0], soft[1]))
        loss = loss + F.cross_entropy(logits.reshape(B * N, -1).float(), labels.reshape(-1), ignore_index=-100)
        pred = logits.argmax(dim=-1)
        ids = ids.clone()                                   # the last forward's graph holds the old ids
        for r in range(B):                                  # the authors' per-row loops
            for p in nxt[r, k].tolist():
                ids[r, p] = pred[r, p]
        rows = [soft_representation(logits[r:r + 1].detach(), ids[r:r + 1], conf[r:r + 1], mask_id=M,
                                    k_soft=k_soft, alpha=a[k][r], block_start=int(b["block_start"][r]),
                                    prompt_len=int(b["prompt_lengths"][r])) for r in range(B)]
        soft = (torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]).to(emb.dtype))
    return loss / K

"""Eager baselines that benchmarks and tests measure evofast against.

`authors_step` is the authors' per-step post-processing as their batch-1 loop
runs it (docs/semantics.md): float64 softmax and top-k over every row of the
whole sequence, full-size temporaries, a Python loop over batch rows. It
mutates the logits like the authors' code does (the temperature-0 quirk), so
callers pass a tensor they own. `needed_rows_step` is the best plain eager
PyTorch for the same step on only the window rows (what `torch.compile` is
given in the benchmarks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def authors_step(logits, x, conf, num_transfer, *, mask_id, block_start, block_end, prompt_len,
                 k_soft=3, alpha=0.7, temperature=0.0, threshold=None):
    """One step over the whole sequence: logits (1, L, V), x (1, L), conf (1, L) float64.

    Returns (soft_token ids, prob); x and conf are updated in place. Assumes at
    least `num_transfer` eligible positions (the authors' code misbehaves otherwise).
    """
    mask_index = x == mask_id
    mask_index[:, block_end:] = False
    if temperature > 0:
        noisy = logits.to(torch.float64)
        noisy = noisy.exp() / (-torch.log(torch.rand_like(noisy))) ** temperature
    else:
        noisy = logits                       # quirk: the -inf below lands in the logits
    noisy[:, :, mask_id] = -torch.inf
    x0 = torch.argmax(noisy, dim=-1)
    p = F.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
    confidence = torch.where(mask_index, x0_p, -torch.inf)
    transfer = torch.zeros_like(x0, dtype=torch.bool)
    n = torch.as_tensor(num_transfer).reshape(-1)
    if threshold is not None:
        n = mask_index.sum(dim=1)
    for j in range(confidence.shape[0]):
        _, sel = torch.topk(confidence[j], k=int(n[j]))
        transfer[j, sel] = True
        if threshold is not None:
            for i in range(1, int(n[j])):
                if confidence[j, sel[i]] < threshold:
                    transfer[j, sel[i]] = False
    x[transfer] = x0[transfer]
    conf[transfer] = x0_p[transfer]
    decoded = x != mask_id
    decoded[:, :prompt_len] = False
    decoded[:, :block_start] = False
    better = decoded & (x0_p > conf) & (x0 != mask_id)
    x[better] = x0[better]
    conf[better] = x0_p[better]
    prob, soft = torch.topk(p, k=k_soft, dim=-1)
    extra = torch.where((x == mask_id).unsqueeze(-1), prob.sum(-1, keepdim=True) / (1.0 - alpha) * alpha,
                        torch.zeros_like(prob[..., :1]))
    prob = torch.cat((prob, extra), dim=-1)
    soft = torch.cat((soft, x.unsqueeze(-1)), dim=-1)
    prob = prob / prob.sum(dim=-1, keepdim=True)
    prob[:, :block_start, :] = 0.0
    prob[:, :block_start, -1] = 1.0
    prob[:, :prompt_len, :] = 0.0
    prob[:, :prompt_len, -1] = 1.0
    return soft, prob.to(logits.dtype), transfer


def needed_rows_step(logits, x, conf, num_transfer, *, row0, block_start, block_end, prompt_len,
                     mask_id, k_soft=3, alpha=0.7):
    """Greedy step on the window rows only, vectorised over the batch (no Python loop).

    logits (B, R, V); ints for the bounds. Same results as `evo_step` (greedy, no threshold).
    """
    B, R, V = logits.shape
    pos = torch.arange(row0, row0 + R, device=logits.device)
    xw, cw = x[:, row0:row0 + R], conf[:, row0:row0 + R]
    lg = logits.to(torch.float64)
    lg = lg.index_fill(-1, torch.tensor([mask_id], device=logits.device), -torch.inf)
    lse = torch.logsumexp(lg, dim=-1)
    tl, ti = lg.topk(k_soft, dim=-1)
    x0 = ti[..., 0]
    tp = (tl - lse.unsqueeze(-1)).exp()
    q = tp[..., 0]
    eligible = (xw == mask_id) & (pos < block_end)
    cand = torch.where(eligible, q, -torch.inf)
    order = cand.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(R, device=logits.device).expand(B, R))
    n = torch.minimum(torch.as_tensor(num_transfer, device=logits.device).reshape(-1, 1), eligible.sum(-1, keepdim=True))
    transfer = eligible & (rank < n)
    xw.copy_(torch.where(transfer, x0, xw))
    cw.copy_(torch.where(transfer, q, cw))
    frozen = max(block_start, prompt_len)
    revise = (pos >= frozen) & (xw != mask_id) & (q > cw)
    xw.copy_(torch.where(revise, x0, xw))
    cw.copy_(torch.where(revise, q, cw))
    e = torch.where(xw == mask_id, tp.sum(-1) / (1.0 - alpha) * alpha, 0.0)
    w = torch.cat([tp, e.unsqueeze(-1)], -1)
    w = w / w.sum(-1, keepdim=True)
    w = torch.where((pos < frozen).unsqueeze(-1), F.one_hot(torch.tensor(k_soft), k_soft + 1).to(w), w)
    ids = torch.cat([ti, xw.unsqueeze(-1)], -1)
    return ids, w.to(logits.dtype), transfer


def authors_hard_step(logits, x, num_transfer, *, mask_id, block_end, threshold=None):
    """The authors' `get_transfer_index` at temperature 0, batch 1 (the -inf lands in the logits: a quirk)."""
    M = mask_id
    mask_index = x == M
    mask_index[:, block_end:] = False
    logits[:, :, M] = -torch.inf
    x0 = logits.argmax(-1)
    p = torch.softmax(logits.to(torch.float64), -1)
    x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -torch.inf)
    transfer = torch.zeros_like(x0, dtype=torch.bool)
    n = int(mask_index.sum()) if threshold is not None else int(num_transfer)
    _, sel = torch.topk(confidence[0], k=n)
    transfer[0, sel] = True
    if threshold is not None:
        for k in range(1, n):
            if confidence[0, sel[k]] < threshold:
                transfer[0, sel[k]] = False
    x[transfer] = x0[transfer]


@torch.no_grad()
def authors_generate(model, prompt, *, gen_length, block_length, steps, mask_id, mode="evotoken", k_soft=3,
                     alpha=0.7, threshold=None, timer=None):
    """The authors' `generate_soft_token` (mode "evotoken") / `generate` (mode "hard") loop.

    Batch 1, no cache, greedy: one forward over the whole sequence per step (plain
    embeddings at the first one), the soft input mixed by the spec formula as their
    model does, and the full-sequence float64 post-processing of `authors_step`.
    `prompt (1, P)` -> `(1, P + gen_length)`. `timer(fn, *args)`, when given, wraps
    every model forward (benchmarks use it to split forward time from the rest).
    """
    from .ops.reference import soft_embed_spec

    M = mask_id
    P = prompt.shape[1]
    x = torch.full((1, P + gen_length), M, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    blocks = gen_length // block_length
    s = steps // blocks
    conf = torch.zeros_like(x, dtype=torch.float64)
    soft = prob = None                                   # the first forward reads plain embeddings
    E = model.get_input_embeddings().weight

    def forward(soft, prob):
        if soft is None:
            return model(input_ids=x).logits
        return model(inputs_embeds=soft_embed_spec(E, soft, prob)).logits

    for b in range(blocks):
        bs = P + b * block_length
        be = bs + block_length
        masked = int((x[:, bs:be] == M).sum())
        n = [masked // s + (t < masked % s) for t in range(s)]
        i = 0
        while True:
            logits = timer(forward, soft, prob) if timer is not None else forward(soft, prob)
            # the authors' code indexes past its schedule (IndexError) when prompt masks take
            # transfers; evofast then transfers one token per step (generation.py's docstring)
            nt = n[i] if i < s else 1
            if mode == "evotoken":
                soft, prob, _ = authors_step(logits.clone(), x, conf, nt, mask_id=M, block_start=bs, block_end=be,
                                             prompt_len=P, k_soft=k_soft, alpha=alpha, threshold=threshold)
            else:
                authors_hard_step(logits.clone(), x, nt, mask_id=M, block_end=be, threshold=threshold)
            i += 1
            if int((x[:, bs:be] == M).sum()) == 0:
                break
    return x

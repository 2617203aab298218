"""Log-likelihoods of a masked diffusion model, for multiple-choice style evaluation.

A masked diffusion LM has no left-to-right factorisation, so log p(target | prefix)
is not a sum of next-token log-probabilities. `mc_loglikelihood` estimates it the
way LLaDA's evaluation does (Nie et al., "Large Language Diffusion Models", 2025):
the negative of a Monte-Carlo estimate of the masked-diffusion loss, an upper bound
on -log p (so the estimate is a lower bound on log p, in expectation):

    -log p(t | p)  <=  E_{r ~ U(0, 1]}  E_{mask of ratio r}  [ sum over masked target
                          positions i of  -log p_model(t_i | prefix, partly masked target) / r ]

Only target positions are masked, never the prefix. Each forward runs `batch_size`
noisy copies of the sequence; their masked counts are stratified over 1..T (T the
target length): a random start k in 1..T, then counts spaced T / batch_size apart
(modulo T), so one batch covers the whole range of ratios; each copy masks that
many target positions chosen uniformly. The estimate is the mean over all
`mc_num` copies (LLaDA uses 128). Draws come from the `generator` given (on the
CPU), so a seeded generator gives the same estimate every time.

`greedy_matches` answers lm-eval's "is the continuation the greedy one": decoding
T masks after the prefix one token per step, most confident first (hard decoding,
one block of T, T steps), gives exactly the target.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["mc_loglikelihood", "greedy_matches"]


def _check_ids(name: str, ids: Sequence[int], allow_empty: bool) -> list:
    ids = [int(i) for i in ids]
    if not ids and not allow_empty:
        raise ValueError(f"{name}: empty (nothing to score)")
    return ids


def stratified_masks(batch: int, length: int, generator: Optional[torch.Generator] = None):
    """(batch, length) bool masks and their per-row masked counts (batch,), int64: counts
    stratified over 1..length from a random start, positions uniform given the count."""
    k = int(torch.randint(1, length + 1, (), generator=generator))
    counts = torch.round(torch.linspace(float(k), k + (batch - 1) * length / batch, batch)).long()
    counts = (counts - 1) % length + 1
    order = torch.rand(batch, length, generator=generator).argsort(dim=1).argsort(dim=1)
    return order < counts[:, None], counts


@torch.no_grad()
def mc_loglikelihood(model, prefix: Sequence[int], target: Sequence[int], *, mc_num: int = 128,
                     batch_size: int = 32, generator: Optional[torch.Generator] = None) -> float:
    """Monte-Carlo estimate of log p(target | prefix) under a masked diffusion `model` (one
    `evofast.patch` supports): see the module doc. `mc_num` noisy copies in forwards of
    `batch_size` rows (`mc_num` a multiple of it)."""
    from ..models import get_adapter

    prefix = _check_ids("prefix", prefix, allow_empty=True)
    target = _check_ids("target", target, allow_empty=False)
    if isinstance(mc_num, bool) or not isinstance(mc_num, int) or mc_num < 1:
        raise ValueError(f"mc_num: expected a positive int, got {mc_num!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1 or mc_num % batch_size:
        raise ValueError(f"batch_size: expected a positive int dividing mc_num={mc_num}, got {batch_size!r}")
    adapter = get_adapter(model)
    device = adapter.input_embeddings().weight.device
    P, T = len(prefix), len(target)
    seq = torch.tensor(prefix + target, dtype=torch.long)
    truth = seq[P:].to(device)
    total = 0.0
    for _ in range(mc_num // batch_size):
        masked, counts = stratified_masks(batch_size, T, generator)
        noisy = seq.repeat(batch_size, 1)
        noisy[:, P:][masked] = adapter.mask_id
        masked = masked.to(device)
        logits = adapter.forward(input_ids=noisy.to(device), logits_from=P)        # (b, T, V)
        nll = F.cross_entropy(logits[masked].float(), truth.expand(batch_size, T)[masked], reduction="none")
        weight = (T / counts.to(device, torch.float32))[:, None].expand(batch_size, T)[masked]
        total += float((nll * weight).sum()) / batch_size
    return -total / (mc_num // batch_size)


@torch.no_grad()
def greedy_matches(model, prefix: Sequence[int], target: Sequence[int]) -> bool:
    """True when decoding len(target) masks after `prefix` greedily, one token per step
    (the most confident first), gives exactly `target`."""
    from ..generation import generate

    prefix = _check_ids("prefix", prefix, allow_empty=False)
    target = _check_ids("target", target, allow_empty=False)
    T = len(target)
    out = generate(model, torch.tensor([prefix]), gen_length=T, block_length=T, steps=T, mode="hard",
                   temperature=0.0)
    return out[0, len(prefix):].tolist() == target

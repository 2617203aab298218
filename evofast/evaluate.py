"""Exact-match evaluation of a model on a task's test split, with `evofast.generate`.

    res = evaluate(model, tok, task, n=500, mode="evotoken", cache=None, steps=16)
    res["accuracy"], res["ci95"], res["tokens_per_s"]

Under `torchrun` / `accelerate launch` (WORLD_SIZE > 1) every process decodes its
shard of the test set (examples rank, rank + world, ...) and the per-example records
are gathered with torch.distributed (gloo on the CPU, nccl on GPUs), so every process
returns the same result over the whole set; tokens/s is then the whole set's tokens
over the slowest shard's time.
"""
from __future__ import annotations

import math
import os
import time
from typing import Optional

import torch

__all__ = ["wilson_interval", "evaluate", "distributed_context"]


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple:
    """Wilson score interval of a binomial proportion (95% by default); (0, 1) when n = 0."""
    if n < 0 or not 0 <= correct <= max(n, 0):
        raise ValueError(f"correct: must lie in [0, n={n}], got {correct}")
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo = 0.0 if correct == 0 else max(0.0, centre - half)      # exact ends (no rounding below 1)
    hi = 1.0 if correct == n else min(1.0, centre + half)
    return (lo, hi)


def distributed_context(device: Optional[torch.device] = None) -> tuple:
    """(rank, world_size), initialising torch.distributed from the launcher's environment
    when WORLD_SIZE > 1 and it is not initialised yet; (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1
    cuda = device is not None and torch.device(device).type == "cuda"
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _gather(records: list, seconds: float, world: int) -> tuple:
    if world == 1:
        return records, seconds
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, (records, seconds))
    merged = [r for recs, _ in parts for r in recs]
    merged.sort(key=lambda r: r["index"])
    return merged, max(s for _, s in parts)


@torch.no_grad()
def evaluate(model, tok, task, *, n: int = 500, seed: int = 0, mode: str = "hard", cache: Optional[str] = None,
             steps: Optional[int] = None, gen_length: Optional[int] = None, block_length: Optional[int] = None,
             k_soft: int = 3, alpha: float = 0.7, batch_size: int = 128, examples: Optional[list] = None,
             progress: bool = True, keep_samples: int = 8) -> dict:
    """Accuracy (exact match, Wilson 95% interval) and tokens/s of greedy decoding on
    `n` test problems (or the given `examples`). steps defaults to gen_length / 2,
    gen_length / block_length to the task's. The model must be `evofast.patch`able;
    errors of `generate` (bad lengths: ValueError; a cache not built: NotImplementedError)
    propagate before any work is wasted (the first batch raises them)."""
    from .bench._common import synchronize
    from .generation import generate
    from .ops._checks import integer
    from .pretrain import encode_batch

    gen_length = gen_length or task.gen_length
    block_length = block_length or min(task.block_length, gen_length)
    steps = steps or gen_length // 2
    integer("batch_size", batch_size, lo=1)
    if gen_length < task.gen_length:
        raise ValueError(f"gen_length: the task's answers need {task.gen_length} tokens, got {gen_length}")
    device = next(model.parameters()).device
    rank, world = distributed_context(device)
    test = examples if examples is not None else task.test_set(n, seed)
    mine = list(range(rank, len(test), world))
    records = []
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(mine), desc=f"eval {task.name} {mode} cache={cache} steps={steps}", unit="ex")
    seconds = 0.0
    try:
        for s in range(0, len(mine), batch_size):
            idx = mine[s:s + batch_size]
            batch = encode_batch(tok, task, [test[i] for i in idx], with_response=False)
            ids, am = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            synchronize(device)
            t0 = time.perf_counter()
            out = generate(model, ids, am if not bool(am.all()) else None, gen_length=gen_length,
                           block_length=block_length, steps=steps, mode=mode, k_soft=k_soft, alpha=alpha,
                           cache=cache)
            synchronize(device)
            seconds += time.perf_counter() - t0
            texts = tok.batch_decode(out[:, ids.shape[1]:].tolist(), skip_special_tokens=False)
            for i, text in zip(idx, texts):
                ex = test[i]
                records.append({"index": i, "prompt": ex.prompt, "output": text.split("<")[0],
                                "answer": ex.answer, "correct": bool(task.check(ex, text))})
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    records, seconds = _gather(records, seconds, world)
    total = len(records)
    correct = sum(r["correct"] for r in records)
    lo, hi = wilson_interval(correct, total)
    tokens = total * gen_length
    return {
        "task": task.spec(), "n": total, "correct": correct, "accuracy": correct / total if total else 0.0,
        "ci95": [lo, hi], "mode": mode, "cache": cache or "none", "steps": steps, "gen_length": gen_length,
        "block_length": block_length, "k_soft": k_soft if mode == "evotoken" else None,
        "alpha": alpha if mode == "evotoken" else None, "seed": seed, "batch_size": batch_size,
        "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "world_size": world, "device": str(device), "samples": records[:keep_samples],
    }

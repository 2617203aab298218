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

from typing import Optional

import torch

__all__ = ["wilson_interval", "evaluate", "distributed_context"]

from ..evaluation.report import wilson_interval  # noqa: E402
from ..evaluation.runner import decode_examples, distributed_context  # noqa: E402


def _gather(records: list, world: int) -> list:
    if world == 1:
        return records
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, records)
    return sorted((r for recs in parts for r in recs), key=lambda r: r["index"])


@torch.no_grad()
def evaluate(model, tok, task, *, n: int = 500, seed: int = 0, mode: str = "hard", cache: Optional[str] = None,
             steps: Optional[int] = None, gen_length: Optional[int] = None, block_length: Optional[int] = None,
             k_soft: int = 3, alpha: float = 0.7, temperature: float = 0.0, threshold: Optional[float] = None,
             remasking: str = "low_confidence", top_k: Optional[int] = None, top_p: Optional[float] = None,
             stdd=None, batch_size: int = 128, examples: Optional[list] = None, progress: bool = True,
             keep_samples: int = 8) -> dict:
    """Accuracy (exact match, Wilson 95% interval) and tokens/s of greedy decoding on
    `n` test problems (or the given `examples`). steps defaults to gen_length / 2,
    gen_length / block_length to the task's. The model must be `evofast.patch`able;
    errors of `generate` (bad lengths: ValueError; a cache not built: NotImplementedError)
    propagate before any work is wasted (the first batch raises them)."""
    from ..evaluation.grid import EvalConfig
    from ..ops._checks import integer

    gen_length = gen_length or task.gen_length
    block_length = block_length or min(task.block_length, gen_length)
    steps = steps or gen_length // 2
    integer("batch_size", batch_size, lo=1)
    if gen_length < task.gen_length:
        raise ValueError(f"gen_length: the task's answers need {task.gen_length} tokens, got {gen_length}")
    device = next(model.parameters()).device
    rank, world = distributed_context(device)
    test = examples if examples is not None else task.test_set(n, seed)
    config = EvalConfig(mode=mode, gen_length=gen_length, steps=steps, block_length=block_length,
                        k_soft=k_soft if mode == "evotoken" else None, alpha=alpha if mode == "evotoken" else None,
                        temperature=temperature, cache=cache, threshold=threshold, remasking=remasking, top_k=top_k,
                        top_p=top_p, stdd=stdd)
    mine = list(range(rank, len(test), world))
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(mine), desc=f"eval {task.name} {mode} cache={cache} steps={steps}", unit="ex")
    try:
        records = decode_examples(model, tok, task, test, config, indices=mine, batch_size=batch_size, seed=seed,
                                  progress=bar)
    finally:
        if bar is not None:
            bar.close()
    # the slowest shard's time: every process decodes its shard at the same time
    seconds = sum(r["seconds"] for r in records)
    if world > 1:
        import torch.distributed as dist
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        seconds = float(t)
    records = _gather([{"index": r["index"], "prompt": r["question"], "output": r["generation"].split("<")[0],
                        "answer": r["ground_truth"], "correct": r["correct"]} for r in records], world)
    total = len(records)
    correct = sum(r["correct"] for r in records)
    lo, hi = wilson_interval(correct, total)
    tokens = total * gen_length
    return {
        "task": task.spec(), "n": total, "correct": correct, "accuracy": correct / total if total else 0.0,
        "ci95": [lo, hi], "mode": mode, "cache": cache or "none", "steps": steps, "gen_length": gen_length,
        "block_length": block_length, "k_soft": k_soft if mode == "evotoken" else None,
        "alpha": alpha if mode == "evotoken" else None, "temperature": temperature, "threshold": threshold,
        "remasking": remasking, "top_k": top_k, "top_p": top_p, "stdd": config.as_dict()["stdd"], "seed": seed, "batch_size": batch_size,
        "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "world_size": world, "device": str(device), "samples": records[:keep_samples],
    }

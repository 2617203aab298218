"""Decoding a set of examples with `evofast.generate` and scoring them, batch by batch.

    records = decode_examples(model, tok, task, examples, config, batch_size=32)
    summaries = run_grid(model, tok, task, examples, configs, store, batch_size=32)

Prompts are sorted by length before batching (left padding wastes little) and batched
with an attention mask. A task either encodes one example (`task.encode(ex, tok)`: the
paper's benchmarks, their chat template and `<reasoning>` prefill) or a batch
(`evofast.tasks.base.encode_batch`: the synthetic tasks' fixed-width layout). The
generated tokens are decoded without skipping special tokens and scored by
`task.check(ex, text)`, as the authors score them.

Under `torchrun` (WORLD_SIZE > 1) process r decodes the examples r, r + world, ...
of every configuration; `run_grid` writes each batch's records as it finishes and
resumes where a previous run stopped (`ResultStore`).

Sampling (temperature > 0): each batch draws from its own generator, seeded by the
run's seed, the configuration and the batch's examples, so a rerun of the same batch
draws the same numbers.
"""
from __future__ import annotations

import hashlib
import os
import time
from typing import Callable, Optional, Sequence

import torch

from ..chat import left_pad, pad_id_of
from ..devices import synchronize
from .grid import EvalConfig
from .report import mark_best_alpha, summarize, table, write_authors_layout
from .results import ResultStore, write_json_atomic

__all__ = ["decode_examples", "run_grid", "distributed_context", "prompt_ids_of"]


def distributed_context(device=None) -> tuple:
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


def prompt_ids_of(task, tok, ex) -> list:
    """One example's prompt token ids, unpadded: `task.encode(ex, tok)` (the paper's benchmarks),
    or the synthetic tasks' tokenization of `ex.prompt`."""
    if callable(getattr(task, "encode", None)):
        return list(task.encode(ex, tok))
    return list(tok([ex.prompt])["input_ids"][0])


def _encoder(task, tok):
    """examples -> (ids, attention mask or None, prompt texts)."""
    if callable(getattr(task, "encode", None)):
        def encode(exs):
            ids, am = left_pad([prompt_ids_of(task, tok, ex) for ex in exs], pad_id_of(tok))
            return ids, am, [task.prompt_text(ex, tok) for ex in exs]
        return encode

    from ..tasks.base import encode_batch

    def encode_synthetic(exs):                          # the fixed-width layout the model was trained on
        b = encode_batch(tok, task, exs, with_response=False)
        am = b["attention_mask"]
        return b["input_ids"], (None if bool(am.all()) else am), [ex.prompt for ex in exs]
    return encode_synthetic


def _question(ex) -> str:
    return getattr(ex, "question", None) or getattr(ex, "prompt", "")


def _batch_seed(seed: int, config: EvalConfig, indices: Sequence[int]) -> int:
    key = f"{seed}|{config.name}|{','.join(map(str, indices))}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def decode_examples(model, tok, task, examples: Sequence, config: EvalConfig, *, indices: Optional[Sequence[int]] = None,
                    batch_size: int = 32, seed: int = 0, on_batch: Optional[Callable[[list], None]] = None,
                    progress=None) -> list:
    """Records of `examples[i]` for i in `indices` (default: all) under `config`, in index order.
    `on_batch(records)` is called after every batch; `progress`, a tqdm bar, is advanced."""
    from ..generation import generate

    device = next(model.parameters()).device
    encode = _encoder(task, tok)
    lengths = {i: len(prompt_ids_of(task, tok, examples[i]))
               for i in (range(len(examples)) if indices is None else indices)}
    todo = sorted(lengths, key=lambda i: (lengths[i], i))
    records = []
    for s in range(0, len(todo), batch_size):
        idx = todo[s:s + batch_size]
        exs = [examples[i] for i in idx]
        ids, am, prompts = encode(exs)
        ids, am = ids.to(device), (None if am is None else am.to(device))
        gen = None
        if config.temperature > 0:
            gen = torch.Generator().manual_seed(_batch_seed(seed, config, idx))
        stats = {}
        synchronize(device)
        t0 = time.perf_counter()
        out = generate(model, ids, am, generator=gen, stats=stats, **config.generate_kwargs())
        synchronize(device)
        share = (time.perf_counter() - t0) / len(idx)
        texts = tok.batch_decode(out[:, ids.shape[1]:].tolist(), skip_special_tokens=False)
        batch = [{"index": i, "question": _question(ex), "prompt": p, "generation": text,
                  "ground_truth": getattr(ex, "answer", None), "extracted": task.extract(ex, text),
                  "correct": bool(task.check(ex, text)), "seconds": share, "forwards": f}
                 for i, ex, p, text, f in zip(idx, exs, prompts, texts, stats["row_forwards"])]
        records += batch
        if on_batch is not None:
            on_batch(batch)
        if progress is not None:
            progress.update(len(idx))
    return sorted(records, key=lambda r: r["index"])


def run_grid(model, tok, task, examples: Sequence, configs: Sequence[EvalConfig], store: ResultStore, *,
             batch_size: int = 32, seed: int = 0, progress: bool = True, authors_layout: bool = False,
             log=print) -> list:
    """Every configuration over every example, resuming from `store`; returns the summaries
    (on every process) and, on process 0, writes summary.json / summary.md (and the authors'
    layout). The store must be claimed (`store.claim()`) by the caller first."""
    import torch.distributed as dist

    device = next(model.parameters()).device
    rank, world = distributed_context(device)
    todo = {}
    for c in configs:
        done = store.records(c.name)
        todo[c.name] = [i for i in range(rank, len(examples), world) if i not in done]
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(len(v) for v in todo.values()), unit="ex", desc=f"eval {getattr(task, 'name', '')}")
    try:
        for k, c in enumerate(configs):
            if bar is not None:
                bar.set_postfix_str(f"config {k + 1}/{len(configs)} {c.name}")
            if todo[c.name]:
                decode_examples(model, tok, task, examples, c, indices=todo[c.name], batch_size=batch_size, seed=seed,
                                on_batch=lambda recs, c=c: store.append(c.name, rank, recs), progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if world > 1:
        dist.barrier()
    summaries = mark_best_alpha([summarize(c, [r for _, r in sorted(store.records(c.name).items())])
                                 for c in configs])
    if rank == 0:
        name = getattr(task, "name", "task")
        write_json_atomic(store.out / "summary.json", {"task": name, "settings": store.settings,
                                                       "configurations": summaries})
        (store.out / "summary.md").write_text(table(summaries, title=f"{name}: {store.settings.get('model')}"))
        if authors_layout:
            for c in configs:
                recs = [r for _, r in sorted(store.records(c.name).items())]
                write_authors_layout(store.out, name, c, recs, store.settings)
        log(table(summaries, title=name))
    return summaries

"""Masked-diffusion training of evofast's LLaDA architecture from scratch on a synthetic task.

The objective is LLaDA's (Nie et al. 2025, eq. 3 / its SFT form): per sequence a mask
ratio t ~ U(eps, 1); every response token is replaced by the mask token with
probability t; the loss is the cross-entropy on the masked positions weighted by
1 / t, summed and divided by the response length (gen_length, <eos> padding
included, so the model learns where an answer ends). The prompt is never masked:
it is the condition, as in LLaDA's supervised fine-tuning.

Sequences are laid out exactly as `evofast.generate` sees them: <bos> + prompt,
left-padded to the task's prompt width (pads hidden by the attention mask, positions
counted from the first real token), then gen_length response tokens (the response,
then <eos> to the end). Data is an endless seeded stream of the task's train split.

    model, tok = build_model(task, d_model=128, n_layers=4)
    log = train(model, tok, task, steps=2000, batch_size=64, minutes=10)
    save(model, tok, task, "out/add3", log)
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..ops._checks import integer
from ..tasks.base import encode_batch

__all__ = ["build_model", "encode_batch", "masked_diffusion_loss", "train", "save", "TrainLog"]


def build_model(task, tok=None, d_model: int = 128, n_layers: int = 4, n_heads: int = 4, seed: int = 0,
                mlp_ratio: int = 3):
    """A fresh (random) LLaDAModelLM sized for the task's sequences, and its tokenizer."""
    from ..models.llada import LLaDAConfig, LLaDAModelLM
    from ..tasks import make_tokenizer

    for name, v in (("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads), ("mlp_ratio", mlp_ratio)):
        integer(name, v, lo=1)
    if d_model % n_heads:
        raise ValueError(f"d_model: must be a multiple of n_heads={n_heads}, got {d_model}")
    tok = tok or make_tokenizer()
    V = len(tok)
    config = LLaDAConfig(
        vocab_size=V, embedding_size=V, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
        mlp_hidden_size=mlp_ratio * d_model, max_sequence_length=4 * (task.prompt_length + 1 + task.gen_length),
        mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, init_fn="normal", init_std=0.02)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LLaDAModelLM(config)
    return model, tok


def masked_diffusion_loss(model, batch: dict, mask_id: int, generator: Optional[torch.Generator] = None,
                          eps: float = 1e-3) -> torch.Tensor:
    """LLaDA's loss on the response part of `batch` (see the module docstring): mean over
    rows of sum_{masked i} CE_i / t / G."""
    ids = batch["input_ids"]
    device = ids.device
    P = batch["prompt_width"]
    B, L = ids.shape
    G = L - P
    t = eps + (1 - eps) * torch.rand(B, 1, generator=generator, device=device)
    masked = torch.zeros(B, L, dtype=torch.bool, device=device)
    masked[:, P:] = torch.rand(B, G, generator=generator, device=device) < t
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    logits = model(input_ids=noisy, attention_mask=batch["attention_mask"].to(device),
                   position_ids=batch["position_ids"].to(device)).logits
    ce = F.cross_entropy(logits[:, P:].float().transpose(1, 2), ids[:, P:], reduction="none")   # (B, G)
    weighted = (ce * masked[:, P:] / t).sum(dim=1) / G
    return weighted.mean()


@dataclass
class TrainLog:
    steps: int = 0
    examples: int = 0
    seconds: float = 0.0
    final_loss: Optional[float] = None
    losses: list = field(default_factory=list)         # (step, mean loss since the last entry)
    config: dict = field(default_factory=dict)


def _lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(total - warmup, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def train(model, tok, task, *, steps: int = 2000, batch_size: int = 64, lr: float = 1e-3,
          warmup: int = 100, weight_decay: float = 0.01, minutes: Optional[float] = None, seed: int = 0,
          device=None, progress: bool = True, log_every: int = 50, loss_fn: Optional[Callable] = None,
          desc: str = "train-base") -> TrainLog:
    """Train `model` in place for `steps` optimizer steps (or until `minutes` run out: the
    learning-rate schedule then follows the estimated number of steps that fit).
    Only parameters that require grad are trained (a LoRA-wrapped model trains its adapters).
    `loss_fn(model, batch, mask_id, generator)` replaces `masked_diffusion_loss` (the batch is
    `encode_batch`'s on the device; `evofast.study.finetune` passes the CTS loss this way), so
    every objective runs the same optimiser, schedule, clipping and data stream.
    Returns a TrainLog; the model is left in eval mode."""
    for name, v, lo in (("steps", steps, 1), ("batch_size", batch_size, 1), ("warmup", warmup, 0),
                        ("log_every", log_every, 1)):
        integer(name, v, lo=lo)
    if not lr > 0:
        raise ValueError(f"lr: must be > 0, got {lr!r}")
    if minutes is not None and not minutes > 0:
        raise ValueError(f"minutes: must be > 0, got {minutes!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).train()
    mask_id = int(model.config.mask_token_id)
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    loss_fn = loss_fn or masked_diffusion_loss
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    gen = torch.Generator(device=device).manual_seed(seed)
    data = task.stream("train", seed)
    log = TrainLog(config={"steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup,
                           "weight_decay": weight_decay, "minutes": minutes, "seed": seed, "device": str(device)})
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=f"{desc} {task.name}", unit="step")
    t0 = time.perf_counter()
    total = steps
    run_loss, run_n = 0.0, 0
    step = 0
    try:
        while step < total:
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, lr, min(warmup, max(total // 10, 1)))
            batch = encode_batch(tok, task, [next(data) for _ in range(batch_size)])
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            loss = loss_fn(model, batch, mask_id, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            step += 1
            run_loss += float(loss.detach())
            run_n += 1
            elapsed = time.perf_counter() - t0
            if minutes is not None and step >= 20 and step % 10 == 0:
                # a time budget: fit the schedule to the steps the remaining time allows at the
                # average speed so far (re-estimated, since a shared machine's speed varies), at most `steps`
                fit = step + int((minutes * 60 - elapsed) / (elapsed / step))
                total = min(steps, max(step + 1, fit))
                if bar is not None:
                    bar.total = total
                    bar.refresh()
            if minutes is not None and elapsed > minutes * 60:
                break
            if step % log_every == 0 or step == total:
                log.losses.append((step, run_loss / run_n))
                if bar is not None:
                    bar.set_postfix(loss=f"{run_loss / run_n:.3f}")
                run_loss, run_n = 0.0, 0
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if run_n:
        log.losses.append((step, run_loss / run_n))
    log.steps, log.examples = step, step * batch_size
    log.seconds = time.perf_counter() - t0
    log.final_loss = log.losses[-1][1] if log.losses else None
    model.eval()
    return log


def save(model, tok, task, out, log: Optional[TrainLog] = None) -> Path:
    """save_pretrained (safetensors) + tokenizer + the task spec (+ the training log) in `out`, published
    atomically (an interrupted save leaves no directory that looks like a model)."""
    from ..tasks import TASK_FILE

    from ..cts.output import progress_bars, publish

    def write(d: Path) -> None:
        with progress_bars(False):                # a one-file model: no "writing shards" bar
            model.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
        (d / TASK_FILE).write_text(json.dumps(task.spec(), indent=2) + "\n")
        if log is not None:
            (d / "train_log.json").write_text(json.dumps(asdict(log), indent=2) + "\n")
    return publish(out, write)                  # written beside `out`, then moved into place

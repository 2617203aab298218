"""Fine-tuning a trained base for the study: the FT-baseline and CTS arms, alike in all but the loss.

    model, log = finetune(base, tok, task, objective="cts", lora_r=16, steps=150, lr=1e-3, seed=0)

Both arms run `evofast.study.pretrain.train` (the same AdamW, warm-up and cosine schedule,
clipping, batches of the task's train stream for the same seed) on the same trainable subset
(LoRA of rank `lora_r` on the attention q / k / v projections, merged afterwards, or every
parameter with `lora_r=None`). Only the loss differs:

    "md"    the plain masked-diffusion loss of pretraining (`masked_diffusion_loss`): the FT-baseline
    "cts"   `evofast.cts.cts_loss` on `CTSCollator` batches configured like decoding: no extra
            pads, blocks of the task's decoding block on decoding's grid (never in the prompt),
            `K` trajectory steps of `d` tokens with `K d <= block` (`exact_blocks`, `grid_starts`)

The task must be fixed-width (every prompt exactly its width): CTS batches carry no attention
mask, so an unpadded batch is what makes its layout the one decoding and pretraining see.
"""
from __future__ import annotations

import copy
import warnings
from typing import Optional, Sequence

import torch

from .pretrain import TrainLog, train

__all__ = ["OBJECTIVES", "cts_objective", "finetune"]

OBJECTIVES = ("md", "cts")


def cts_objective(task, mask_id: int, pad_id: int, *, seed: int = 0, K: int = 4, per_de_nums: Sequence[int] = (1, 2),
                  k_soft: int = 3):
    """A `train(loss_fn=...)` loss: each `encode_batch` batch noised by an inference-like
    `CTSCollator` (draws from a CPU generator seeded by `seed`), then `cts_loss`."""
    from ..cts import CTSCollator, cts_loss

    collator = CTSCollator(mask_id, pad_id, K=K, per_de_nums=per_de_nums, block_sizes=(task.block_length,),
                           extra_pad_prob=0.0, exact_blocks=True, grid_starts=True)
    draws = torch.Generator().manual_seed(seed)

    def loss(model, batch, mask_id_, generator):
        if not bool(batch["attention_mask"].all()):
            raise ValueError(f"task: {task!r} pads some prompts; CTS fine-tuning needs a fixed-width task "
                             "(e.g. countdown-synth:aligned=1)")
        P = batch["prompt_width"]
        examples = [{"input_ids": row, "prompt_length": P} for row in batch["input_ids"].cpu()]
        cts_batch = collator.noise(collator.pad(examples), draws)
        return cts_loss(model, cts_batch, k_soft=k_soft, generator=draws)
    return loss


def finetune(base, tok, task, *, objective: str, lora_r: Optional[int] = None, steps: int = 150,
             batch_size: int = 32, lr: float = 1e-3, warmup: int = 15, seed: int = 0, device=None,
             progress: bool = False, K: int = 4, per_de_nums: Sequence[int] = (1, 2)) -> tuple:
    """A fine-tuned copy of `base` (left untouched) and its TrainLog (see the module docstring)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: must be one of {OBJECTIVES}, got {objective!r}")
    model = copy.deepcopy(base)
    if device is not None:
        model.to(device)
    trained = model
    if lora_r is not None:
        from ..cts.lora import add_lora
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # peft reads transformers' deprecated is_gradient_checkpointing (a FutureWarning per model)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            torch.manual_seed(seed)                         # peft draws LoRA's A from the global generator
            trained = add_lora(model, lora_r)
    loss_fn = None
    if objective == "cts":
        loss_fn = cts_objective(task, int(model.config.mask_token_id), int(model.config.pad_token_id), seed=seed,
                                K=K, per_de_nums=per_de_nums)
    log: TrainLog = train(trained, tok, task, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, seed=seed,
                          device=device, progress=progress, loss_fn=loss_fn, log_every=max(1, steps // 10),
                          desc=f"finetune {objective}")
    log.config.update(objective=objective, lora_r=lora_r)
    if lora_r is not None:
        model = trained.merge_and_unload()
    model.eval()
    return model, log

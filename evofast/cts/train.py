"""`train_cts`: a whole CTS run from Python (what `evofast train-cts` calls).

Checks first (output directory, ids, LoRA targets, which examples are usable),
then LoRA, the `CTSTrainer` run (checkpoints every `save_steps` optimizer steps
into the output directory, resumable), and the final model published into the
output directory with its tokenizer (see `evofast.cts.output`).
"""
from __future__ import annotations

import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from transformers import TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from . import distributed
from .collator import CTSCollator
from .lora import add_lora
from .output import check_output_dir, checkpoints, clear_checkpoints, last_checkpoint, progress_bars, save_model
from .trainer import CTSTrainer


class _LossLog(TrainerCallback):
    """Collects every logged training loss (and calls `on_loss(step, loss)`)."""

    def __init__(self, on_loss: Optional[Callable[[int, float], None]] = None):
        self.losses = []
        self.on_loss = on_loss

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and state.is_world_process_zero:
            self.losses.append((int(state.global_step), float(logs["loss"])))
            if self.on_loss is not None:
                self.on_loss(*self.losses[-1])


class _QuietProgress(ProgressCallback):
    """The Trainer's progress bar, with the loss in the bar instead of a printed dict per log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{float(logs['loss']):.4f}")


def _stderr(msg: str) -> None:
    print(f"evofast train-cts: {msg}", file=sys.stderr)


def train_cts(model, tokenizer, examples, *, output_dir=None, overwrite: bool = False, resume: bool = False,
              save_steps: int = 0, save_total_limit: Optional[int] = 2, source_dir=None,
              lora_r: Optional[int] = 128, lora_alpha: Optional[int] = None,
              target_modules: Optional[Sequence[str]] = None,
              mask_id: Optional[int] = None, pad_id: Optional[int] = None, K: int = 4,
              per_de_nums: Sequence[int] = (1, 2, 4, 8), block_sizes: Sequence[int] = (512,),
              max_length: Optional[int] = None, extra_pad_prob: float = 0.5, exact_blocks: bool = False,
              grid_starts: bool = False, k_soft: int = 3,
              epochs: float = 1.0, max_steps: int = -1,
              batch_size: int = 1, grad_accum: int = 1, lr: float = 1e-5, weight_decay: float = 0.0,
              bf16: bool = False, gradient_checkpointing: bool = False,
              seed: int = 0, logging_steps: int = 1, merge: bool = True, progress: bool = True,
              on_loss: Optional[Callable[[int, float], None]] = None,
              log: Optional[Callable[[str], None]] = None, callbacks: Sequence = (), **training_kwargs):
    """Train `model` with CTS on `examples` (dicts of `input_ids`, `prompt_length`; see
    `evofast.cts.encode_examples`) and return `(model, losses)`.

    `lora_r=None` trains every parameter; otherwise LoRA (peft) on `target_modules`
    (default: the model's attention q / k / v projections). With `output_dir` the
    result is published there (LoRA merged into the weights when `merge`, else the
    adapter alone) with the tokenizer and the task file of `source_dir`; the
    directory must be new or empty unless `overwrite` (or `resume`). `save_steps`
    > 0 writes a checkpoint into `output_dir` every that many optimizer steps (the
    last `save_total_limit` kept); `resume` continues from the last one with the
    same data order and noise, so the result equals an uninterrupted run's.
    Examples that cannot be trained on are reported through `log` (default:
    stderr) before training. `losses` is the list of `(global_step, loss)` logged.
    `extra_pad_prob`, `exact_blocks` and `grid_starts` go to `CTSCollator`: with
    `extra_pad_prob=0.0, exact_blocks=True, grid_starts=True` and `block_sizes` the
    decoding block, the blocks trained on are those decoding sees.
    Other keyword arguments go to `TrainingArguments`.
    """
    log = log or _stderr
    out = check_output_dir(output_dir, overwrite=overwrite, resume=resume)
    if isinstance(save_steps, bool) or not isinstance(save_steps, int) or save_steps < 0:
        raise ValueError(f"save_steps: expected an int >= 0, got {save_steps!r}")
    if save_steps and out is None:
        raise ValueError("save_steps: checkpoints need output_dir")
    cfg = getattr(model, "config", None)
    mask_id = mask_id if mask_id is not None else getattr(cfg, "mask_token_id", None)
    if mask_id is None:
        mask_id = getattr(tokenizer, "mask_token_id", None)
    if pad_id is None:
        pad_id = next((v for v in (getattr(tokenizer, "pad_token_id", None), getattr(cfg, "pad_token_id", None),
                                   getattr(tokenizer, "eos_token_id", None)) if v is not None), None)
    if mask_id is None or pad_id is None:
        raise ValueError("mask_id / pad_id: neither the model config nor the tokenizer names them; pass them")
    if not examples:
        raise ValueError("examples: nothing to train on")
    from ..models.registry import patch
    patch(model, mask_id=int(mask_id))     # fails early (TypeError) for models CTS cannot train
    collator = CTSCollator(int(mask_id), int(pad_id), K=K, per_de_nums=per_de_nums, block_sizes=block_sizes,
                           seed=seed, max_length=max_length, extra_pad_prob=extra_pad_prob,
                           exact_blocks=exact_blocks, grid_starts=grid_starts)
    usable, why = collator.split_usable(examples)
    if why:
        parts = ", ".join(f"{c} {reason}" for reason, c in why.most_common())
        log(f"{sum(why.values())} of {len(examples)} examples cannot be trained on and are left out ({parts})")
    if not usable:
        raise ValueError("examples: none can be trained on")
    set_seed(seed)                         # peft draws LoRA's initial A from the global RNG: same seed, same run
    trained = model if lora_r is None else add_lora(model, lora_r, lora_alpha, target_modules)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    keep_checkpoints = out is not None and (save_steps > 0 or resume)
    created = out is not None and not out.exists()
    scratch = None if keep_checkpoints else tempfile.TemporaryDirectory(prefix="evofast-cts-")
    save_kw = dict(save_strategy="steps", save_steps=save_steps or 500, save_total_limit=save_total_limit) \
        if keep_checkpoints else dict(save_strategy="no")
    use_cpu = training_kwargs.pop("use_cpu", next(model.parameters()).device.type == "cpu")  # where the model is
    args = TrainingArguments(
        output_dir=str(out) if keep_checkpoints else scratch.name, num_train_epochs=epochs,
        max_steps=max_steps, per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
        learning_rate=lr, weight_decay=weight_decay, bf16=bf16,
        logging_steps=logging_steps, report_to=[], seed=seed, data_seed=seed,
        disable_tqdm=not progress, remove_unused_columns=False,
        use_cpu=use_cpu, **save_kw, **training_kwargs)
    losses = _LossLog(on_loss)
    try:
        trainer = CTSTrainer(model=trained, args=args, train_dataset=usable, data_collator=collator,
                             callbacks=[losses, *callbacks], k_soft=k_soft)
        trainer.remove_callback(PrinterCallback)            # the loss is shown once, by on_loss / the bar
        if trainer.pop_callback(ProgressCallback) is not None:
            trainer.add_callback(_QuietProgress())
        if args.fsdp and not trainer.is_fsdp_enabled:
            raise ValueError("fsdp: FSDP is not on: accelerate enables it on GPUs only (launch with torchrun or "
                             "accelerate launch on GPUs, or train without fsdp)")
        if out is not None:
            distributed.check_save(trainer, merge_lora=lora_r is not None and merge)
        if overwrite and out is not None and trainer.is_world_process_zero():
            clear_checkpoints(out)
        with progress_bars(progress):                   # transformers' own bars (checkpoint shards) too
            trainer.train(resume_from_checkpoint=str(last_checkpoint(out)) if resume else None)
        state = distributed.full_state_dict(trainer.model_wrapped, trainer.accelerator) if out is not None else None
        result = trained
        if lora_r is not None and merge and state is None:
            result = trained.merge_and_unload()
        if out is not None and trainer.is_world_process_zero():
            save_model(result, tokenizer, out, source_dir=source_dir, progress=progress, state_dict=state)
    except BaseException:
        if created and out.exists() and not checkpoints(out):   # nothing worth keeping: leave no trace
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if scratch is not None:
            scratch.cleanup()
    if not all(math.isfinite(v) for _, v in losses.losses):
        raise FloatingPointError(f"CTS training diverged: logged losses {losses.losses}")
    if collator.dropped:
        log(f"{collator.dropped} examples were dropped while training")
    return result, losses.losses

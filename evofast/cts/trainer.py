"""`CTSTrainer` (a `transformers.Trainer`) and `train_cts`, the whole CTS run from Python.

`CTSTrainer.training_step` calls `cts_loss(..., backward=True)`: each trajectory
step is backed up as soon as its loss is known (scaled by 1 / gradient
accumulation), so one step's activations are alive at a time. The K forwards
run on the unwrapped model (peft's LoRA layers live inside it), never through
DDP's forward, so DDP's own gradient hooks stay idle; on the micro-step that
syncs, the trainer averages the trainable gradients over the processes itself
(one all-reduce per tensor; LoRA tensors are small). Everything else (bf16
autocast, gradient accumulation, clipping, logging, checkpoints, accelerate /
torchrun launch) is the Trainer's. With an fp16 loss scaler the trainer falls
back to one backward of the whole loss through accelerate (K graphs alive).
FSDP and DeepSpeed are refused (they shard what the K forwards read).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from .collator import CTSCollator, derived_generator
from .loss import base_model, cts_loss
from .output import STAGING


class CTSTrainer(Trainer):
    """A Trainer whose loss is `cts_loss`. Extra keyword arguments: `k_soft` (3) and
    `cts_backward` (True: backward per trajectory step). The data collator defaults to
    a `CTSCollator` built from the model's mask and pad ids; `remove_unused_columns` is
    turned off (the examples' keys are not model arguments)."""

    def __init__(self, *args, k_soft: int = 3, cts_backward: bool = True, **kwargs):
        if kwargs.get("data_collator") is None and len(args) < 3:
            model = kwargs.get("model") if "model" in kwargs else (args[0] if args else None)
            cfg = getattr(base_model(model), "config", None) if model is not None else None
            mask_id, pad_id = getattr(cfg, "mask_token_id", None), getattr(cfg, "pad_token_id", None)
            if mask_id is None or pad_id is None:
                raise ValueError("data_collator: the model's config has no mask_token_id / pad_token_id; pass "
                                 "data_collator=evofast.cts.CTSCollator(mask_id, pad_id, ...)")
            kwargs["data_collator"] = CTSCollator(int(mask_id), int(pad_id))
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False   # read when the dataloaders are built, not before
        # a CTSCollator's random half runs in training_step, keyed by the optimizer step (exact resume)
        self.cts_collator = self.data_collator if isinstance(self.data_collator, CTSCollator) else None
        if self.cts_collator is not None:
            self.data_collator = self.cts_collator.pad
        self._draws = {}                          # phase -> (global step, batches drawn at that step)
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            raise NotImplementedError("CTSTrainer runs the K trajectory forwards on the unwrapped model and "
                                      "averages the gradients itself: DDP (torchrun / accelerate) only, not FSDP "
                                      "or DeepSpeed")
        self.k_soft = int(k_soft)
        self.cts_backward = bool(cts_backward)

    def _cts_model(self, model):
        return base_model(self.accelerator.unwrap_model(model))

    def _noised(self, inputs: dict, phase: str):
        """(batch, generator): a padded batch noised with draws derived from the collator's seed, the
        phase, the optimizer step, the micro-batch within it and the process; the same generator
        then draws the mask weights. A batch the collator already noised passes through."""
        if self.cts_collator is None or "next_positions" in inputs:
            return inputs, None
        step = self.state.global_step
        last_step, n = self._draws.get(phase, (None, 0))
        n = n if last_step == step else 0
        self._draws[phase] = (step, n + 1)
        gen = derived_generator(self.cts_collator.seed, phase, step, n, self.args.process_index)
        return self.cts_collator.noise(inputs, gen), gen

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs, gen = self._noised(inputs, "loss")
        loss = cts_loss(self._cts_model(model), inputs, k_soft=self.k_soft, generator=gen)
        return (loss, {"loss": loss}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the CTS loss only (the model has no `labels` argument to call it with)."""
        inputs, gen = self._noised(inputs, "eval")
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = cts_loss(self._cts_model(model), inputs, k_soft=self.k_soft, generator=gen)
        return loss.detach(), None, None

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written under `STAGING` and renamed to `checkpoint-N` once every
        process has written its part (files flushed to disk first): a crash while saving never
        leaves a folder that `resume` would take for a complete checkpoint."""
        run_dir = Path(self._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staged = run_dir / STAGING / name
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)        # left by a crash
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial=None: str(run_dir / STAGING)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            _fsync_tree(staged)
            final = run_dir / name
            if final.exists():                                   # saved twice at one step
                shutil.rmtree(final)
            os.replace(staged, final)
            try:
                staged.parent.rmdir()                            # only when nothing else is staged
            except OSError:
                pass
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs, gen = self._noised(inputs, "train")
        inputs = self._prepare_inputs(inputs)
        ga = max(1, int(getattr(self, "current_gradient_accumulation_steps", None)
                        or self.args.gradient_accumulation_steps))
        per_step = self.cts_backward and getattr(self.accelerator, "scaler", None) is None
        with self.compute_loss_context_manager():
            if per_step:
                loss = cts_loss(self._cts_model(model), inputs, k_soft=self.k_soft, backward=True,
                                grad_scale=1.0 / ga, generator=gen)
            else:
                loss = cts_loss(self._cts_model(model), inputs, k_soft=self.k_soft, generator=gen)
        if not per_step:
            self.accelerator.backward(loss / ga)
        if self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:
            self._average_gradients(model)
        return loss.detach() / ga

    def _average_gradients(self, model) -> None:
        """All-reduce (mean) the trainable parameters' gradients over the processes."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size()
        for p in self.accelerator.unwrap_model(model).parameters():
            if p.requires_grad:
                if p.grad is None:   # keep the collective in step on every rank
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(world)


def _fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` (and the folders) to disk."""
    for root, _, files in os.walk(folder):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

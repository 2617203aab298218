"""`CTSTrainer`: a `transformers.Trainer` whose loss is the CTS loss, for one process or many.

Each micro-batch's K trajectory steps run one at a time (`Trajectory`): a forward of
the wrapped model, then that step's backward (scaled by 1 / K and 1 / gradient
accumulation), so one step's activations are alive at a time. Under DDP, FSDP2 and
DeepSpeed ZeRO (stages 1-3, with or without CPU offload) the steps are gradient
accumulation inside one optimizer step: see `evofast.cts.distributed` for how
each wrapper is driven, and `check_setup` for what is refused before the first step.
Everything else (mixed precision, accumulation over micro-batches, clipping,
logging, checkpoints, launch by torchrun / accelerate) is the Trainer's.

Exact resume: the training data loader only pads (`CTSCollator.pad`); the noise
and the mask weights of each micro-batch are drawn here from a generator derived
from the collator's seed, the optimizer step, the micro-batch index and the
process, so a run resumed from a checkpoint draws what the uninterrupted run drew.
Checkpoints are written under a staging folder and renamed into place when complete.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from . import distributed
from .collator import CTSCollator, derived_generator
from .loss import Trajectory, base_model
from .output import STAGING
from ..models.registry import get_adapter


class CTSTrainer(Trainer):
    """A Trainer whose loss is `cts_loss`. Extra keyword arguments: `k_soft` (3) and
    `cts_backward` (True: backward per trajectory step). The data collator defaults to
    a `CTSCollator` built from the model's mask and pad ids; `remove_unused_columns` is
    turned off (the examples' keys are not model arguments)."""

    def __init__(self, *args, k_soft: int = 3, cts_backward: bool = True, **kwargs):
        model = kwargs.get("model") if "model" in kwargs else (args[0] if args else None)
        collator = kwargs.get("data_collator") if "data_collator" in kwargs else (args[2] if len(args) > 2 else None)
        if model is not None:
            distributed.check_model(model)
        if collator is None and model is not None:
            cfg = getattr(base_model(model), "config", None)
            mask_id, pad_id = getattr(cfg, "mask_token_id", None), getattr(cfg, "pad_token_id", None)
            if mask_id is None or pad_id is None:
                raise ValueError("data_collator: the model's config has no mask_token_id / pad_token_id; pass "
                                 "data_collator=evofast.cts.CTSCollator(mask_id, pad_id, ...)")
            kwargs["data_collator"] = collator = CTSCollator(int(mask_id), int(pad_id))
        if model is not None:     # patched before any wrapper shards it (the adapter reads the weights' shapes)
            get_adapter(base_model(model), getattr(collator, "mask_id", None))
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False   # read when the dataloaders are built, not before
        distributed.check_setup(self)
        # a CTSCollator's random half runs in training_step, keyed by the optimizer step (exact resume)
        self.cts_collator = self.data_collator if isinstance(self.data_collator, CTSCollator) else None
        if self.cts_collator is not None:
            self.data_collator = self.cts_collator.pad
        self._draws = {}                          # phase -> (global step, batches drawn at that step)
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

    def _trajectory(self, model, inputs: dict, phase: str) -> Trajectory:
        inputs, gen = self._noised(inputs, phase)
        alphas = inputs.get("alphas")                      # a pre-noised batch may carry its mask weights
        inputs = self._prepare_inputs(inputs)
        return Trajectory(self._cts_model(model), inputs, self.k_soft, alphas, generator=gen,
                          device=self.args.device)

    def _run_steps(self, model, traj: Trajectory, n: int):
        """The next `n` steps' summed loss, as one forward of the wrapped model (autocast on)."""
        def steps():
            with self.accelerator.autocast():
                return sum(traj.step() for _ in range(n))
        return distributed.call_as_forward(model, steps)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        traj = self._trajectory(model, inputs, "loss")
        loss = self._run_steps(model, traj, traj.K) / traj.K
        return (loss, {"loss": loss}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the CTS loss only (the model has no `labels` argument to call it with)."""
        with torch.no_grad():
            traj = self._trajectory(model, inputs, "eval")
            loss = self._run_steps(model, traj, traj.K) / traj.K
        return loss.detach(), None, None

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        traj = self._trajectory(model, inputs, "train")
        K = traj.K
        ga = max(1, int(getattr(self, "current_gradient_accumulation_steps", None)
                        or self.args.gradient_accumulation_steps))
        if not self.cts_backward:                  # one backward of the whole loss (K graphs alive)
            loss = self._run_steps(model, traj, K) / K
            self._backward(model, loss / ga, last=True)
            return loss.detach() / ga
        total = torch.zeros((), dtype=torch.float32, device=self.args.device)
        for k in range(K):
            last = k == K - 1
            # the Trainer syncs on the last micro-batch only; within it, only the last step syncs
            hold = self.accelerator.sync_gradients and not last
            with distributed.sync_off(model) if hold else contextlib.nullcontext():
                loss_k = self._run_steps(model, traj, 1)
                if loss_k.requires_grad:
                    self._backward(model, loss_k / (K * ga), last=last)
            total += loss_k.detach().float()
        return total / (K * ga)

    def _backward(self, model, loss, last: bool) -> None:
        """accelerate's backward (loss scaling; DeepSpeed's engine backward and, at the boundary, its
        step); under DeepSpeed a step before the last stays inside the accumulation window."""
        engine = distributed.deepspeed_engine(model)
        if engine is None:
            self.accelerator.backward(loss)
        elif last:
            self.accelerator.backward(loss, scale_wrt_gas=False)   # as the Trainer does: our loss is scaled
        else:
            engine.set_gradient_accumulation_boundary(False)
            engine.backward(loss, scale_wrt_gas=False)

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

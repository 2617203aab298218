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

import math
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments

from .collator import CTSCollator
from .loss import base_model, cts_loss


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
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            raise NotImplementedError("CTSTrainer runs the K trajectory forwards on the unwrapped model and "
                                      "averages the gradients itself: DDP (torchrun / accelerate) only, not FSDP "
                                      "or DeepSpeed")
        self.k_soft = int(k_soft)
        self.cts_backward = bool(cts_backward)

    def _cts_model(self, model):
        return base_model(self.accelerator.unwrap_model(model))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = cts_loss(self._cts_model(model), inputs, k_soft=self.k_soft)
        return (loss, {"loss": loss}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the CTS loss only (the model has no `labels` argument to call it with)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = cts_loss(self._cts_model(model), inputs, k_soft=self.k_soft)
        return loss.detach(), None, None

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        ga = max(1, int(getattr(self, "current_gradient_accumulation_steps", None)
                        or self.args.gradient_accumulation_steps))
        per_step = self.cts_backward and getattr(self.accelerator, "scaler", None) is None
        with self.compute_loss_context_manager():
            if per_step:
                loss = cts_loss(self._cts_model(model), inputs, k_soft=self.k_soft, backward=True,
                                grad_scale=1.0 / ga)
            else:
                loss = cts_loss(self._cts_model(model), inputs, k_soft=self.k_soft)
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


class _LossLog(TrainerCallback):
    """Collects every logged training loss (and calls `on_loss(step, loss)`)."""

    def __init__(self, on_loss: Optional[Callable[[int, float], None]] = None):
        self.losses = []
        self.on_loss = on_loss

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append((int(state.global_step), float(logs["loss"])))
            if self.on_loss is not None:
                self.on_loss(*self.losses[-1])


def add_lora(model, r: int = 128, alpha: Optional[int] = None,
             target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj"), dropout: float = 0.0):
    """`model` wrapped by peft with LoRA on `target_modules` (the paper: r = 128 on q / k / v)."""
    from peft import LoraConfig, get_peft_model

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"lora_r: expected a positive int, got {r!r}")
    cfg = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, lora_dropout=dropout,
                     target_modules=list(target_modules))
    return get_peft_model(model, cfg)


def train_cts(model, tokenizer, examples, *, output_dir: Optional[str] = None, lora_r: Optional[int] = 128,
              lora_alpha: Optional[int] = None, target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj"),
              mask_id: Optional[int] = None, pad_id: Optional[int] = None, K: int = 4,
              per_de_nums: Sequence[int] = (1, 2, 4, 8), block_sizes: Sequence[int] = (512,),
              max_length: Optional[int] = None, extra_pad_prob: float = 0.5, k_soft: int = 3,
              epochs: float = 1.0, max_steps: int = -1,
              batch_size: int = 1, grad_accum: int = 1, lr: float = 1e-5, weight_decay: float = 0.0,
              bf16: bool = False, gradient_checkpointing: bool = False,
              seed: int = 0, logging_steps: int = 1, merge: bool = True, progress: bool = True,
              on_loss: Optional[Callable[[int, float], None]] = None, **training_kwargs):
    """Train `model` with CTS on `examples` (dicts of `input_ids`, `prompt_length`; see
    `evofast.cts.encode_examples`) and return `(model, losses)`.

    `lora_r=None` trains every parameter; otherwise LoRA (peft) on `target_modules`.
    With `output_dir` the result is saved there with `save_pretrained` (LoRA merged
    into the weights when `merge`, else the adapter alone), with the tokenizer when
    it has `save_pretrained`. `losses` is the list of `(global_step, loss)` logged.
    Other keyword arguments go to `TrainingArguments`.
    """
    import tempfile

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
                           generator=torch.Generator().manual_seed(seed), max_length=max_length,
                           extra_pad_prob=extra_pad_prob)
    trained = model if lora_r is None else add_lora(model, lora_r, lora_alpha, target_modules)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    scratch = None
    if output_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="evofast-cts-")
    args = TrainingArguments(
        output_dir=output_dir if output_dir is not None else scratch.name, num_train_epochs=epochs,
        max_steps=max_steps, per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
        learning_rate=lr, weight_decay=weight_decay, bf16=bf16,
        logging_steps=logging_steps, save_strategy="no", report_to=[], seed=seed, data_seed=seed,
        disable_tqdm=not progress, remove_unused_columns=False,
        use_cpu=next(model.parameters()).device.type == "cpu",   # train where the model is
        **training_kwargs)
    log = _LossLog(on_loss)
    trainer = CTSTrainer(model=trained, args=args, train_dataset=list(examples), data_collator=collator,
                         callbacks=[log], k_soft=k_soft)
    try:
        trainer.train()
        if collator.dropped:
            print(f"evofast train-cts: {collator.dropped} unusable examples dropped (no response token or "
                  f"longer than max_length)")
        result = trained
        if lora_r is not None and merge:
            result = trained.merge_and_unload()
        if output_dir is not None and trainer.is_world_process_zero():
            result.save_pretrained(output_dir)
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(output_dir)
    finally:
        if scratch is not None:
            scratch.cleanup()
    if not all(math.isfinite(v) for _, v in log.losses):
        raise FloatingPointError(f"CTS training diverged: logged losses {log.losses}")
    return result, log.losses

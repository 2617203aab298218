"""How `CTSTrainer` runs the K trajectory steps of a batch under each kind of data parallelism.

The trajectory of one micro-batch is gradient accumulation inside one optimizer
step: K forwards, each followed by its own backward. Three rules make that work
under every wrapper the Trainer / accelerate puts around the model:

* Every step runs as one forward of the wrapped model (`call_as_forward`): the
  wrapper's own forward hooks run around it (DDP's reducer preparation, FSDP2's
  all-gather of the root parameters, DeepSpeed's engine forward; ZeRO-3 fetches
  the weights the loss reads directly, the soft input embedding and the LM head,
  as parameters used inside that forward), and its backward hooks see an ordinary
  forward/backward pair.
* No gradient sync until the last step of the last micro-batch (`sync_off`):
  DDP's `no_sync`, FSDP2's `set_requires_gradient_sync(False)` (gradients are
  accumulated unsharded and reduce-scattered once); on the other micro-batches
  the Trainer has already turned sync off.
* Under DeepSpeed the engine owns backward and the optimizer step: steps before
  the last run `engine.backward` outside the accumulation boundary, the last goes
  through accelerate's `backward`, which steps the engine at the boundary.

`check_setup` refuses, before the first step, what cannot work, naming what to change.
"""
from __future__ import annotations

import contextlib
from typing import Callable

from torch import nn

#: wrapper classes whose forward calls `.module`'s (by name: DeepSpeed need not be installed)
_FORWARDING = ("DistributedDataParallel", "DeepSpeedEngine")


def _is_fsdp2(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:                                   # torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def call_as_forward(model: nn.Module, fn: Callable):
    """`fn()` run as the forward of `model` (DDP / DeepSpeed engine / FSDP2 module / plain):
    the innermost module's `forward` is replaced for this one call, then restored (an instance
    `forward` set by someone else, e.g. accelerate's autocast wrapper, included)."""
    inner = model
    while type(inner).__name__ in _FORWARDING and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    had, prev = "forward" in inner.__dict__, inner.__dict__.get("forward")
    inner.__dict__["forward"] = lambda *args, **kwargs: fn()
    try:
        return model()
    finally:
        if had:
            inner.__dict__["forward"] = prev
        else:
            del inner.__dict__["forward"]


@contextlib.contextmanager
def sync_off(model: nn.Module):
    """Gradients of the backwards inside accumulate locally, unsynchronised (DDP, FSDP2; a no-op
    for a plain module and for DeepSpeed, whose engine decides by its accumulation boundary)."""
    if _is_fsdp2(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif type(model).__name__ == "DistributedDataParallel":
        with model.no_sync():
            yield
    else:
        yield


def deepspeed_engine(model: nn.Module):
    """The DeepSpeed engine when `model` is one, else None."""
    return model if type(model).__name__ == "DeepSpeedEngine" else None


def partitioned(params) -> list:
    """The parameters among `params` that DeepSpeed ZeRO-3 has partitioned."""
    return [p for p in params if p is not None and hasattr(p, "ds_id")]


def check_model(model: nn.Module) -> None:
    """ValueError for a model CTSTrainer cannot take (checked before anything else)."""
    if partitioned(model.parameters()):
        raise ValueError("the model was partitioned by DeepSpeed ZeRO-3 when it was loaded (zero3_init_flag: true "
                         "or deepspeed.zero.Init), before evofast could patch it; set zero3_init_flag: false in the "
                         "accelerate config (ZeRO-3 still shards the model when training starts)")


def check_setup(trainer) -> None:
    """ValueError, before training starts, for a parallelism setup CTS training cannot run."""
    state = trainer.accelerator.state
    if getattr(trainer, "is_fsdp_enabled", False):
        version = getattr(state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise ValueError(f"FSDP version {version}: CTS training runs under FSDP2 only; set fsdp_version: 2 "
                             "in the accelerate config (or fsdp_config={'fsdp_version': 2})")
    pc = getattr(trainer.accelerator, "parallelism_config", None)
    if pc is not None and (getattr(pc, "tp_enabled", False) or getattr(pc, "cp_enabled", False)
                           or getattr(pc, "sp_enabled", False)):
        raise ValueError("parallelism_config: tensor, context or sequence parallelism split what one CTS step "
                         "reads (whole sequences, the whole vocabulary); use data parallelism (DDP, FSDP2, "
                         "DeepSpeed ZeRO) only")


def _zero_stage(trainer) -> int:
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return int(getattr(plugin, "zero_stage", 0) or 0) if getattr(trainer, "is_deepspeed_enabled", False) else 0


def shards_weights(trainer) -> bool:
    """Whether the weights are split over the processes during training (FSDP, ZeRO-3)."""
    return bool(getattr(trainer, "is_fsdp_enabled", False)) or _zero_stage(trainer) == 3


def check_save(trainer, *, merge_lora: bool) -> None:
    """ValueError, before training, when the final model could not be saved as asked."""
    if merge_lora and shards_weights(trainer):
        raise ValueError("merge: LoRA cannot be merged into weights that FSDP / ZeRO-3 shard over the processes; "
                         "save the adapter alone (merge=False, --no-merge) and merge it when loading "
                         "(evofast generate --lora, or peft's merge_and_unload)")
    if _zero_stage(trainer) == 3:
        zero = trainer.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        if not zero.get("stage3_gather_16bit_weights_on_model_save", False):
            raise ValueError("ZeRO-3 saves no model unless it gathers the weights: set zero3_save_16bit_model: "
                             "true in the accelerate config (stage3_gather_16bit_weights_on_model_save in a "
                             "DeepSpeed config file)")


def full_state_dict(model: nn.Module, accelerator):
    """The whole state dict of a sharded model on the main process (every process must call this):
    FSDP2 through torch's distributed state-dict API, ZeRO-3 through accelerate (16-bit weights
    gathered). None when the model is not sharded (its own state dict is whole)."""
    if _is_fsdp2(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    engine = deepspeed_engine(model)
    if engine is not None and engine.zero_optimization_stage() == 3:
        return accelerator.get_state_dict(engine)
    return None

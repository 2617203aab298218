"""Worker of tests/test_cts_distributed.py (run by torchrun, or alone for the one-process reference).

    python cts_dist_worker.py OUT WRAPPER:MODE[,WRAPPER:MODE...]

WRAPPER: "fsdp2" (torch's fully_shard on every block, then the root, as accelerate's FSDP2
plugin wraps a model), "ddp" (DistributedDataParallel), "deepspeed" (the Trainer's own
DeepSpeed integration, ZeRO stage and offload from the environment), or "single" (no
wrapper, one process: the two micro-batches of the global batch accumulated). MODE: "lora"
or "full". Two fixed, pre-noised CTS batches (mask weights included) form the global batch:
rank r trains on batch r; the one-process run on both. Writes OUT.<rank>.pt: per case, the
loss and every trainable parameter's full gradient.
"""
import os
import sys
import tempfile
import warnings

warnings.simplefilter("ignore")

import torch  # noqa: E402

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from evofast.cts import CTSCollator, CTSTrainer  # noqa: E402
from evofast.models import llada  # noqa: E402

V, MASK, PAD, K = 64, 63, 62, 3


def model_and_batches(mode):
    model = llada.tiny(vocab_size=V, d_model=32, n_layers=2, n_heads=4, seed=0)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                                 init_lora_weights=False))
    col = CTSCollator(MASK, PAD, K=K, per_de_nums=(1, 2), block_sizes=(12,), extra_pad_prob=0.0)
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(2):
        exs = [{"input_ids": torch.randint(0, V - 2, (n,), generator=g), "prompt_length": p}
               for n, p in ((30, 5), (24, 8))]
        batch = col.noise(col.pad(exs), g)
        batch["alphas"] = 0.5 + 0.5 * torch.rand(K, 2, generator=g)
        batches.append(batch)
    return model, col, batches


REDUCTIONS, SAVED = {}, {}


def count_reductions():
    """Counts FSDP2's gradient reductions from now on (one per FSDP unit and backward that syncs)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group
    calls = {"n": 0, "on": True}
    real = group.foreach_reduce

    def counted(*args, **kwargs):
        calls["n"] += calls["on"]
        return real(*args, **kwargs)
    group.foreach_reduce = counted
    return calls


def full_grads(model):
    from torch.distributed.tensor import DTensor
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            out[name] = g.detach().clone()
    return out


def saved_weights_are_whole(wrapped, model, mode, accelerator, tmp) -> bool:
    """evofast's final save of a sharded model: the gathered state dict, saved on rank 0 and loaded
    back, holds the model's (untrained) weights whole."""
    from safetensors.torch import load_file

    from evofast.cts import distributed
    state = distributed.full_state_dict(wrapped, accelerator)
    if dist.get_rank() != 0:
        return True
    fresh, _, _ = model_and_batches(mode)
    model.save_pretrained(tmp + "/saved", state_dict=state)
    if mode == "lora":
        from peft import get_peft_model_state_dict
        want = get_peft_model_state_dict(fresh)
        got = load_file(tmp + "/saved/adapter_model.safetensors")
    else:
        want, got = fresh.state_dict(), load_file(tmp + "/saved/model.safetensors")
    return want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)


def run_direct(wrapper, mode, tmp):
    """training_step called directly on a wrapped model (what the Trainer's loop does per micro-batch)."""
    model, col, batches = model_and_batches(mode)
    world = int(os.environ.get("WORLD_SIZE", 1))
    args = TrainingArguments(output_dir=tmp, use_cpu=True, ddp_backend="gloo" if world > 1 else None, report_to=[],
                             per_device_train_batch_size=1, gradient_accumulation_steps=1 if world > 1 else 2)
    trainer = CTSTrainer(model=model, args=args, data_collator=col)
    if wrapper == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        base = model.get_base_model() if mode == "lora" else model
        for block in base.model.transformer.blocks:
            fully_shard(block)
        fully_shard(model)
        wrapped = model
    elif wrapper == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        wrapped = model
    if world > 1:
        calls = count_reductions() if wrapper == "fsdp2" else None
        loss = trainer.training_step(wrapped, batches[dist.get_rank()])
        if calls is not None:
            REDUCTIONS[f"{wrapper}:{mode}"], calls["on"] = calls["n"], False
            SAVED[f"{wrapper}:{mode}"] = saved_weights_are_whole(wrapped, model, mode, trainer.accelerator, tmp)
        dist.all_reduce(loss)
        loss = loss / world
    else:                                           # the Trainer's accumulation: no sync, then sync
        trainer.current_gradient_accumulation_steps = 2
        state = trainer.accelerator.gradient_state
        state._set_sync_gradients(False)
        loss = trainer.training_step(wrapped, batches[0])
        state._set_sync_gradients(True)
        loss = loss + trainer.training_step(wrapped, batches[1])
    return loss, full_grads(model)


def run_deepspeed(mode, tmp):
    """One optimizer step of the Trainer under DeepSpeed: the full gradients are read just before
    the engine steps (DeepSpeed's safe_get_full_grad)."""
    import importlib

    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import safe_get_full_grad
    # no compiled DeepSpeed op on the CPU (minutes of compiling on first use): the shared-memory
    # all-reduce is an inference speed-up, and the optimizer stays torch's (zero_force_ds_cpu_optimizer)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    model, col, batches = model_and_batches(mode)
    stage, offload = int(os.environ["ZERO_STAGE"]), os.environ.get("ZERO_OFFLOAD", "none")
    # ZeRO-3: every weight partitioned and released as soon as its module is done (no persistence,
    # no reuse, no prefetch), so the loss's own reads of the embedding and the head must fetch them
    ds = {"zero_optimization": {"stage": stage, "offload_optimizer": {"device": offload},
                                "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0,
                                "stage3_prefetch_bucket_size": 0, "stage3_max_live_parameters": 0,
                                "stage3_gather_16bit_weights_on_model_save": True},
          "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
    args = TrainingArguments(output_dir=tmp, use_cpu=True, ddp_backend="gloo", report_to=[], deepspeed=ds,
                             per_device_train_batch_size=1, gradient_accumulation_steps=1, max_steps=1,
                             learning_rate=0.0,                  # the saved weights are the initial ones
                             max_grad_norm=0.0, save_strategy="no", disable_tqdm=True, logging_steps=1)
    seen = {}
    real_step = DeepSpeedEngine.step

    def step(engine, *a, **kw):
        seen["grads"] = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()
                         if p.requires_grad}
        return real_step(engine, *a, **kw)
    DeepSpeedEngine.step = step
    losses = []

    class Record(CTSTrainer):
        def training_step(self, *a, **kw):
            losses.append(super().training_step(*a, **kw))
            return losses[-1]
    trainer = Record(model=model, args=args, data_collator=lambda items: items[0], train_dataset=batches)
    trainer.train()
    if stage == 3:
        SAVED[f"deepspeed:{mode}"] = saved_weights_are_whole(trainer.model_wrapped, trainer.model, mode,
                                                             trainer.accelerator, tmp)
    loss = losses[0]
    dist.all_reduce(loss)
    return loss / dist.get_world_size(), seen["grads"]


def run(case: str):
    wrapper, mode = case.split(":")
    with tempfile.TemporaryDirectory() as tmp:
        loss, grads = run_deepspeed(mode, tmp) if wrapper == "deepspeed" else run_direct(wrapper, mode, tmp)
    return {"loss": loss.detach(), "grads": grads}


def main():
    out, cases = sys.argv[1], sys.argv[2].split(",")
    results = {case: run(case) for case in cases}
    results["reductions"], results["saved"] = REDUCTIONS, SAVED
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(results, f"{out}.{rank}.pt")


if __name__ == "__main__":
    main()

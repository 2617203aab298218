"""CTS training (continuous trajectory supervision, docs/semantics.md §3), fused.

    from evofast import cts
    batch = cts.CTSCollator(mask_id, pad_id, K=4)(examples)
    loss = cts.cts_loss(model, batch, k_soft=3, backward=True)
    trainer = cts.CTSTrainer(model=..., args=TrainingArguments(...), ...)

`train_cts(model, tokenizer, examples, ...)` runs the whole thing (LoRA, Trainer,
checkpoints, resume, save) from Python; `evofast train-cts` wraps it. Modules:
collator (noising), loss (`Trajectory`, `cts_loss`), eager (the unfused reference),
trainer (`CTSTrainer`), distributed (DDP / FSDP2 / DeepSpeed), lora, output (where
results go), train (`train_cts`), data. The trainer is imported lazily (it needs
transformers / peft).
"""
from .collator import CTSCollator
from .data import encode_example, encode_examples, load_jsonl
from .eager import eager_cts_loss
from .loss import cts_loss

__all__ = ["CTSCollator", "cts_loss", "eager_cts_loss", "CTSTrainer", "train_cts", "load_jsonl",
           "encode_example", "encode_examples"]


def __getattr__(name):
    if name == "CTSTrainer":
        from .trainer import CTSTrainer
        return CTSTrainer
    if name == "train_cts":
        from .train import train_cts
        return train_cts
    raise AttributeError(f"module 'evofast.cts' has no attribute {name!r}")

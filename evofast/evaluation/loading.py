"""A model and its task for evaluation: a checkpoint directory, patched, and the task it was trained
on (its `evofast_task.json`) or the one named."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["load_model_and_task", "resolve_task"]


def load_model_and_task(path, task_text, device, dtype=None, *, lora=None, merge_lora=False,
                        trust_remote_code=False):
    """(model patched for generate, tokenizer, task) of a checkpoint directory."""
    import torch

    from ..models.loading import load_checkpoint, patch_for_generation

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"--model: {path} is not a directory")
    task = resolve_task(path, task_text)
    model, tok = load_checkpoint(str(path), device, dtype or torch.float32, trust_remote_code,
                                 lora=lora, merge_lora=merge_lora)
    patch_for_generation(model, tok)
    return model, tok, task


def resolve_task(path: Path, task_text):
    from ..tasks import TASK_FILE, parse_task, task_from_spec

    if task_text:
        return parse_task(task_text)
    if (Path(path) / TASK_FILE).exists():
        return task_from_spec(json.loads((Path(path) / TASK_FILE).read_text()))
    raise ValueError(f"--task: {path} has no {TASK_FILE}; name the task")

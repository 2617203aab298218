"""The trained model that ships with evofast, answering its task (what `evofast showcase` prints).

    model, tok, task, card = load()                  # the shipped model, or load("my/model/dir")
    setting = setting_of(card)                       # the decoding its accuracy was measured with
    answers, right, trace = solve(model, tok, task, task.test_set(5, seed=1), setting, trace=True)

The model in `evofast/data/models/addition` is a small LLaDA-architecture model trained
here by the quality study's command (`evofast bench quality --export-model`): pretrained
with masked diffusion on 2-digit addition with worked steps, then CTS-fine-tuned (LoRA on
q / k / v, merged). Its `study.json` card holds the command, the decoding it was scored
with and its accuracy on the study's held-out test problems. Any checkpoint directory with a task file loads the same way
(without a card it decodes with EvoToken, 2 tokens per step, alpha 0.7).
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import torch

from .scoring import Setting

__all__ = ["MODEL_DIR", "STUDY_FILE", "model_dir", "load", "setting_of", "solve"]

MODEL_DIR = ("data", "models", "addition")      # under the evofast package
STUDY_FILE = "study.json"                        # the card: how the model was made and how well it does
_DEFAULT = {"mode": "evotoken", "tokens_per_step": 2, "temperature": 0.0, "alpha": 0.7, "policy": "schedule"}


def model_dir() -> Path:
    """Where the shipped model lies (a folder inside the installed package; it may be absent
    from a source tree that never ran the study)."""
    return Path(str(resources.files("evofast").joinpath(*MODEL_DIR)))


def load(path=None, device="cpu") -> tuple:
    """(model patched for generate, tokenizer, task, study card or None) of the shipped model or of
    the checkpoint directory `path` (its task from its task file)."""
    from ..cts.output import progress_bars
    from ..evaluation import load_model_and_task

    path = Path(path) if path is not None else model_dir()
    if not path.is_dir():
        raise ValueError(f"model: {path} is not a directory (the shipped model is written by "
                         "`evofast bench quality --export-model DIR`)")
    with progress_bars(False):                          # no "loading weights" bar for one small file
        model, tok, task = load_model_and_task(path, None, torch.device(device))
    card_file = path / STUDY_FILE
    card = json.loads(card_file.read_text()) if card_file.exists() else None
    return model, tok, task, card


def setting_of(card: Optional[dict]) -> Setting:
    """The decoding `Setting` of a study card (EvoToken, 2 tokens per step, greedy, alpha 0.7 without one)."""
    d = {**_DEFAULT, **(card or {}).get("decoding", {})}
    return Setting(mode=d["mode"], tokens_per_step=d["tokens_per_step"], temperature=d["temperature"],
                   alpha=d["alpha"] if d["mode"] == "evotoken" else None, policy=d["policy"])


@torch.no_grad()
def solve(model, tok, task, examples: Sequence, setting: Setting, *, k_soft: int = 3, trace: bool = False,
          seed: int = 0) -> tuple:
    """(answers, correct flags, trace or None) of `examples` decoded as one batch with `setting`
    (the answer is the text before the first special token)."""
    from ..generation import generate
    from ..tasks.base import encode_batch

    batch = encode_batch(tok, task, examples, with_response=False)
    am = batch["attention_mask"]
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed) if setting.temperature else None
    out = generate(model, batch["input_ids"].to(device), None if bool(am.all()) else am.to(device),
                   generator=gen, return_trace=trace,
                   **setting.generate_kwargs(task.gen_length, task.block_length, k_soft))
    out, tr = out if trace else (out, None)
    texts = tok.batch_decode(out[:, batch["input_ids"].shape[1]:].tolist(), skip_special_tokens=False)
    return [t.split("<")[0] for t in texts], [bool(task.check(ex, t)) for ex, t in zip(examples, texts)], tr

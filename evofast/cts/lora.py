"""LoRA for CTS: which modules to adapt, and the peft wrapper.

The paper adapts the attention's query, key and value projections (r = 128).
Architectures name them differently: `q_proj` / `k_proj` / `v_proj` (LLaDA,
Qwen2 / Dream), `query` / `key` / `value` (BERT, RoBERTa), one fused `Wqkv`
(ModernBERT). `default_lora_targets` picks the names the model has.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

#: attention projection names, by family; the first family the model has wins
ATTENTION_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("Wqkv",), ("qkv_proj",))


def _linear_names(model: nn.Module) -> list:
    """Module names (full) of the model's linear layers (what peft's LoRA can adapt)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _matches(full_name: str, target: str) -> bool:
    return full_name == target or full_name.endswith("." + target)   # peft's rule for a list of names


def default_lora_targets(model: nn.Module) -> list:
    """The model's attention q / k / v projections by name (ValueError when it has none of them)."""
    names = _linear_names(model)
    for family in ATTENTION_PROJECTIONS:
        found = [t for t in family if any(_matches(n, t) for n in names)]
        if found:
            return found
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    raise ValueError(f"lora_targets: the model has none of the usual attention projections "
                     f"({', '.join(t for f in ATTENTION_PROJECTIONS for t in f)}); name the linear layers to "
                     f"adapt (it has: {', '.join(short) or 'none'})")


def check_lora_targets(model: nn.Module, targets: Sequence[str]) -> list:
    """`targets` as a list, each naming at least one linear layer of the model (else ValueError)."""
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"lora_targets: expected a non-empty list of module names, got {targets!r}")
    names = _linear_names(model)
    missing = [t for t in targets if not any(_matches(n, t) for n in names)]
    if missing:
        short = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(f"lora_targets: no linear layer named {', '.join(missing)} in {type(model).__name__} "
                         f"(its linear layers: {', '.join(short)})")
    return list(targets)


def add_lora(model: nn.Module, r: int = 128, alpha: Optional[int] = None,
             target_modules: Optional[Sequence[str]] = None, dropout: float = 0.0):
    """`model` wrapped by peft with LoRA of rank `r` on `target_modules` (default: the attention
    projections, `default_lora_targets`); alpha defaults to 2 r (the paper: r = 128, alpha = 256)."""
    from peft import LoraConfig, get_peft_model

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"lora_r: expected a positive int, got {r!r}")
    targets = default_lora_targets(model) if target_modules is None else check_lora_targets(model, target_modules)
    cfg = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, lora_dropout=dropout,
                     target_modules=targets)
    return get_peft_model(model, cfg)

"""Loading a model for evofast: a checkpoint directory, a LoRA adapter on it, or the tiny model.

    model, tok = load_checkpoint("/path/LLaDA-8B-Instruct", "cuda", torch.bfloat16,
                                 lora="/path/EvoToken_LLaDA_Instruct_8B_Lora")

A checkpoint's tokenizer is loaded with AutoTokenizer and its model with AutoModel
(LLaDA, Dream), AutoModelForMaskedLM (BERT-like) or AutoModelForCausalLM (a Qwen2
checkpoint run bidirectionally). LLaDA checkpoints load into evofast's own LLaDA
implementation (the same parameter names) unless `trust_remote_code` is given; no
remote code runs without it.

A LoRA adapter directory (what peft's `save_pretrained` writes: adapter_config.json
and adapter_model.safetensors) is loaded with `peft.PeftModel.from_pretrained` and
kept unmerged, as the authors run it; `merge_lora=True` folds it into the weights
(faster, but merged bf16 weights round differently, so tokens are not identical).
`check_lora` finds a missing peft, a directory that holds no adapter, or an adapter
made for another model (module names or shapes the checkpoint does not have) before
any weight is loaded.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional

__all__ = ["load_checkpoint", "load_tiny", "check_checkpoint", "check_lora", "load_lora", "patch_for_generation"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")


def load_tiny(device, dtype):
    """The built-in random model (LLaDA architecture, d_model 64, 2 layers) and its character
    tokenizer. Its matrices are so small that callers on the CPU should use one torch thread
    (more only add synchronisation)."""
    from ..char_tokenizer import tiny_tokenizer
    from . import llada

    tok = tiny_tokenizer()
    model = llada.tiny(vocab_size=len(tok), d_model=64, n_layers=2, n_heads=4, seed=0)
    return model.to(device=device, dtype=dtype), tok


def load_checkpoint(path: str, device, dtype, trust_remote_code: bool = False, *,
                    lora: Optional[str] = None, merge_lora: bool = False):
    """(model in eval mode on `device`, tokenizer) of a checkpoint directory, with an optional
    LoRA adapter (checked by `check_lora` before any weight is loaded)."""
    check_checkpoint(path)
    if lora is not None:
        check_lora(lora, path)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    from . import llada

    llada.register()                                   # model_type "llada" -> evofast's own LLaDA
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    archs = list(getattr(config, "architectures", None) or [])
    if getattr(config, "model_type", None) == "llada":
        auto = AutoModel
    elif any("MaskedLM" in a for a in archs):
        auto = AutoModelForMaskedLM
    elif any("CausalLM" in a for a in archs):
        auto = AutoModelForCausalLM
    else:
        auto = AutoModel
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = auto.from_pretrained(path, config=config, trust_remote_code=trust_remote_code, dtype=dtype)
    # Dream's remote code loaded with transformers 5 leaves its RoPE buffers uninitialised (evofast.patch
    # refuses such a model); a model that can rebuild them from its config does so here
    if callable(getattr(model, "reset_rope_parameters", None)):
        model.reset_rope_parameters()
    if lora is not None:
        model = load_lora(model, lora, merge=merge_lora)
    return model.to(device).eval(), tok


def patch_for_generation(model, tokenizer, mask_id: Optional[int] = None):
    """`evofast.patch` the model (a peft wrapper too) with `mask_id`, or its config's, or else the
    tokenizer's mask token (BERT-like checkpoints keep it there). Returns the model."""
    from .registry import patch, unwrap

    if mask_id is None and getattr(getattr(unwrap(model), "config", None), "mask_token_id", None) is None:
        mask_id = getattr(tokenizer, "mask_token_id", None)
    return patch(model, mask_id=mask_id)


def check_checkpoint(path) -> None:
    """ValueError naming what a local checkpoint directory lacks (a name that is not a local path
    is left to transformers, which may resolve it on a hub)."""
    p = Path(path)
    looks_local = p.is_absolute() or str(path).startswith(".") or p.exists() or str(path).count("/") != 1
    if not looks_local:
        return
    if not p.exists():
        raise ValueError(f"--model: {path} does not exist")
    if not p.is_dir():
        raise ValueError(f"--model: {path} is not a directory")
    if not (p / "config.json").is_file():
        raise ValueError(f"--model: {path} has no config.json (is it a checkpoint directory?)")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"--model: {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")


def load_lora(model, lora: str, *, merge: bool = False):
    """`model` with the LoRA adapter of directory `lora`: a peft `PeftModel` (unmerged), or with
    `merge` the plain model with the adapter folded into its weights."""
    from peft import PeftModel

    wrapped = PeftModel.from_pretrained(model, str(lora), is_trainable=False)
    return wrapped.merge_and_unload() if merge else wrapped


def check_lora(lora: str, model_path: Optional[str] = None) -> dict:
    """Fail (ValueError / ImportError naming the problem) unless `lora` is a LoRA adapter directory
    that fits the checkpoint at `model_path`; returns its adapter config. Reads only file headers."""
    if importlib.util.find_spec("peft") is None:
        raise ImportError("--lora needs peft: pip install peft (or evofast[eval])")
    d = Path(lora)
    if not d.is_dir():
        raise ValueError(f"--lora: {lora} is not a directory")
    if not (d / ADAPTER_CONFIG).is_file():
        raise ValueError(f"--lora: {lora} holds no {ADAPTER_CONFIG} (a directory written by peft's "
                         "save_pretrained, such as the released EvoToken LoRA)")
    config = json.loads((d / ADAPTER_CONFIG).read_text())
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"--lora: {lora} is a {config.get('peft_type')} adapter; evofast loads LoRA adapters")
    if model_path is not None and (d / ADAPTER_WEIGHTS).is_file():
        problem = _mismatch(d / ADAPTER_WEIGHTS, Path(model_path))
        if problem:
            raise ValueError(f"--lora: the adapter in {lora} does not fit the model {model_path} "
                             f"(made for {config.get('base_model_name_or_path') or 'another model'}?): {problem}")
    return config


def _shapes(files) -> dict:
    """name -> shape of every tensor in the given safetensors files (headers only)."""
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                out[name] = tuple(st.get_slice(name).get_shape())
    return out


def _checkpoint_files(model_dir: Path) -> list:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(model_dir.glob("*.safetensors"))


def _mismatch(adapter_file: Path, model_dir: Path) -> Optional[str]:
    """What in the adapter the checkpoint lacks (None when it fits or cannot be read cheaply)."""
    files = _checkpoint_files(model_dir) if model_dir.is_dir() else []
    if not files:
        return None                                   # not safetensors: peft reports problems on load
    weights = _shapes(files)
    for key, shape in sorted(_shapes([adapter_file]).items()):
        for part in (".lora_A.weight", ".lora_B.weight"):
            if not key.endswith(part):
                continue
            module = key[:-len(part)]
            module = module[len("base_model.model."):] if module.startswith("base_model.model.") else module
            base = weights.get(module + ".weight")
            if base is None:
                return f"it adapts {module}, which the checkpoint does not have"
            if part == ".lora_A.weight" and shape[1] != base[1]:
                return f"{module}: the adapter expects {shape[1]} input features, the checkpoint has {base[1]}"
            if part == ".lora_B.weight" and shape[0] != base[0]:
                return f"{module}: the adapter gives {shape[0]} output features, the checkpoint has {base[0]}"
    return None

"""Tiny checkpoint directories for CLI and workflow tests: a random evofast LLaDA saved with
`save_pretrained`, a character tokenizer that transformers' Auto classes load, a LoRA adapter."""
from __future__ import annotations

#: a chat template shaped like LLaDA-Instruct's: its own BOS, a user turn, the assistant header
CHAT_TEMPLATE = ("{% for m in messages %}<bos>Q: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}A:{% endif %}")


def save_char_tokenizer(path, chat_template=None):
    """The tiny model's character tokenizer (a transformers tokenizer that puts a BOS in front of every
    text it encodes, as LLaMA-style ones do), with an optional chat template, saved to `path`."""
    from evofast.char_tokenizer import tiny_tokenizer
    tok = tiny_tokenizer()
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(path)
    return tok


def save_tiny_checkpoint(path, *, chat_template=CHAT_TEMPLATE, vocab_size=100, d_model=32, n_layers=1,
                         n_heads=2, seed=3):
    """A random evofast LLaDA and the character tokenizer in `path`; returns (model, tokenizer)."""
    from evofast.models import llada
    model = llada.tiny(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads, seed=seed)
    model.save_pretrained(path)
    return model, save_char_tokenizer(path, chat_template)


def random_lora(model, r=4, seed=0, targets=("q_proj", "k_proj", "v_proj")):
    """`model` wrapped by peft with a LoRA whose A and B are both random (peft's default B = 0
    would leave the model unchanged)."""
    import torch
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False)
    return get_peft_model(model, cfg)

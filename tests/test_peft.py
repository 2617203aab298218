"""A peft PeftModel (LoRA, unmerged) around a supported model: patch, generate, unpatch, the CLI's --lora.

The authors run LLaDA-8B-Instruct with their released LoRA adapter loaded by
`PeftModel.from_pretrained` and left unmerged; evofast must give, on the same
PeftModel, what their loop gives, token for token.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from _checkpoints import random_lora, save_tiny_checkpoint  # noqa: E402

import evofast  # noqa: E402
from evofast.baselines import authors_generate  # noqa: E402
from evofast.models import llada  # noqa: E402
from evofast.models.registry import ATTR, is_patched  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KW = dict(gen_length=16, block_length=8, steps=8)


def lora_model(seed=1):
    return random_lora(llada.tiny(vocab_size=300, d_model=32, n_layers=2, n_heads=4, seed=seed), seed=seed)


@pytest.mark.parametrize("mode", ["evotoken", "hard"])
def test_patched_peft_model_equals_the_authors_loop(mode):
    pm = lora_model()
    assert evofast.patch(pm) is pm and is_patched(pm)
    M = int(pm.get_base_model().config.mask_token_id)
    prompts = torch.randint(0, M, (2, 6), generator=torch.Generator().manual_seed(0))
    out = evofast.generate(pm, prompts, mode=mode, **KW)
    for r in range(2):
        want = authors_generate(pm, prompts[r:r + 1], mask_id=M, mode=mode, **KW)
        assert torch.equal(out[r:r + 1], want), f"row {r}"
    with pm.disable_adapter():                       # the LoRA layers were active
        assert not torch.equal(evofast.generate(pm, prompts, mode=mode, **KW), out)


def test_saved_and_reloaded_adapter_gives_the_same_tokens(tmp_path):
    from peft import PeftModel
    pm = lora_model()
    prompts = torch.randint(0, 200, (1, 5), generator=torch.Generator().manual_seed(1))
    want = evofast.generate(pm, prompts, **KW)
    pm.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(llada.tiny(vocab_size=300, d_model=32, n_layers=2, n_heads=4, seed=1),
                                      str(tmp_path))
    assert torch.equal(evofast.generate(again, prompts, **KW), want)


def test_unpatch_restores_wrapper_and_model():
    pm = lora_model()
    inner = pm.get_base_model()
    ids = torch.randint(0, 200, (1, 7))
    before = pm(input_ids=ids).logits
    evofast.patch(pm)
    assert is_patched(inner) and pm.__dict__[ATTR] is inner.__dict__[ATTR]
    evofast.patch(pm)                                # idempotent
    evofast.unpatch(pm)
    assert not is_patched(pm) and not is_patched(inner)
    assert torch.equal(pm(input_ids=ids).logits, before)


# --------------------------------------------------------------------------- the command line

def _generate(capsys, *args):
    from evofast.cli import generate as cli_generate
    code = cli_generate.main(["--prompt", "hi", "--gen-length", "8", "--block-length", "8", "--steps", "4",
                              "--device", "cpu", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def checkpoint_and_adapter(tmp_path):
    model_dir, lora_dir = tmp_path / "model", tmp_path / "lora"
    model, tok = save_tiny_checkpoint(model_dir)
    pm = random_lora(model, r=2, seed=5)
    pm.save_pretrained(lora_dir)
    return model_dir, lora_dir, pm, tok


def test_cli_lora_gives_the_peft_model_tokens(capsys, checkpoint_and_adapter):
    from evofast.chat import encode_prompts
    model_dir, lora_dir, pm, tok = checkpoint_and_adapter
    code, out, err = _generate(capsys, "--model", str(model_dir), "--lora", str(lora_dir))
    assert code == 0, err
    ids, _ = encode_prompts(tok, ["hi"])
    want = evofast.generate(pm, ids, gen_length=8, block_length=8, steps=4)
    assert out == tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True) + "\n"
    code, out_merged, err = _generate(capsys, "--model", str(model_dir), "--lora", str(lora_dir), "--merge-lora")
    assert code == 0 and "not identical" in err


def test_cli_lora_problems_are_reported_before_loading(capsys, tmp_path, checkpoint_and_adapter, monkeypatch):
    model_dir, lora_dir, _, _ = checkpoint_and_adapter
    import evofast.models.loading as loading
    monkeypatch.setattr(loading, "load_lora", lambda *a, **k: pytest.fail("a bad adapter reached the loader"))
    other = tmp_path / "other"
    random_lora(llada.tiny(vocab_size=100, d_model=48, n_layers=1, n_heads=2, seed=3), r=2).save_pretrained(other)
    for args, what in [((str(tmp_path / "nowhere"),), "not a directory"),
                       ((str(model_dir),), "adapter_config.json"),
                       ((str(other),), "does not fit")]:
        code, _, err = _generate(capsys, "--model", str(model_dir), "--lora", *args)
        assert code == 2 and what in err, err
    code, _, err = _generate(capsys, "--model", str(model_dir), "--merge-lora")
    assert code == 2 and "--merge-lora needs --lora" in err


def test_cli_lora_without_peft_is_reported(capsys, checkpoint_and_adapter, monkeypatch):
    import importlib.util
    model_dir, lora_dir, _, _ = checkpoint_and_adapter
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    code, _, err = _generate(capsys, "--model", str(model_dir), "--lora", str(lora_dir))
    assert code == 2 and "needs peft" in err

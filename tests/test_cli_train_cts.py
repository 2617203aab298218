"""`evofast train-cts` end to end, `train_cts` from Python, and a 2-process DDP run (gloo, CPU)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from evofast import cli_train_cts

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_torch_thread")]  # peft reads a deprecated transformers property

ROOT = Path(__file__).resolve().parents[1]


def test_cli_tiny_trains_logs_and_saves(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "response": f"{i} + {i} = {2 * i}."}) + "\n"
                            for i in range(6)))
    out = tmp_path / "out"
    rc = cli_train_cts.main(["--model", "tiny", "--data", str(data), "--steps", "8", "--batch-size", "2",
                             "--lr", "3e-3", "--lora-r", "4", "--block-sizes", "16", "--out", str(out),
                             "--no-progress"])
    assert rc == 0
    err = capsys.readouterr().err
    losses = [float(line.rsplit(" ", 1)[1]) for line in err.splitlines() if line.startswith("step ")]
    assert len(losses) == 8 and losses[-1] < losses[0]
    from evofast.models import llada
    saved = llada.LLaDAModelLM.from_pretrained(out)                   # LoRA merged: a plain checkpoint
    assert saved.config.vocab_size == 100 and not any("lora" in n for n, _ in saved.named_parameters())


def test_cli_bad_input(tmp_path, capsys):
    assert cli_train_cts.main(["--model", "tiny", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read --data" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert cli_train_cts.main(["--model", "tiny", "--data", str(bad)]) == 2
    assert "response" in capsys.readouterr().err
    assert cli_train_cts.main(["--model", str(tmp_path)]) == 2                # a checkpoint needs --data
    assert cli_train_cts.main(["--model", "tiny", "--batch-size", "0"]) == 2
    capsys.readouterr()
    assert cli_train_cts.main(["--model", "tiny", "--extra-pad-prob", "1.5", "--steps", "1"]) == 2
    assert "extra_pad_prob" in capsys.readouterr().err                  # reaches the collator's check
    assert cli_train_cts.main(["--model", "tiny", "--device", "nowhere"]) == 2
    assert "--device" in capsys.readouterr().err


def test_train_cts_python_api_adapter_only(tmp_path):
    from evofast.cts import encode_examples, train_cts
    from evofast.models import llada
    from evofast.models.tiny_tokenizer import CharTokenizer

    tok = CharTokenizer()
    model = llada.tiny(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4)
    exs = encode_examples(tok, [{"prompt": "ab", "response": "cdefghijklmnopqrstuvwxyz"}] * 4)
    assert exs[0]["prompt_length"] == 3 and exs[0]["input_ids"][-1] == tok.eos_token_id
    trained, losses = train_cts(model, tok, exs, output_dir=str(tmp_path), lora_r=2, max_steps=2,
                                block_sizes=(16,), per_de_nums=(1, 2), merge=False, progress=False)
    assert len(losses) == 2 and (tmp_path / "adapter_config.json").exists()


@pytest.mark.parametrize("chat", [False, True])
def test_training_prompts_are_the_prompts_generate_feeds(tmp_path, chat):
    """CTS examples start with exactly the ids `evofast generate` gives the model for the same
    prompt (one BOS, from the template or the tokenizer), and hold the response after them."""
    from test_cli_generate import _save_char_tokenizer

    from evofast.chat import prompt_ids
    from evofast.cli_generate import encode_prompts
    from evofast.cts import encode_examples
    template = ("<bos>{% for m in messages %}{{ m['role'][0] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}a: {% endif %}")
    tok = _save_char_tokenizer(tmp_path, template if chat else None)
    ex = encode_examples(tok, [{"prompt": "hi", "response": "yo"}], chat=chat)[0]
    ids, P = ex["input_ids"].tolist(), ex["prompt_length"]
    gen_ids, _ = encode_prompts(tok, ["hi"], chat, "cpu")
    assert ids[:P] == gen_ids[0].tolist() == prompt_ids(tok, "hi", chat)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    tail = tok("yo\n", add_special_tokens=False)["input_ids"] if chat else \
        tok("yo", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids[P:] == tail


WORKER = textwrap.dedent("""
    import json, os, sys, warnings
    warnings.simplefilter("ignore")
    import torch
    torch.set_num_threads(1)
    from evofast.cts import train_cts, encode_examples
    from evofast.models import llada
    from evofast.models.tiny_tokenizer import CharTokenizer
    tok = CharTokenizer()
    model = llada.tiny(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, seed=0)
    recs = [{"prompt": f"Q{i}:", "response": "the quick brown fox jumps over the lazy dog"} for i in range(16)]
    trained, losses = train_cts(model, tok, encode_examples(tok, recs), lora_r=4, max_steps=8, batch_size=2,
                                lr=2e-2, block_sizes=(16,), per_de_nums=(1, 2), merge=False, progress=False,
                                ddp_backend="gloo")
    rank = int(os.environ["RANK"])
    lora = torch.cat([p.detach().flatten() for n, p in trained.named_parameters() if p.requires_grad])
    json.dump({"losses": [l for _, l in losses], "lora": lora.tolist(),
               "world": int(os.environ["WORLD_SIZE"])}, open(sys.argv[1] + f".{rank}", "w"))
""")


def test_ddp_two_processes_gloo_loss_goes_down_and_ranks_agree(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "result"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1))
    assert r0["world"] == 2 and len(r0["losses"]) == 8
    first, last = r0["losses"][:3], r0["losses"][-3:]
    assert sum(last) < sum(first) - 0.1, r0["losses"]
    # the trainer averaged the gradients: both ranks end with the same LoRA weights
    torch.testing.assert_close(torch.tensor(r0["lora"]), torch.tensor(r1["lora"]), rtol=1e-5, atol=1e-6)


def test_cts_trainer_direct_with_accumulation_and_evaluate(tmp_path):
    from transformers import TrainingArguments

    from evofast.cts import CTSTrainer, encode_examples
    from evofast.cts.trainer import add_lora
    from evofast.models import llada
    from evofast.models.tiny_tokenizer import CharTokenizer

    tok = CharTokenizer()
    model = add_lora(llada.tiny(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4), 4)
    exs = encode_examples(tok, [{"prompt": "ab", "response": "cdefghijklmnopqrstuvwxyz"}] * 4)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, gradient_accumulation_steps=2, logging_steps=1, disable_tqdm=True)
    trainer = CTSTrainer(model=model, args=args, train_dataset=exs, eval_dataset=exs)   # default CTSCollator
    assert trainer.train().global_step == 2
    assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))

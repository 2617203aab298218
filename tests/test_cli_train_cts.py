"""`evofast train-cts` end to end, `train_cts` from Python, and a 2-process DDP run (gloo, CPU)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from evofast.cli import generate as cli_generate
from evofast.cli import train_cts as cli_train_cts

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


def _data(tmp_path, n=6, extra=()):
    data = tmp_path / "d.jsonl"
    recs = [{"prompt": f"What is {i} + {i}?", "response": f"{i} + {i} = {2 * i}."} for i in range(n)] + list(extra)
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return data


TINY = ["--model", "tiny", "--steps", "2", "--lora-r", "4", "--block-sizes", "16", "--no-progress"]


def test_cli_saves_the_tokenizer_so_generate_loads_the_output(tmp_path, capsys):
    """`train-cts --model tiny --out DIR` writes a tokenizer with the character tokenizer's ids, and
    `evofast generate --model DIR` runs on it; a second run into DIR is refused, DIR untouched."""
    from transformers import AutoTokenizer

    from evofast.char_tokenizer import tiny_tokenizer
    out = tmp_path / "out"
    assert cli_train_cts.main(TINY + ["--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"saved to {out}" in err
    tok = AutoTokenizer.from_pretrained(out)
    for text in ("What is 1 + 1?\n", "a~ b"):
        assert tok(text)["input_ids"] == tiny_tokenizer()(text)["input_ids"]
    assert cli_generate.main(["--model", str(out), "--prompt", "What is 1 + 1?", "--gen-length", "8",
                              "--block-length", "8", "--steps", "4", "--device", "cpu"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert cli_train_cts.main(TINY + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and "--resume" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert cli_train_cts.main(TINY + ["--out", str(out), "--overwrite"]) == 0          # replaced in place
    assert {p.name for p in out.iterdir()} == set(before)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]        # no temporary left


def test_cli_out_is_checked_before_anything_is_loaded(tmp_path, capsys, monkeypatch):
    from evofast.models import llada

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")
    import evofast.models.loading as loading
    monkeypatch.setattr(loading, "load_checkpoint", no_load)
    monkeypatch.setattr(loading, "load_tiny", no_load)
    model_dir = tmp_path / "model"
    llada.tiny(vocab_size=100, d_model=32, n_layers=1, n_heads=4).save_pretrained(model_dir)
    weights = (model_dir / "model.safetensors").read_bytes()
    data = _data(tmp_path)
    (tmp_path / "file").write_text("x")
    cases = [
        (["--model", str(model_dir), "--out", str(model_dir)], "outside the input model directory"),
        (["--model", str(model_dir), "--out", str(model_dir), "--overwrite"], "outside the input model directory"),
        (["--model", str(model_dir), "--out", str(tmp_path)], "outside the input model directory"),
        (["--model", str(model_dir), "--out", str(tmp_path / "file")], "is a file"),
        (["--model", "tiny", "--out", str(tmp_path / "new"), "--resume"], "no complete checkpoint"),
        (["--model", "tiny", "--resume"], "--resume: needs --out"),
        (["--model", "tiny", "--out", str(tmp_path / "new"), "--resume", "--overwrite"], "choose one"),
        (["--model", "tiny", "--save-steps", "2"], "--save-steps"),
    ]
    for argv, match in cases:
        assert cli_train_cts.main(argv + ["--data", str(data)]) == 2, argv
        assert match in capsys.readouterr().err, argv
    assert (model_dir / "model.safetensors").read_bytes() == weights
    assert not (tmp_path / "new").exists()


def test_cli_losses_once_unusable_reported_first_no_bars(tmp_path, capsys):
    """Every logged loss appears once (no Trainer dict beside it), examples that cannot be trained
    on are reported before the first step, --no-progress silences every bar (shard writing
    included), and a run that fails leaves no output directory behind."""
    long = {"prompt": "Q", "response": "x" * 80}
    data = _data(tmp_path, extra=[long])
    out = tmp_path / "out"
    assert cli_train_cts.main(TINY + ["--data", str(data), "--max-length", "40", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    text = cap.out + cap.err
    steps = [line for line in cap.err.splitlines() if line.startswith("step ")]
    assert len(steps) == 2 and "'loss'" not in text and "train_runtime" not in text
    left = cap.err.index("1 of 7 examples cannot be trained on")
    assert "longer than max_length 40" in cap.err and left < cap.err.index(steps[0])
    assert "Writing model shards" not in text and "it/s" not in text
    bad = tmp_path / "never"
    assert cli_train_cts.main(TINY + ["--data", str(data), "--max-length", "12", "--out", str(bad),
                                      "--per-de-nums", "1"]) == 2
    assert "none can be trained on" in capsys.readouterr().err and not bad.exists()


def test_cli_with_bar_shows_each_loss_once(tmp_path, capsys):
    assert cli_train_cts.main([a for a in TINY if a != "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert len([l for l in cap.err.splitlines() if l.startswith("step ")]) == 2
    assert "'loss'" not in cap.out + cap.err and "no model saved" in cap.err


def test_cli_copies_the_task_file_of_the_input_model(tmp_path, capsys):
    from _checkpoints import save_char_tokenizer as _save_char_tokenizer

    from evofast.models import llada
    from evofast.tasks import TASK_FILE
    src = tmp_path / "src"
    llada.tiny(vocab_size=100, d_model=32, n_layers=1, n_heads=4).save_pretrained(src)
    _save_char_tokenizer(src)
    (src / TASK_FILE).write_text('{"name": "add", "digits": 2}\n')
    out = tmp_path / "out"
    assert cli_train_cts.main(["--model", str(src), "--data", str(_data(tmp_path)), "--steps", "1", "--lora-r", "2",
                               "--block-sizes", "16", "--no-progress", "--out", str(out), "--device", "cpu"]) == 0
    assert (out / TASK_FILE).read_text() == (src / TASK_FILE).read_text()
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()


def test_cli_bad_input(tmp_path, capsys):
    assert cli_train_cts.main(["--model", "tiny", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read --data" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert cli_train_cts.main(["--model", "tiny", "--data", str(bad)]) == 2
    assert "response" in capsys.readouterr().err
    bad.write_text('{"prompt": "x", "response": "y"}\n{"prompt": "x", "response": " "}\n')
    assert cli_train_cts.main(["--model", "tiny", "--data", str(bad)]) == 2
    assert 'bad.jsonl:2: empty "response"' in capsys.readouterr().err
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
    from evofast.char_tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
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
    from _checkpoints import save_char_tokenizer as _save_char_tokenizer

    from evofast.chat import prompt_ids
    from evofast.chat import encode_prompts
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
    from evofast.char_tokenizer import tiny_tokenizer
    tok = tiny_tokenizer()
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
    from evofast.cts.lora import add_lora
    from evofast.models import llada
    from evofast.char_tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    model = add_lora(llada.tiny(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4), 4)
    exs = encode_examples(tok, [{"prompt": "ab", "response": "cdefghijklmnopqrstuvwxyz"}] * 4)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, gradient_accumulation_steps=2, logging_steps=1, disable_tqdm=True)
    trainer = CTSTrainer(model=model, args=args, train_dataset=exs, eval_dataset=exs)   # default CTSCollator
    assert trainer.train().global_step == 2
    assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))


def test_publish_is_all_or_nothing(tmp_path):
    from evofast.cts.output import publish

    def crash(tmp):
        (tmp / "model.safetensors").write_text("half")
        raise OSError("disk full")
    out = tmp_path / "out"
    with pytest.raises(OSError):
        publish(out, crash)
    assert list(tmp_path.iterdir()) == []                           # neither out nor a temporary
    (out / "checkpoint-3").mkdir(parents=True)                      # a run's checkpoints: files move in

    def write(tmp):
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_text("w")
    publish(out, write)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_encode_example_rejects_a_blank_response():
    from evofast.cts import encode_example
    from evofast.char_tokenizer import tiny_tokenizer
    with pytest.raises(ValueError, match="response"):
        encode_example(tiny_tokenizer(), "What?", "  ")


def test_cli_resume_continues_from_the_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    base = TINY[:2] + ["--lora-r", "4", "--block-sizes", "16", "--no-progress", "--out", str(out)]
    assert cli_train_cts.main(base + ["--steps", "2", "--save-steps", "1"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-1", "checkpoint-2"]
    capsys.readouterr()
    assert cli_train_cts.main(base + ["--steps", "3", "--save-steps", "1", "--resume"]) == 0
    steps = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [s.split(":")[0] for s in steps] == ["step 3"]                  # steps 1-2 are not run again
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-3"]  # limit 2
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


@pytest.mark.parametrize("kind", ["bert", "modernbert", "qwen2"])
def test_cli_trains_bert_like_and_qwen2_checkpoints(tmp_path, capsys, kind):
    """train-cts on a BERT / ModernBERT / Qwen2 checkpoint: the mask id comes from the tokenizer, LoRA
    goes on the model's own attention projections, the merged model and tokenizer are saved."""
    import transformers as T
    from _checkpoints import save_char_tokenizer as _save_char_tokenizer
    common = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=128)
    model = {"bert": lambda: T.BertForMaskedLM(T.BertConfig(**common)),
             "modernbert": lambda: T.ModernBertForMaskedLM(T.ModernBertConfig(
                 pad_token_id=98, bos_token_id=97, eos_token_id=98, cls_token_id=97, sep_token_id=98, **common)),
             "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, **common))}[kind]()
    src = tmp_path / "src"
    model.save_pretrained(src)
    _save_char_tokenizer(src)
    out = tmp_path / "out"
    assert cli_train_cts.main(["--model", str(src), "--data", str(_data(tmp_path)), "--steps", "2", "--lora-r", "2",
                               "--block-sizes", "16", "--no-progress", "--out", str(out), "--device", "cpu"]) == 0, \
        capsys.readouterr().err
    saved = type(model).from_pretrained(out)
    assert not any("lora" in n for n, _ in saved.named_parameters()) and (out / "tokenizer.json").exists()
    capsys.readouterr()
    assert cli_train_cts.main(["--model", str(src), "--data", str(_data(tmp_path)), "--steps", "1",
                               "--lora-targets", "nope", "--no-progress", "--device", "cpu"]) == 2
    assert "no linear layer named nope" in capsys.readouterr().err


def test_cli_fsdp_without_gpus_is_a_clear_error(tmp_path, capsys):
    """FSDP needs several processes (transformers says so) on GPUs (accelerate turns FSDP on for GPUs
    only: under torchrun on CPUs train-cts says so instead of training unsharded); no output is left."""
    assert cli_train_cts.main(TINY + ["--fsdp", "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
    assert "fsdp only works in distributed training" in capsys.readouterr().err and not (tmp_path / "o").exists()

"""The trained-model pipeline: masked-diffusion pretraining, evaluation (Wilson interval,
sharding over processes), the train-base / eval commands and the `bench quality` study, all on
micro models (d_model 32) so the whole file takes about a minute."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evofast import cli, tasks
from evofast.study import pretrain
from evofast.study.evaluate import evaluate, wilson_interval

MICRO = ["--d-model", "32", "--layers", "2", "--heads", "2", "--batch-size", "32", "--threads", "1"]
RESULT_KEYS = {"task", "n", "correct", "accuracy", "ci95", "mode", "cache", "steps", "gen_length", "block_length",
               "k_soft", "alpha", "seed", "seconds", "tokens_per_s", "world_size", "samples"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_wilson_interval():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="correct"):
        wilson_interval(11, 10)


def test_encode_batch_layout():
    task = tasks.Addition(2)
    tok = tasks.make_tokenizer()
    exs = [task.example(3, 4), task.example(12, 34)]
    b = pretrain.encode_batch(tok, task, exs)
    P, G = task.prompt_length + 1, task.gen_length
    assert b["input_ids"].shape == (2, P + G) and b["prompt_width"] == P
    row = b["input_ids"][0]
    assert tok.decode(row[:P], skip_special_tokens=True) == "03+04="
    assert row[0] == tok.bos_token_id and b["attention_mask"].all()            # fixed width: no padding
    assert b["position_ids"][0].tolist() == list(range(P + G))
    c = tasks.Countdown(3, 12)
    b = pretrain.encode_batch(tok, c, [tasks.Example("1,2,3:6=", "1+2+3", "6", (1, 2, 3))])
    P = c.prompt_length + 1
    row = b["input_ids"][0]
    assert row[P - 9] == tok.bos_token_id and (row[:P - 9] == tok.eos_token_id).all()
    assert b["attention_mask"][0].tolist() == [0] * (P - 9) + [1] * (9 + c.gen_length)
    assert b["position_ids"][0, P - 9:].tolist() == list(range(9 + c.gen_length))
    assert tok.decode(row[P:]).startswith("1+2+3<eos>") and row[-1] == tok.eos_token_id
    with pytest.raises(ValueError, match="prompt"):
        pretrain.encode_batch(tok, tasks.Addition(1), [task.example(12, 34)])


def test_loss_weighting_and_training_lowers_it():
    task = tasks.Addition(1)
    model, tok = pretrain.build_model(task, d_model=32, n_layers=2, n_heads=2)
    batch = pretrain.encode_batch(tok, task, [task.make(__import__("random").Random(i)) for i in range(16)])
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        before = float(pretrain.masked_diffusion_loss(model, batch, tok.mask_token_id, g()))
    assert before > 0
    log = pretrain.train(model, tok, task, steps=40, batch_size=32, lr=3e-3, warmup=5, progress=False,
                         log_every=10)
    assert log.steps == 40 and not model.training
    assert log.losses[-1][1] < log.losses[0][1]
    with pytest.raises(ValueError, match="batch_size"):
        pretrain.train(model, tok, task, steps=1, batch_size=0)
    with pytest.raises(ValueError, match="d_model"):
        pretrain.build_model(task, d_model=30, n_heads=4)


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory):
    """A micro model trained for a few seconds through the train-base command."""
    out = tmp_path_factory.mktemp("micro") / "base"
    rc = cli.main(["train-base", "--task", "add:digits=1", "--out", str(out), "--steps", "60", "--minutes", "0",
                   "--lr", "3e-3", "--warmup", "5", "--eval-n", "10", "--no-progress", *MICRO])
    assert rc == 0
    return out


def test_train_base_writes_a_loadable_checkpoint(micro_dir):
    from transformers import AutoModel, AutoTokenizer

    from evofast.models import llada

    for name in ("model.safetensors", "config.json", "tokenizer.json", tasks.TASK_FILE, "train_log.json"):
        assert (micro_dir / name).exists(), name
    llada.register()
    model = AutoModel.from_pretrained(micro_dir)
    tok = AutoTokenizer.from_pretrained(micro_dir)
    assert isinstance(model, llada.LLaDAModelLM) and model.config.mask_token_id == tok.mask_token_id
    log = json.loads((micro_dir / "train_log.json").read_text())
    assert log["steps"] == 60 and log["config"]["eval"]["n"] == 10
    assert json.loads((micro_dir / tasks.TASK_FILE).read_text())["task"] == "add"


def test_eval_cli_json_schema(micro_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = cli.main(["eval", "--model", str(micro_dir), "--mode", "evotoken", "--problems", "8", "--batch-size", "5",
                   "--json", str(out), "--no-progress"])
    assert rc == 0
    assert "accuracy" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert RESULT_KEYS <= set(res) and {"command", "env", "model"} <= set(res)
    assert res["n"] == 8 and 0 <= res["correct"] <= 8 and res["mode"] == "evotoken" and res["alpha"] == 0.7
    lo, hi = res["ci95"]
    assert 0 <= lo <= res["accuracy"] <= hi <= 1 and res["tokens_per_s"] > 0
    assert res["steps"] == res["gen_length"] // 2 and res["task"]["task"] == "add"
    assert {"prompt", "output", "answer", "correct"} <= set(res["samples"][0])
    assert cli.main(["eval", "--model", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert cli.main(["eval", "--model", str(micro_dir), "--steps", "5", "--no-progress"]) == 2   # not per block
    stdd = tmp_path / "stdd.json"
    assert cli.main(["eval", "--model", str(micro_dir), "--mode", "evotoken", "--problems", "4", "--no-progress",
                     "--remasking", "topk_margin", "--policy", "stdd", "--stdd-tau", "0.5", "--json", str(stdd)]) == 0
    res = json.loads(stdd.read_text())
    assert res["n"] == 4 and res["remasking"] == "topk_margin" and res["stdd"]["tau"] == 0.5


def test_eval_batches_do_not_change_results(micro_dir):
    from evofast.evaluation import load_model_and_task

    model, tok, task = load_model_and_task(micro_dir, None, torch.device("cpu"))
    exs = task.test_set(9, seed=0)
    a = evaluate(model, tok, task, examples=exs, batch_size=9, progress=False, keep_samples=9)
    b = evaluate(model, tok, task, examples=exs, batch_size=2, progress=False, keep_samples=9)
    assert [s["output"] for s in a["samples"]] == [s["output"] for s in b["samples"]]


def test_eval_shards_over_processes(micro_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): the gathered result is the single-process one."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = ["--model", str(micro_dir), "--problems", "8", "--no-progress", "--device", "cpu", "--threads", "1"]
    assert cli.main(["eval", *base, "--json", str(one)]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",   # a free port
           "-m", "evofast", "eval", *base, "--json", str(two)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[:3000]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert (a["n"], a["correct"]) == (b["n"], b["correct"])
    assert [s["output"] for s in a["samples"]] == [s["output"] for s in b["samples"]]


STUDY_MICRO = ["--task", "countdown-synth:count=2,hi=9,aligned=1", "--control", "add:digits=2",
               "--d-model", "32", "--layers", "2", "--heads", "2", "--base-steps", "20", "--control-base-steps", "20",
               "--base-batch", "16",
               "--ft-steps", "2", "--ft-batch", "8", "--lora-r", "4", "--seeds", "2", "--problems", "12",
               "--val-problems", "6", "--tokens-per-step", "2", "8", "--alphas", "0.5", "0.9",
               "--decode-batch", "64", "--threads", "1", "--no-progress"]


def test_bench_quality_study_end_to_end(tmp_path, capsys):
    """The whole study on micro settings: bases, arms x seeds x settings, every decoding, contrasts,
    JSON / plot / exported model; a rerun reuses the bases."""
    js, png, model_dir = tmp_path / "q.json", tmp_path / "q.png", tmp_path / "model"
    argv = ["bench", "quality", *STUDY_MICRO, "--workdir", str(tmp_path / "work"), "--json", str(js),
            "--plot", str(png), "--export-model", str(model_dir)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "paired contrasts" in out and "CTS-evotoken vs FT-hard" in out and png.stat().st_size > 1000
    res = json.loads(js.read_text())
    assert res["benchmark"] == "evofast.bench.quality" and res["env"]["command"] and res["config"]["seeds"] == 2
    main, control = res["tasks"]
    assert (main["role"], control["role"]) == ("main", "control") and not main["base_reused"]
    assert [(m["arm"], m["setting"], m["seed"]) for m in main["models"]] == [("base", None, None)] + [
        (arm, setting, s) for setting in ("lora", "full") for s in (0, 1) for arm in ("ft", "cts")]
    assert {m["setting"] for m in control["models"]} == {None, "lora"}
    n = main["n_test"]
    assert n == 12 and main["n_val"] == 6
    for m in main["models"]:
        assert m["alpha"] in (0.5, 0.9) and set(m["val_accuracy"]) == {"0.5", "0.9"}
        keys = [(d["key"], d["setting"]["mode"]) for d in m["decodings"]]
        assert len(keys) == 2 * 2 * 2 + 2 and len(set(keys)) == len(keys)     # schedule grid + threshold rows
        for d in m["decodings"]:
            assert len(d["correct"]) == len(d["first_correct"]) == n and set(d["correct"]) <= {"0", "1"}
            assert d["accuracy"] == d["correct"].count("1") / n
    names = {c["contrast"] for c in main["contrasts"]}
    assert {"CTS-evotoken vs FT-hard", "CTS-hard vs FT-hard", "CTS-evotoken vs CTS-hard"} <= names
    for c in main["contrasts"]:
        assert len(c["per_seed"]) == (1 if c["contrast"].startswith("base") else 2)
        assert c["ci"][0] <= c["diff"] <= c["ci"][1]
    card = json.loads((model_dir / "study.json").read_text())
    assert card["arm"] == "cts" and card["setting"] == "lora" and card["n"] == n
    assert main["exported"]["accuracy"] == card["accuracy"]
    for name in ("model.safetensors", "config.json", "tokenizer.json", tasks.TASK_FILE):
        assert (model_dir / name).exists(), name
    # a rerun finds the bases; an existing export directory is refused before any work
    assert cli.main(["bench", "quality", *STUDY_MICRO, "--control", "none", "--settings", "lora", "--seeds", "1",
                     "--tokens-per-step", "8", "--temperatures", "0", "--policies", "schedule", "--alphas", "0.5",
                     "--workdir", str(tmp_path / "work"), "--json", str(js)]) == 0
    assert json.loads(js.read_text())["tasks"][0]["base_reused"]
    with pytest.raises(SystemExit, match="export-model"):
        cli.main(argv)


@pytest.mark.parametrize("extra,match", [(["--tokens-per-step", "3"], "tokens_per_step"),
                                         (["--policies", "nope"], "policies"), (["--seeds", "0"], "seeds"),
                                         (["--task", "countdown-synth:count=2,hi=9"], "fixed-width")])
def test_bench_quality_refuses_bad_settings_before_work(tmp_path, extra, match):
    with pytest.raises(SystemExit, match=match):
        cli.main(["bench", "quality", *STUDY_MICRO, *extra, "--workdir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["train-base", "--help"], ["eval", "--help"],
                                  ["bench", "quality", "--help"]])
def test_help_renders(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0 and "usage" in capsys.readouterr().out

"""The trained-model pipeline: masked-diffusion pretraining, evaluation (Wilson interval,
sharding over processes), the train-base / eval commands and `bench quality`, all on a
micro model (1-digit addition, d_model 32) so the whole file takes well under a minute."""
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


def test_bench_quality_reduced(micro_dir, tmp_path, capsys):
    js, png = tmp_path / "q.json", tmp_path / "q.png"
    rc = cli.main(["bench", "quality", "--task", "add:digits=1", "--base", str(micro_dir), "--cts", "skip",
                   "--problems", "6", "--alphas", "0.7", "--caches", "none", "prefix", "--steps-div", "2",
                   "--json", str(js), "--plot", str(png)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| model | mode |" in out and png.stat().st_size > 1000
    res = json.loads(js.read_text())
    assert {"benchmark", "schema_version", "env", "config", "rows", "notes", "train_base"} <= set(res)
    assert res["env"]["command"] and res["config"]["n"] == 6
    rows = res["rows"]
    assert [(r["mode"], r["cache"]) for r in rows] == [("hard", "none"), ("evotoken", "none"), ("hard", "prefix"),
                                                      ("evotoken", "prefix")]
    for r in rows:
        if r.get("skipped"):
            assert r["cache"] != "none" and "NotImplementedError" in r["skipped"]
        else:
            assert r["n"] == 6 and 0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 1 and r["tokens_per_s"] > 0
    assert any("CTS left out" in n for n in res["notes"])


def test_bench_quality_trains_cts_and_uses_caches(micro_dir, tmp_path):
    """The default CTS path: train-cts on the base (a few steps here), then both models x the caches."""
    js = tmp_path / "q.json"
    rc = cli.main(["bench", "quality", "--task", "add:digits=1", "--base", str(micro_dir), "--problems", "4",
                   "--alphas", "0.9", "--caches", "dual", "--steps-div", "4", "--cts-examples", "16",
                   "--cts-args", "--full --lr 1e-4 --batch-size 8 --steps 2 --no-progress", "--json", str(js)])
    assert rc == 0
    res = json.loads(js.read_text())
    assert res["config"]["cts"] and (Path(res["config"]["cts"]) / tasks.TASK_FILE).exists()
    assert [(r["model"], r["mode"]) for r in res["rows"]] == [("base", "hard"), ("base", "evotoken"),
                                                             ("cts", "hard"), ("cts", "evotoken")]
    steps = res["config"]["task"]["gen_length"] // 4
    assert all(not r.get("skipped") and r["cache"] == "dual" and r["steps"] == steps for r in res["rows"])


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["train-base", "--help"], ["eval", "--help"],
                                  ["bench", "quality", "--help"]])
def test_help_renders(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0 and "usage" in capsys.readouterr().out

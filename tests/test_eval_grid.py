"""`evofast eval` on the paper's benchmarks: the grid in one load, the run directory, resuming,
the authors' layout, bad input refused before the model loads."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from _checkpoints import save_tiny_checkpoint

from evofast import cli
from evofast.evaluation import EvalConfig, expand_grid

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = ["What is 2 + 3?", "Tom has 4 apples and eats 1. How many are left?", "7 * 6 = ?", "Half of 10?",
             "A very long question about many numbers: 1, 2, 3, 4, 5, 6, 7, 8 and 9; what is their sum?"]
GRID = ["--gen-length", "8", "16", "--block-length", "8", "--alpha", "0.9", "0.5", "--temperature", "0",
        "--batch-size", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    save_tiny_checkpoint(d / "model", vocab_size=100, d_model=32, n_layers=1, n_heads=2)
    data = d / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": f"steps\n#### {i}"}) + "\n"
                            for i, q in enumerate(QUESTIONS)))
    return d / "model", data


def _eval(model, data, out, *extra):
    return cli.main(["eval", "--model", str(model), "--task", "gsm8k", "--data", str(data), "--out", str(out),
                     *GRID, *extra])


def _records(out, name):
    recs = {}
    for f in sorted((out / name).glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            recs[r["index"]] = r
    return recs


def test_grid_names_and_checks():
    configs = expand_grid(mode="evotoken", gen_lengths=[128, 256], steps_factor=0.5, block_length=32,
                          alphas=[0.9, 0.5], k_soft=3, temperature=0.5)
    assert [c.name for c in configs] == [
        "gen128-steps64-block32-evotoken-k3-alpha0.9-T0.5", "gen128-steps64-block32-evotoken-k3-alpha0.5-T0.5",
        "gen256-steps128-block32-evotoken-k3-alpha0.9-T0.5", "gen256-steps128-block32-evotoken-k3-alpha0.5-T0.5"]
    hard = expand_grid(mode="hard", gen_lengths=[64], steps=[32], block_length=32, alphas=[0.9, 0.5])
    assert len(hard) == 1 and hard[0].name == "gen64-steps32-block32-hard-T0" and hard[0].alpha is None
    for kw, what in [(dict(gen_lengths=[100], block_length=32), "block_length"),
                     (dict(gen_lengths=[64], steps=[3], block_length=32), "steps"),
                     (dict(gen_lengths=[64], block_length=32, alphas=[1.0]), "alpha"),
                     (dict(gen_lengths=[64], block_length=32, steps=[32], steps_factor=0.5), "steps")]:
        with pytest.raises(ValueError, match=f"^{what}:"):
            expand_grid(**kw)



def test_grid_with_decoding_options():
    from evofast.ops import STDD
    c, = expand_grid(gen_lengths=[32], block_length=8, remasking="topk_margin", top_k=5, top_p=0.9,
                     stdd=STDD(tau=0.5, lam_s=0.0))
    assert c.name == ("gen32-steps16-block8-evotoken-k3-alpha0.7-T0-topk_margin-topk5-topp0.9-stdd-tau0.5-lam_t1-"
                      "lam_s0-tau_min0-tau_max1-window3-radius1")
    assert c.generate_kwargs()["policy"] == STDD(tau=0.5, lam_s=0.0) and c.as_dict()["stdd"]["tau"] == 0.5
    for kw, what in [(dict(remasking="margin"), "remasking"), (dict(top_k=0), "top_k"), (dict(top_p=2), "top_p"),
                     (dict(stdd=STDD(), threshold=0.5), "threshold")]:
        with pytest.raises(ValueError, match=f"^{what}:"):
            expand_grid(gen_lengths=[32], block_length=8, **kw)


def test_grid_run_writes_records_summary_and_authors_layout(setup, tmp_path, capsys):
    model, data = setup
    out = tmp_path / "run"
    assert _eval(model, data, out, "--authors-layout") == 0
    summary = json.loads((out / "summary.json").read_text())
    names = [c["name"] for c in summary["configurations"]]
    assert len(names) == 4 and all(n.startswith(("gen8-steps4", "gen16-steps8")) for n in names)
    for c in summary["configurations"]:
        assert c["n"] == len(QUESTIONS) and 0 <= c["ci95"][0] <= c["accuracy"] <= c["ci95"][1] <= 1
        assert c["tokens_per_s"] > 0 and c["forwards_per_example"] == c["steps"]
        recs = _records(out, c["name"])
        assert sorted(recs) == list(range(len(QUESTIONS)))
        r = recs[4]
        assert r["question"] == QUESTIONS[4] and r["ground_truth"] == 4.0
        assert r["prompt"].startswith("<bos>Q: You are a math expert") and r["prompt"].endswith("A:<reasoning>")
        assert {"generation", "extracted", "correct", "seconds", "forwards"} <= set(r)
    assert sum(c["best_alpha_on_test"] for c in summary["configurations"]) == 2    # one per gen length
    assert "best alpha" in (out / "summary.md").read_text()
    authors = out / "authors" / "eval_results_kSoft_3_alphaSoftMask_0.9" / "gsm8k_16_8_0_generations.json"
    doc = json.loads(authors.read_text())
    assert len(doc["generations"]) == len(QUESTIONS) and doc["diffusion_steps"] == 8
    assert set(doc["generations"][0]) == {"question", "prompt_input", "generations", "ground_truth"}


def test_interrupted_run_resumes_to_the_same_records(setup, tmp_path, monkeypatch):
    from evofast.evaluation import results
    model, data = setup
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _eval(model, data, full) == 0
    real = results.ResultStore.append
    calls = []

    def crash_on_third(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(results.ResultStore, "append", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        _eval(model, data, cut)
    monkeypatch.setattr(results.ResultStore, "append", real)
    first = json.loads((cut / "run.json").read_text())["configurations"][0]
    assert len(_records(cut, first)) == 4 and not (cut / "summary.json").exists()
    assert _eval(model, data, cut) == 0
    for name in json.loads((full / "run.json").read_text())["configurations"]:
        a, b = _records(full, name), _records(cut, name)
        assert [a[i]["generation"] for i in a] == [b[i]["generation"] for i in a]


def test_other_settings_into_the_same_out_are_refused_before_loading(setup, tmp_path, capsys, monkeypatch):
    import evofast.models.loading as loading
    model, data = setup
    out = tmp_path / "run"
    assert _eval(model, data, out, "--limit", "2") == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(loading, "load_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))
    capsys.readouterr()
    assert _eval(model, data, out, "--limit", "3") == 2
    assert "other settings" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert _eval(model, data, tmp_path / "busy") == 2 and "not empty" in capsys.readouterr().err


@pytest.mark.parametrize("change,what", [
    (lambda d, m: ["--data", str(d.parent / "missing.jsonl")], "missing.jsonl"),
    (lambda d, m: ["--data", str(d.parent / "bad.jsonl")], "question"),
    (lambda d, m: ["--lora", str(d.parent)], "adapter_config.json"),
    (lambda d, m: ["--merge-lora"], "--merge-lora needs --lora"),
    (lambda d, m: ["--steps", "3"], "steps"),
    (lambda d, m: ["--top-p", "0"], "--top-p (top_p):"),
    (lambda d, m: ["--stdd-lam-t", "0"], "--stdd-lam-t: only with --policy stdd"),
    (lambda d, m: ["--policy", "stdd", "--stdd-tau", "2"], "--stdd-tau (tau):"),
])
def test_bad_input_is_reported_before_loading(setup, tmp_path, capsys, monkeypatch, change, what):
    import evofast.models.loading as loading
    model, data = setup
    (data.parent / "bad.jsonl").write_text(json.dumps({"prompt": "x", "answer": "1"}) + "\n")
    monkeypatch.setattr(loading, "load_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))
    args = ["eval", "--model", str(model), "--task", "gsm8k", "--data", str(data), "--out", str(tmp_path / "o"),
            *GRID, *change(data, model)]
    assert cli.main(args) == 2
    assert what in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_benchmark_needs_out_and_data(setup, capsys):
    model, data = setup
    assert cli.main(["eval", "--model", str(model), "--task", "gsm8k", "--data", str(data), *GRID]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(model), "--task", "svamp", "--out", "x", *GRID]) == 2
    assert "--data" in capsys.readouterr().err


def test_batched_equals_batch_one_and_sampling_is_seeded(setup, tmp_path):
    model, data = setup
    a, b = tmp_path / "a", tmp_path / "b"
    assert _eval(model, data, a, "--batch-size", "1") == 0
    assert _eval(model, data, b, "--batch-size", "5") == 0
    name = json.loads((a / "run.json").read_text())["configurations"][0]
    ra, rb = _records(a, name), _records(b, name)
    assert [ra[i]["generation"] for i in ra] == [rb[i]["generation"] for i in ra]
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    for out in (s1, s2):
        assert _eval(model, data, out, "--temperature", "0.8", "--seed", "5") == 0
    name = json.loads((s1 / "run.json").read_text())["configurations"][0]
    assert _records(s1, name) .keys() == _records(s2, name).keys()
    assert [r["generation"] for r in _records(s1, name).values()] == \
        [r["generation"] for r in _records(s2, name).values()]


@pytest.mark.slow
def test_torchrun_shards_match_one_process(setup, tmp_path):
    model, data = setup
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--model", str(model), "--task", "gsm8k", "--data", str(data), *GRID[:-5], "--batch-size", "1",
            "--no-progress", "--device", "cpu", "--threads", "1"]
    assert cli.main(["eval", *args, "--out", str(one)]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "evofast", "eval", *args, "--out", str(two)]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = json.loads((one / "summary.json").read_text()), json.loads((two / "summary.json").read_text())
    assert [(c["n"], c["correct"]) for c in a["configurations"]] == [(c["n"], c["correct"]) for c in b["configurations"]]
    assert sorted(p.name for p in (two / a["configurations"][0]["name"]).iterdir()) == ["rank0.jsonl", "rank1.jsonl"]
    for c in a["configurations"]:
        ra, rb = _records(one, c["name"]), _records(two, c["name"])
        assert [ra[i]["generation"] for i in ra] == [rb[i]["generation"] for i in ra]


def test_eval_config_is_frozen():
    c = EvalConfig(mode="hard", gen_length=8, steps=4, block_length=8)
    with pytest.raises(Exception):
        c.mode = "evotoken"


def test_bench_eval_tiny(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "eval", "--shape", "tiny", "--examples", "6", "--slow-examples", "2", "--batch", "3",
                     "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["provider"] for r in rows] == ["authors", "evofast-b1", "evofast-b3", "evofast-b3-dual"]
    assert rows[1]["check"] == "ok"                          # batch 1: the authors' tokens
    assert all(r["examples_per_s"] > 0 for r in rows) and rows[2]["examples"] == 6


def test_grid_run_with_stdd_and_remasking(setup, tmp_path):
    model, data = setup
    out = tmp_path / "stdd"
    assert _eval(model, data, out, "--limit", "2", "--remasking", "topk_margin", "--policy", "stdd",
                 "--stdd-tau", "0.05", "--stdd-lam-s", "0") == 0
    names = json.loads((out / "run.json").read_text())["configurations"]
    assert len(names) == 4 and all("-topk_margin-stdd-tau0.05-lam_t1-lam_s0-" in n for n in names)
    assert all(len(_records(out, n)) == 2 for n in names)

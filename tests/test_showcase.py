"""`evofast showcase`: a model trained here answers held-out problems, with its card and trace."""
import json
from pathlib import Path

import pytest
import torch

from evofast import cli, tasks
from evofast.study import pretrain, showcase

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A micro Countdown model, trained for a few steps and saved with a study card."""
    task = tasks.parse_task("countdown-synth:count=2,hi=9,aligned=1")
    with torch.random.fork_rng():
        model, tok = pretrain.build_model(task, d_model=32, n_layers=2, n_heads=2)
        pretrain.train(model, tok, task, steps=30, batch_size=16, progress=False)
    out = pretrain.save(model, tok, task, tmp_path_factory.mktemp("m") / "countdown")
    card = {"decoding": {"mode": "evotoken", "tokens_per_step": 4, "temperature": 0.0, "alpha": 0.5,
                         "policy": "schedule"}, "accuracy": 0.25, "n": 40}
    (out / showcase.STUDY_FILE).write_text(json.dumps(card))
    return out


def test_showcase_prints_checked_answers_the_card_and_a_trace(model_dir, tmp_path, capsys):
    page = tmp_path / "trace.html"
    assert cli.main(["showcase", "--model", str(model_dir), "--problems", "3", "--trace", str(page)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "evotoken, 4 tokens per step, alpha 0.5" in lines[0]
    answers = [ln for ln in lines if "answer:" in ln]
    assert len(answers) == 3 and all(ln.startswith("  Countdown: ") for ln in answers)
    assert all(ln.rstrip().endswith(("correct", "wrong")) for ln in answers)
    assert "measured accuracy of this decoding: 25.0% on 40 held-out" in out
    assert page.stat().st_size > 1000 and "trace: wrote" in out


def test_solve_checks_what_it_decodes(model_dir):
    model, tok, task, card = showcase.load(model_dir)
    setting = showcase.setting_of(card)
    assert (setting.mode, setting.tokens_per_step, setting.alpha) == ("evotoken", 4, 0.5)
    exs = task.test_set(6, seed=2)
    answers, right, trace = showcase.solve(model, tok, task, exs, setting)
    assert trace is None and len(answers) == len(right) == 6
    assert right == [task.check(ex, a) for ex, a in zip(exs, answers)]
    assert showcase.setting_of(None).alpha == 0.7                        # no card: EvoToken defaults


def test_showcase_refuses_bad_arguments_before_loading(tmp_path, capsys):
    assert cli.main(["showcase", "--model", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert cli.main(["showcase", "--problems", "0"]) == 2
    assert "--problems" in capsys.readouterr().err


SHIPPED_STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "quality-shipped-model-cpu-2core.json"


@pytest.mark.skipif(not (showcase.model_dir() / showcase.STUDY_FILE).exists(), reason="no shipped model")
def test_the_shipped_model_answers_as_the_study_recorded():
    """The shipped model gives, problem by problem, the results its study recorded (first 100 test problems)."""
    from evofast.study.experiment import problem_sets
    model, tok, task, card = showcase.load()
    assert card["arm"] == "cts" and card["setting"] == "lora" and card["seed"] == 0 and card["accuracy"] > 0.3
    study = json.loads(SHIPPED_STUDY.read_text())
    res = study["tasks"][0]
    rec = next(m for m in res["models"] if (m["arm"], m["setting"], m["seed"]) == ("cts", "lora", 0))
    recorded = next(d for d in rec["decodings"] if d["setting"]["name"] == card["decoding"]["name"])
    assert recorded["accuracy"] == card["accuracy"] and recorded["n"] == card["n"] == res["n_test"]
    _, test = problem_sets(task, res["n_test"], res["n_val"], study["config"]["seed"])
    answers, right, _ = showcase.solve(model, tok, task, test[:100], showcase.setting_of(card))
    assert "".join(str(int(r)) for r in right) == recorded["correct"][:100]


def test_the_shipped_model_ships_in_the_wheel():
    import fnmatch
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["evofast"]
    rel = "/".join(showcase.MODEL_DIR)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "evofast_task.json", showcase.STUDY_FILE):
        assert any(fnmatch.fnmatch(f"{rel}/{name}", p) for p in patterns), name

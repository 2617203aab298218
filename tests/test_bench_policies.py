"""`evofast bench policies`: every decoding policy on the same problems, accuracy against forwards."""
import json

import pytest
import torch

from evofast import cli, tasks
from evofast.ops import STDD
from evofast.study import pretrain
from evofast.study.scoring import Setting, policy_kwargs

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A micro Countdown model (random weights: the bench's bookkeeping, not its accuracy, is tested)."""
    task = tasks.parse_task("countdown-synth:count=2,hi=9,aligned=1")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, tok = pretrain.build_model(task, d_model=32, n_layers=2, n_heads=2)
    return pretrain.save(model, tok, task, tmp_path_factory.mktemp("m") / "countdown")


def test_policy_names_and_sweep_points():
    assert policy_kwargs("schedule") == {} and policy_kwargs("threshold@0.8") == {"threshold": 0.8}
    assert policy_kwargs("stdd@tau=0.8,lam_s=0.5,window=4") == {"policy": STDD(tau=0.8, lam_s=0.5, window=4)}
    assert policy_kwargs("stdd") == {"policy": STDD()}
    for bad in ("nope", "schedule@2", "threshold@", "stdd@tau", "stdd@beta=1"):
        with pytest.raises(ValueError, match="policy"):
            policy_kwargs(bad)
    with pytest.raises(ValueError, match="tau"):
        Setting("hard", 1, policy="stdd@tau=2")                     # STDD's own check, at the setting


def test_bench_policies_rows_json_and_plot(model_dir, tmp_path, capsys):
    out, plot = tmp_path / "p.json", tmp_path / "p.png"
    assert cli.main(["bench", "policies", "--model", str(model_dir), "--problems", "6", "--skip", "2", "--batch-size", "4",
                     "--tokens-per-step", "1", "2", "--thresholds", "0.6", "--stdd", "0.6,0,0", "0.6,1,1",
                     "--json", str(out), "--plot", str(plot)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["family"], r["mode"]) for r in rows[:2]] == [("schedule", "hard"), ("schedule", "evotoken")]
    assert len(rows) == 2 * 5 and all(r["problems"] == 6 for r in rows)
    by = {(r["policy"], r["mode"], r["tokens_per_step"]): r for r in rows}
    assert by[("schedule", "hard", 2)]["forwards_per_token"] == 0.5
    for mode in ("hard", "evotoken"):                 # STDD without lambdas is the global threshold
        t, s = by[("threshold@0.6", mode, None)], by[("stdd@tau=0.6,lam_t=0,lam_s=0", mode, None)]
        assert (t["accuracy"], t["forwards_per_token"]) == (s["accuracy"], s["forwards_per_token"])
    assert plot.stat().st_size > 1000 and "forwards/token" in capsys.readouterr().out


def test_bench_policies_refuses_a_bad_sweep_before_loading(tmp_path, capsys):
    assert cli.main(["bench", "policies", "--model", str(tmp_path / "none"), "--stdd", "0.9,1"]) == 2
    assert "--stdd" in capsys.readouterr().err

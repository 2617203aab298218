"""The quality study's pieces on micro settings: paired statistics on hand-computed cases, the
revision observer against generate's own trace, scoring, and the fine-tune arms (same optimiser,
only the loss differs; LoRA merged)."""
import math

import numpy as np
import pytest
import torch

from evofast import generate, tasks
from evofast.models import llada
from evofast.study import finetune, pretrain, scoring, stats

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore::FutureWarning")]


# --------------------------------------------------------------------------- statistics
def test_mcnemar_hand_computed():
    a = [1, 1, 1, 0, 0, 0, 1, 0]
    b = [1, 0, 0, 1, 1, 1, 1, 1]
    r = stats.mcnemar(a, b)                       # discordant: a only 2, b only 4; 2 * P(X <= 2 | 6, 1/2)
    assert (r["a_only"], r["b_only"]) == (2, 4) and r["p"] == pytest.approx(2 * (1 + 6 + 15) / 64)
    r = stats.mcnemar([0] * 10, [1] * 10)
    assert r["p"] == pytest.approx(2 / 1024)
    assert stats.mcnemar([1, 0], [1, 0])["p"] == 1.0          # no discordant pair
    with pytest.raises(ValueError, match="same problems"):
        stats.mcnemar([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="0/1"):
        stats.mcnemar([2, 0], [1, 0])


def test_paired_bootstrap_hand_computed():
    # a constant difference: the interval has no width
    r = stats.paired_bootstrap([0, 0, 0, 0], [1, 1, 1, 1])
    assert r["diff"] == 1.0 and r["ci"] == [1.0, 1.0]
    # per-problem differences half 1, half 0: mean 0.5, standard error 0.5 / sqrt(1000)
    a = np.zeros(1000, dtype=int)
    b = np.r_[np.ones(500, dtype=int), np.zeros(500, dtype=int)]
    r = stats.paired_bootstrap(a, b, resamples=4000)
    half = 1.96 * 0.5 / math.sqrt(1000)
    assert r["diff"] == 0.5 and r["ci"] == [pytest.approx(0.5 - half, abs=0.004), pytest.approx(0.5 + half, abs=0.004)]
    assert stats.paired_bootstrap(a, b, resamples=500, seed=3) == stats.paired_bootstrap(a, b, resamples=500, seed=3)
    assert stats.verdict(r["ci"]) == "gain" and stats.verdict([-0.1, -0.01]) == "loss"
    assert stats.verdict([-0.01, 0.02]) == "no difference shown"


def test_compare_pools_seeds_and_reports_their_spread():
    base = np.array([[1, 0, 1, 0, 1, 0, 1, 0]])                     # one row: paired with every seed
    arm = np.array([[1, 1, 1, 0, 1, 0, 1, 0], [1, 1, 1, 1, 1, 0, 1, 0], [1, 0, 1, 0, 1, 0, 1, 0]])
    r = stats.compare(base, arm, resamples=500)
    assert r["seeds"] == 3 and r["problems"] == 8
    assert r["diff"] == pytest.approx((1 + 2 + 0) / 3 / 8)
    assert [s["diff"] for s in r["per_seed"]] == [1 / 8, 2 / 8, 0.0]
    assert [(s["a_only"], s["b_only"]) for s in r["per_seed"]] == [(0, 1), (0, 2), (0, 0)]
    assert r["seed_spread"]["min"] == 0.0 and r["seed_spread"]["max"] == 0.25
    assert r["seed_spread"]["sd"] == pytest.approx(np.std([1 / 8, 2 / 8, 0], ddof=1))
    assert r["ci"][0] <= r["diff"] <= r["ci"][1]
    with pytest.raises(ValueError, match="one row per seed"):
        stats.compare(arm[:2], arm)


# --------------------------------------------------------------------------- revisions and scoring
def test_revision_log_matches_the_trace():
    """The observer's first tokens and revision counts, against generate's own step-by-step trace."""
    torch.manual_seed(0)
    model = llada.tiny(vocab_size=60, d_model=32, n_layers=2, n_heads=2)
    prompt = torch.randint(0, 58, (3, 5))
    log = scoring.RevisionLog()
    out, trace = generate(model, prompt, gen_length=16, block_length=8, steps=4, mode="evotoken", alpha=0.5,
                          return_trace=True, observers=[log])
    P, M = 5, trace.mask_id
    first = torch.full((3, 16), M)
    revised = torch.zeros(3, dtype=torch.long)
    for prev, rec in zip(trace.records, trace.records[1:]):
        before, after = prev.x[:, P:], rec.x[:, P:]
        revised += ((before != M) & (after != before)).sum(dim=1)
        first = torch.where((before == M) & (after != M), after, first)
    assert torch.equal(log.first.cpu(), first) and torch.equal(log.revised.cpu(), revised)
    assert int(revised.sum()) > 0                    # a random model revises: the test sees some
    assert torch.equal(out[:, P:].cpu(), trace.records[-1].x[:, P:])
    hard = scoring.RevisionLog()
    out = generate(model, prompt, gen_length=16, block_length=8, steps=4, mode="hard", observers=[hard])
    assert int(hard.revised.sum()) == 0 and torch.equal(hard.first, out[:, P:])


@pytest.fixture(scope="module")
def micro():
    task = tasks.parse_task("countdown-synth:count=2,hi=9,aligned=1")
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        model, tok = pretrain.build_model(task, d_model=32, n_layers=2, n_heads=2)
        pretrain.train(model, tok, task, steps=40, batch_size=16, progress=False)
    return task, model, tok


def test_setting_names_and_errors():
    s = scoring.Setting("evotoken", 4, 0.5, 0.7, "threshold")
    assert s.name == "evotoken-a0.7-tps4-T0.5-threshold"
    kw = s.generate_kwargs(16, 8, 3)
    assert kw["steps"] == 4 and kw["threshold"] == 0.9 and kw["alpha"] == 0.7 and kw["k_soft"] == 3
    assert "alpha" not in scoring.Setting("hard", 2).generate_kwargs(16, 8, 3)
    with pytest.raises(ValueError, match="policy"):
        scoring.Setting("hard", 2, policy="stdd-unknown")
    with pytest.raises(ValueError, match="alpha"):
        scoring.Setting("evotoken", 2)


def test_score_counts_revisions_and_is_batch_independent(micro):
    task, model, tok = micro
    exs = task.test_set(24, seed=0)
    s = scoring.Setting("evotoken", 2, 0.5, 0.5)
    a = scoring.score(model, tok, task, exs, s, batch_size=24, seed=1)
    assert a["n"] == 24 and len(a["correct"]) == len(a["first_correct"]) == len(a["revised"]) == 24
    assert a["forwards_per_problem"] == task.gen_length // 2 and a["accuracy"] == sum(a["correct"]) / 24
    flips = [(f, c) for f, c in zip(a["first_correct"], a["correct"])]
    assert a["right_to_wrong"] == flips.count((1, 0)) and a["wrong_to_right"] == flips.count((0, 1))
    assert a["revised_tokens"] == sum(a["revised"])
    greedy = scoring.Setting("evotoken", 2, 0.0, 0.5)
    one = scoring.score(model, tok, task, exs, greedy, batch_size=24)
    split = scoring.score(model, tok, task, exs, greedy, batch_size=8)
    assert one["correct"] == split["correct"] and one["revised"] == split["revised"]
    padded = tasks.parse_task("countdown-synth:count=2,hi=9")
    with pytest.raises(ValueError, match="fixed-width"):
        scoring.score(model, tok, padded, padded.test_set(24), greedy)


def test_score_threshold_policy_uses_fewer_forwards(micro):
    task, model, tok = micro
    exs = task.test_set(8, seed=0)
    r = scoring.score(model, tok, task, exs, scoring.Setting("hard", 1, policy="threshold"))
    assert 1 <= r["forwards_per_problem"] <= task.gen_length


# --------------------------------------------------------------------------- fine-tuning arms
def test_finetune_arms_share_everything_but_the_loss(micro):
    task, base, tok = micro
    before = {k: v.clone() for k, v in base.state_dict().items()}
    runs = {}
    for objective in finetune.OBJECTIVES:
        for r in (4, None):
            model, log = finetune.finetune(base, tok, task, objective=objective, lora_r=r, steps=3, batch_size=8,
                                           lr=1e-3, warmup=1, seed=5)
            runs[objective, r] = model, log
            assert type(model).__name__ == "LLaDAModelLM" and log.steps == 3
            assert log.config["objective"] == objective and log.config["lora_r"] == r
            assert all(math.isfinite(l) for _, l in log.losses)
    for k, v in base.state_dict().items():                              # the base is left as it was
        assert torch.equal(v, before[k])
    lora = runs["cts", 4][0].state_dict()
    changed = {k for k, v in lora.items() if not torch.equal(v, before[k])}
    assert changed and all(any(p in k for p in ("q_proj", "k_proj", "v_proj")) for k in changed)
    full = runs["md", None][0].state_dict()
    assert any(not torch.equal(full[k], before[k]) for k in full if "q_proj" not in k)
    assert runs["md", 4][1].config["lr"] == runs["cts", 4][1].config["lr"]
    with pytest.raises(ValueError, match="objective"):
        finetune.finetune(base, tok, task, objective="sft")


def test_cts_finetune_refuses_a_padded_task(micro):
    _, base, tok = micro
    padded = tasks.parse_task("countdown-synth:count=2,hi=9")
    with pytest.raises(ValueError, match="fixed-width"):
        finetune.finetune(base, tok, padded, objective="cts", steps=1, batch_size=32)

"""`evofast bench policies`: accuracy against forwards per generated token, per decoding policy.

    evofast bench policies [--model DIR] [--problems 500] [--json FILE] [--plot FILE.png]

On a trained checkpoint and its task (default: the model shipped with evofast, trained by
`evofast bench quality`), every row decodes the same held-out problems (after the --skip
validation problems of the quality study), greedy, in both
modes (hard; EvoToken at --alpha, k_soft 3):

  schedule    the authors' step schedule at 1, 2, 4 and 8 tokens per forward
  threshold   the global confidence threshold, swept over --thresholds
  stdd        the per-position dynamic threshold (`evofast.ops.STDD`), swept over --stdd
              points (tau, lam_t, lam_s; window 3, radius 1)

and reports exact-match accuracy with its Wilson 95% interval, forwards per generated token
(the forwards a problem took part in over its generated tokens: 1 / tokens per forward), and
tokens/s (all problems in batches of --batch-size). A threshold or STDD row takes as many
forwards as its positions need, so where it lands on the forwards axis is part of what it
measures. Out: a table on stdout, JSON with every row (and the exact command) with --json,
a figure (accuracy against forwards per token, one line per policy and mode) with --plot.
"""
from __future__ import annotations

import argparse
import sys

from ..cli.common import command
from . import _common

HELP = "decoding policies (schedule, threshold sweep, STDD sweep) x {hard, evotoken}: accuracy vs forwards/token"
TOKENS_PER_STEP = (1, 2, 4, 8)
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)
STDD_POINTS = ("0.7,1,0", "0.7,0,1", "0.7,1,1", "0.8,1,0", "0.8,0,1", "0.8,1,1", "0.9,1,1")
K_SOFT = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="a trained checkpoint with its task file (default: the shipped model)")
    parser.add_argument("--problems", type=int, default=500, help="held-out test problems (500)")
    parser.add_argument("--skip", type=int, default=200,
                        help="held-out problems left out first (200: the quality study's validation problems, so "
                             "the rows score the study's test problems)")
    parser.add_argument("--batch-size", type=int, default=250, help="problems decoded at once (250)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="EvoToken's mask weight (default: the model's study card, else 0.7)")
    parser.add_argument("--tokens-per-step", type=int, nargs="+", default=list(TOKENS_PER_STEP), metavar="N")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS), metavar="T")
    parser.add_argument("--stdd", nargs="+", default=list(STDD_POINTS), metavar="TAU,LAM_T,LAM_S",
                        help="STDD sweep points")
    parser.add_argument("--json", metavar="FILE", default=None, help="write the environment and rows here")
    parser.add_argument("--plot", metavar="FILE.png", default=None, help="write the figure here")
    parser.add_argument("--device", default="auto", help="cpu | cuda | cuda:N (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="which held-out problems (0)")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads")


def policy_rows(args) -> list:
    """(family, policy name of `evofast.study.scoring`, tokens per step) of every row, per mode."""
    rows = [("schedule", "schedule", t) for t in args.tokens_per_step]
    # a threshold or STDD row needs a valid `steps`: one token per forward keeps every block's count valid
    rows += [("threshold", f"threshold@{t:g}", 1) for t in args.thresholds]
    for point in args.stdd:
        parts = point.split(",")
        if len(parts) != 3:
            raise ValueError(f"--stdd: expected TAU,LAM_T,LAM_S, got {point!r}")
        rows.append(("stdd", "stdd@" + ",".join(f"{k}={v}" for k, v in zip(("tau", "lam_t", "lam_s"), parts)), 1))
    return rows


def _settings(args, alpha: float) -> list:
    from ..study.scoring import Setting
    out = []
    for family, policy, tps in policy_rows(args):
        out.append((family, Setting("hard", tps, 0.0, None, policy)))
        out.append((family, Setting("evotoken", tps, 0.0, alpha, policy)))
    return out


def _row(family: str, setting, res: dict, gen_length: int) -> dict:
    from ..evaluation.report import wilson_interval
    n, right = res["n"], sum(res["correct"])
    lo, hi = wilson_interval(right, n)
    return {"family": family, "mode": setting.mode, "policy": setting.policy,
            "tokens_per_step": setting.tokens_per_step if family == "schedule" else None,
            "alpha": setting.alpha, "problems": n, "accuracy": right / n, "ci_low": lo, "ci_high": hi,
            "forwards_per_token": res["forwards_per_problem"] / gen_length,
            "tokens_per_s": n * gen_length / res["seconds"] if res["seconds"] else None,
            "right_to_wrong": res["right_to_wrong"], "wrong_to_right": res["wrong_to_right"]}


COLUMNS = [("mode", "mode"), ("policy", "policy"), ("tokens_per_step", "tokens/step"), ("accuracy", "accuracy"),
           ("ci_low", "lo"), ("ci_high", "hi"), ("forwards_per_token", "forwards/token"), ("tokens_per_s", "tokens/s"),
           ("right_to_wrong", "R->W"), ("wrong_to_right", "W->R")]


@command("evofast bench policies")
def run(args: argparse.Namespace) -> int:
    from ..study.experiment import problem_sets
    from ..study.scoring import score
    from ..study.showcase import load

    settings = _settings(args, 0.7 if args.alpha is None else args.alpha)   # every row checked first
    if args.problems < 1 or args.batch_size < 1 or args.skip < 0:
        raise ValueError(f"--problems, --batch-size (>= 1) and --skip (>= 0): got {args.problems}, "
                         f"{args.batch_size}, {args.skip}")
    device = _common.pick_device(args.device)
    model, tok, task, card = load(args.model, device)
    if args.alpha is None and card:
        alpha = card.get("decoding", {}).get("alpha") or 0.7
        settings = _settings(args, alpha)
    _, test = problem_sets(task, args.problems, args.skip, args.seed)
    env = _common.environment(device)
    print(f"evofast bench policies: {env['device']} ({device}), {len(test)} problems of {task.spec()}, "
          f"gen {task.gen_length}, block {task.block_length}, greedy", file=sys.stderr, flush=True)
    rows = []
    for i, (family, setting) in enumerate(settings, 1):
        res = score(model, tok, task, test, setting, batch_size=args.batch_size, seed=args.seed, k_soft=K_SOFT)
        rows.append(_row(family, setting, res, task.gen_length))
        print(f"[{i}/{len(settings)}] {setting.name}: {rows[-1]['accuracy']:.3f}, "
              f"{rows[-1]['forwards_per_token']:.3f} forwards/token", file=sys.stderr, flush=True)
    print(_common.format_table(rows, COLUMNS))
    if args.json:
        _common.write_json(args.json, {
            "benchmark": "evofast.bench.policies", "schema_version": _common.SCHEMA_VERSION, "env": env,
            "config": {"model": args.model or "shipped", "task": task.spec(), "problems": len(test),
                       "gen_length": task.gen_length, "block_length": task.block_length, "k_soft": K_SOFT,
                       "skip": args.skip, "seed": args.seed}, "rows": rows})
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        _common.save_figure(figure(rows), args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def figure(rows: list):
    """Accuracy (with its Wilson 95% interval) against forwards per generated token: a line per
    (policy family, mode)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"schedule": "o-", "threshold": "s--", "stdd": "^:"}
    for family in ("schedule", "threshold", "stdd"):
        for mode, color in (("hard", "tab:gray"), ("evotoken", "tab:blue")):
            pts = sorted((r["forwards_per_token"], r["accuracy"], r["ci_low"], r["ci_high"]) for r in rows
                         if r["family"] == family and r["mode"] == mode)
            if pts:
                x, y, lo, hi = (list(v) for v in zip(*pts))
                err = [[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]]
                ax.errorbar(x, y, yerr=err, fmt=styles[family], color=color, label=f"{family}, {mode}",
                            alpha=0.85, capsize=2, elinewidth=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("forwards per generated token (log scale)")
    ax.set_ylabel("exact-match accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig

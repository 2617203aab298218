"""`evofast bench quality`: the paper's comparison in miniature, on a model trained here.

    evofast bench quality [--task add] [--json FILE] [--plot FILE.png] [--base DIR] [--cts DIR]
        [--workdir DIR] [--train-minutes 10] [--problems 500] [--alphas 0.5 0.7 0.9] [--caches none prefix dual]

One command reproduces it on a CPU: it trains the base model with `evofast train-base`
(masked diffusion from scratch, --train-minutes; reused from --workdir when it is
there with the same settings), fine-tunes it with `evofast train-cts` on the task's
train split (when `evofast.cts` is installed), then scores every configuration of

    {base, CTS-finetuned} x {hard, evotoken (alpha in --alphas, k_soft 3)}
        x {no cache, prefix, dual} x {steps = gen/2, gen/4}

on the same --problems test problems (greedy, fixed seeds): exact-match accuracy with its
Wilson 95% interval and tokens/s (all test problems as one batch per --batch-size,
tokens = problems x gen_length over the generation time; `other_cpu` records how
busy the machine was meanwhile). A configuration whose piece is not built (a KV cache
that raises NotImplementedError, no CTS trainer) is listed as skipped with the reason.
Out: a markdown table on stdout, JSON (environment, exact command, settings, every
row) with --json, a matplotlib figure with --plot.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ..cli.common import keeps_torch_threads
from . import _common

HELP = "trained-model quality: {base, CTS} x {hard, evotoken} x {caches} x {steps}: accuracy, tokens/s"
CACHES = ("none", "prefix", "dual")
K_SOFT = 3
# CTS fine-tuning of the small base: every parameter (LoRA's rank would exceed d_model), one pass over
# --cts-examples (<eos>-padded to the full length, see Task.write_jsonl) in batches of 32 = 300 steps, blocks
# of the task's block length (added in _ensure_cts). Measured on the 2-digit base (hard 63%): lr 1e-4 gave
# hard 47% / evotoken(0.7) 49%, lr 1e-5 hard 53% / evotoken 48%; unpadded data was far worse (20-28%).
CTS_ARGS = "--full --lr 1e-4 --batch-size 32 --steps 300 --no-progress"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="add:digits=2", metavar="NAME[:k=v,...]",
                        help="task (default add:digits=2: 2-digit addition with worked steps)")
    parser.add_argument("--base", default=None, metavar="DIR",
                        help="a trained base model (default: train one into --workdir, or reuse it there)")
    parser.add_argument("--cts", default=None, metavar="DIR",
                        help="a CTS-finetuned model (default: train-cts on the base into --workdir when "
                             "evofast.cts exists; 'skip' to leave CTS out)")
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "evofast" / "quality"), metavar="DIR",
                        help="where trained models are kept between runs (~/.cache/evofast/quality)")
    parser.add_argument("--train-minutes", type=float, default=10.0, help="budget of train-base (10)")
    parser.add_argument("--train-steps", type=int, default=1500, help="step cap of train-base (1500)")
    parser.add_argument("--cts-examples", type=int, default=9600, help="train-split examples for train-cts (9600)")
    parser.add_argument("--cts-args", default=CTS_ARGS, metavar="'ARGS'",
                        help=f"arguments passed to evofast train-cts, as one quoted string ('{CTS_ARGS}')")
    parser.add_argument("--problems", type=int, default=400, help="test problems per configuration (400)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and of the test sample")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.7, 0.9], help="evotoken mask weights")
    parser.add_argument("--caches", nargs="+", choices=CACHES, default=list(CACHES))
    parser.add_argument("--steps-div", type=int, nargs="+", default=[2, 4], metavar="D",
                        help="steps = gen_length / D for each D (2 4)")
    parser.add_argument("--batch-size", type=int, default=512, help="test problems decoded at once (512)")
    parser.add_argument("--json", metavar="FILE", default=None, help="write environment, settings and rows here")
    parser.add_argument("--plot", metavar="FILE.png", default=None, help="write the accuracy / speed figure here")
    parser.add_argument("--device", default="auto", help="cpu | cuda | cuda:N (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _ensure_base(args, task, device) -> Path:
    """The base model directory: --base, or one trained (once) into the workdir."""
    if args.base:
        return Path(args.base)
    from .. import cli
    key = f"{task.name}-{'-'.join(f'{k}{v}' for k, v in task.params().items())}-seed{args.seed}-" \
          f"{args.train_minutes:g}min-{args.train_steps}steps"
    out = Path(args.workdir) / key / "base"
    if (out / "model.safetensors").exists():
        _log(f"bench quality: reusing the base model {out}")
        return out
    _log(f"bench quality: training the base model into {out} (about {args.train_minutes:g} min)")
    argv = ["train-base", "--task", args.task, "--out", str(out), "--minutes", str(args.train_minutes),
            "--steps", str(args.train_steps), "--seed", str(args.seed), "--device", str(device), "--eval-n", "0"]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if cli.main(argv) != 0:
        raise SystemExit("bench quality: train-base failed")
    return out


def _ensure_cts(args, task, base: Path) -> tuple[Optional[Path], Optional[str]]:
    """(CTS model directory, None) or (None, why it is skipped)."""
    if args.cts == "skip":
        return None, "CTS left out (--cts skip)"
    if args.cts:
        return Path(args.cts), None
    if importlib.util.find_spec("evofast.cts") is None or importlib.util.find_spec("evofast.cli.train_cts") is None:
        return None, "skipped: evofast.cts / evofast train-cts is not built yet"
    import hashlib
    import shlex

    from .. import cli
    recipe = f"eos-padded|{args.cts_args}|{args.cts_examples}|{args.seed}"   # a new recipe trains a new model
    out = base.parent / f"cts-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"
    if (out / "model.safetensors").exists():
        _log(f"bench quality: reusing the CTS model {out}")
        return out, None
    data = task.write_jsonl(base.parent / "train.jsonl", args.cts_examples, seed=args.seed + 1)
    argv = ["train-cts", "--model", str(base), "--data", str(data), "--out", str(out), "--no-chat-template",
            "--block-sizes", str(task.block_length), "--seed", str(args.seed), "--device", args.device,
            *shlex.split(args.cts_args)]
    _log(f"bench quality: evofast {' '.join(argv)}")
    if cli.main(argv) != 0:
        return None, f"skipped: `evofast {' '.join(argv)}` failed"
    if not (out / "model.safetensors").exists():
        return None, f"skipped: train-cts wrote no model.safetensors into {out}"
    from ..tasks import TASK_FILE
    if (base / TASK_FILE).exists():                 # so `evofast eval --model <cts dir>` knows the task too
        (out / TASK_FILE).write_text((base / TASK_FILE).read_text())
    return out, None


def configurations(task, args) -> list:
    """(mode, alpha, cache, steps) of every decoding configuration, in table order."""
    out = []
    for div in args.steps_div:
        steps = task.gen_length // div
        for cache in args.caches:
            out.append(("hard", None, cache, steps))
            for a in args.alphas:
                out.append(("evotoken", a, cache, steps))
    return out


def _row(mode, alpha, cache, steps) -> dict:
    """The settings columns of a row."""
    return {"mode": mode, "alpha": alpha, "k_soft": K_SOFT if mode == "evotoken" else None, "cache": cache,
            "steps": steps}


def score(model, tok, task, mode, alpha, cache, steps, args) -> dict:
    """One row: evaluate() on the fixed test set, or the reason it was skipped."""
    from ..study.evaluate import evaluate
    row = _row(mode, alpha, cache, steps)
    contention = _common.CpuContention()
    try:
        res = evaluate(model, tok, task, n=args.problems, seed=args.seed, mode=mode,
                       cache=None if cache == "none" else cache, steps=steps, k_soft=K_SOFT,
                       alpha=alpha if alpha is not None else 0.7, batch_size=args.batch_size, progress=False,
                       keep_samples=3)
    except NotImplementedError as e:
        row["skipped"] = f"{type(e).__name__}: {e}"
        return row
    row.update({k: res[k] for k in ("n", "correct", "accuracy", "ci95", "tokens_per_s", "seconds", "samples")})
    row["other_cpu"] = contention.other_fraction()
    return row


def render(rows: list) -> str:
    """The markdown table (accuracy in %, its interval, tokens/s; skipped rows say why)."""
    head = "| model | mode | alpha | cache | steps | accuracy % [95% CI] | tokens/s |\n|---|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:g}"
        if r.get("skipped"):
            acc, tps = f"skipped ({r['skipped'][:60]})", "-"
        else:
            acc = f"{100 * r['accuracy']:.1f} [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]"
            tps = _common.fmt(r["tokens_per_s"])
        lines.append(f"| {r['model']} | {r['mode']} | {alpha} | {r['cache']} | {r['steps']} | {acc} | {tps} |")
    return "\n".join(lines)


def plot(rows: list, path, title: str) -> Path:
    """Two panels over the configurations: accuracy with 95% intervals, and tokens/s."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if not r.get("skipped")]
    labels = [f"{r['model']} {r['mode']}{'' if r['alpha'] is None else ' a' + format(r['alpha'], 'g')} "
              f"{r['cache']} s{r['steps']}" for r in done]
    colours = {("base", "hard"): "#7f7f7f", ("base", "evotoken"): "#1f77b4", ("cts", "hard"): "#bcbd22",
               ("cts", "evotoken"): "#d62728"}
    col = [colours.get((r["model"], r["mode"]), "#333333") for r in done]
    x = range(len(done))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(8, 0.35 * len(done) + 2), 7), sharex=True)
    acc = [100 * r["accuracy"] for r in done]
    err = [[100 * (r["accuracy"] - r["ci95"][0]) for r in done], [100 * (r["ci95"][1] - r["accuracy"]) for r in done]]
    a1.bar(x, acc, color=col, yerr=err, capsize=2)
    a1.set_ylabel("exact match % (95% CI)")
    a1.set_title(title, fontsize=9)
    a2.bar(x, [r["tokens_per_s"] or 0 for r in done], color=col)
    a2.set_ylabel("tokens/s")
    a2.set_xticks(list(x))
    a2.set_xticklabels(labels, rotation=75, ha="right", fontsize=7)
    return _common.save_figure(fig, path)


@keeps_torch_threads
def run(args: argparse.Namespace) -> int:
    from ..evaluation import load_model_and_task
    from ..tasks import parse_task

    for name in ("problems", "batch_size", "cts_examples", "train_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if not all(0 <= a < 1 for a in args.alphas):
        raise SystemExit(f"--alphas: each must lie in [0, 1), got {args.alphas}")
    device = _common.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = parse_task(args.task, synthetic=True)
    bad = [d for d in args.steps_div if d < 1 or task.gen_length % d or (task.gen_length // d) % (
        task.gen_length // task.block_length)]
    if bad:
        raise SystemExit(f"--steps-div: gen_length {task.gen_length} / D must be a whole number of steps per "
                         f"block ({task.gen_length // task.block_length} blocks), not for D in {bad}")
    env = _common.environment(device)
    t_start = time.perf_counter()
    base = _ensure_base(args, task, device)
    cts_dir, cts_note = _ensure_cts(args, task, base)
    models = [("base", base)] + ([("cts", cts_dir)] if cts_dir else [])
    notes = [] if cts_note is None else [f"cts: {cts_note}"]
    rows = []
    confs = configurations(task, args)
    from tqdm.auto import tqdm
    bar = tqdm(total=len(confs) * len(models), desc="bench quality", unit="config")
    try:
        for label, path in models:
            model, tok, _ = load_model_and_task(path, args.task, device)
            for mode, alpha, cache, steps in confs:
                bar.set_postfix_str(f"{label} {mode} {cache} s{steps}")
                row = {"model": label, **score(model, tok, task, mode, alpha, cache, steps, args)}
                rows.append(row)
                bar.update(1)
    finally:
        bar.close()
    if cts_note is not None and args.cts != "skip":        # listed, so the table shows what is missing
        for mode, alpha, cache, steps in confs:
            rows.append({"model": "cts", **_row(mode, alpha, cache, steps), "skipped": cts_note})
    skipped_caches = sorted({r["cache"] for r in rows if r.get("skipped", "").startswith("NotImplementedError")})
    if skipped_caches:
        notes.append(f"caches {skipped_caches}: skipped, evofast.generate raises NotImplementedError for them here")

    base_log = base / "train_log.json"
    train_info = json.loads(base_log.read_text()) if base_log.exists() else None
    print(f"evofast bench quality: {env['device']} ({device}, {env['cores']} cores, {env['torch_threads']} torch "
          f"threads), torch {env['torch']}, commit {(env['commit'] or 'none')[:12]}"
          f"{' (dirty)' if env['dirty'] else ''}, {env['time_utc']}")
    print(f"task {task!r}: {args.problems} test problems (seed {args.seed}), gen_length {task.gen_length}, "
          f"block {task.block_length}, greedy; k_soft {K_SOFT}")
    if train_info:
        c = train_info.get("config", {})
        print(f"base: {base} ({c.get('parameters', '?')} parameters, {train_info['steps']} steps, "
              f"{train_info['seconds']:.0f} s of training, final loss {train_info['final_loss']:.3f})")
    print()
    print(render(rows))
    for n in notes:
        print(f"\nnote: {n}")
    payload = {"benchmark": "evofast.bench.quality", "schema_version": _common.SCHEMA_VERSION, "env": env,
               "config": {"task": task.spec(), "n": args.problems, "seed": args.seed, "alphas": args.alphas,
                          "caches": args.caches, "steps_div": args.steps_div, "k_soft": K_SOFT,
                          "batch_size": args.batch_size, "train_minutes": args.train_minutes,
                          "train_steps": args.train_steps, "base": str(base), "cts": str(cts_dir) if cts_dir else None,
                          "device": str(device)},
               "train_base": train_info, "notes": notes, "seconds": time.perf_counter() - t_start, "rows": rows}
    if args.json:
        print(f"\nwrote {_common.write_json(args.json, payload)}")
    if args.plot:
        title = f"evofast bench quality: {task!r}, {args.problems} test problems, {device}"
        print(f"wrote {plot(rows, args.plot, title)}")
    return 0


def main(argv=None) -> int:
    from .. import cli
    return cli.standalone(sys.modules[__name__], "evofast bench quality", argv)

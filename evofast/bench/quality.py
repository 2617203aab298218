"""`evofast bench quality`: does EvoToken help, and where? A paired study on models trained here.

    evofast bench quality [--task countdown-synth:...,aligned=1] [--control add:digits=2 | none]
        [--seeds 3] [--problems 1000] [--json FILE] [--plot FILE.png] [--export-model DIR] [--device cpu|cuda]

One seeded command. Per task (the main one, then the control) it pretrains a base
(masked diffusion, `evofast.study.pretrain`; kept in --workdir and reused by a rerun with
the same settings), then fine-tunes it `--seeds` times per arm and fine-tune setting:

    FT-baseline   the plain masked-diffusion loss          } same data, steps, optimiser, warm-up
    CTS           the CTS loss, batches shaped like decoding } and trainable subset (LoRA on q/k/v, or all)

and decodes the same held-out test problems with every model: hard and EvoToken, at
`--tokens-per-step` tokens per forward, greedy and at each `--temperatures`, with the
step schedule and with each other `--policies` row (greedy); each model's EvoToken alpha
is chosen on separate validation problems. Reported: accuracy per arm and decoding,
revisions (right->wrong, wrong->right), and the paired contrasts CTS-evotoken vs FT-hard,
CTS-hard vs FT-hard, CTS-evotoken vs CTS-hard (and EvoToken vs hard for FT and the base):
the mean difference over seeds with a paired bootstrap interval over problems, a verdict
only when the interval excludes 0, and per seed the difference and McNemar's exact test.
Out: tables on stdout, JSON (environment, command, settings, every per-problem result)
with --json, a figure of the contrasts with --plot, and with --export-model the main
task's CTS model (LoRA, seed 0) as a checkpoint directory with its study accuracy.
On a GPU (--device cuda) the default is 10 seeds.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from ..cli.common import keeps_torch_threads
from . import _common

HELP = "does EvoToken help? base / FT-baseline / CTS x hard / evotoken, paired contrasts over seeds"
MAIN_TASK = "countdown-synth:count=3,hi=9,aligned=1"
CONTROL_TASK = "add:digits=2"
SHIPPED_SETTING = {"mode": "evotoken", "tokens_per_step": 2, "temperature": 0.0, "policy": "schedule"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..study.experiment import StudyConfig
    d = StudyConfig()
    parser.add_argument("--task", default=MAIN_TASK, metavar="NAME[:k=v,...]",
                        help=f"main task, fixed-width (default {MAIN_TASK})")
    parser.add_argument("--control", default=CONTROL_TASK, metavar="NAME[:k=v,...]|none",
                        help=f"control task, where revision should not matter (default {CONTROL_TASK})")
    parser.add_argument("--settings", nargs="+", choices=("lora", "full"), default=["lora", "full"],
                        help="fine-tune settings of the main task (default: lora full)")
    parser.add_argument("--control-settings", nargs="+", choices=("lora", "full"), default=["lora"],
                        help="fine-tune settings of the control (default: lora)")
    parser.add_argument("--seeds", type=int, default=None, help="fine-tune seeds per arm (3; 10 on a GPU)")
    parser.add_argument("--problems", type=int, default=d.problems, help=f"test problems ({d.problems})")
    parser.add_argument("--val-problems", type=int, default=d.val_problems,
                        help=f"validation problems for the choice of alpha ({d.val_problems})")
    parser.add_argument("--tokens-per-step", type=int, nargs="+", default=list(d.tokens_per_step), metavar="N")
    parser.add_argument("--temperatures", type=float, nargs="+", default=list(d.temperatures), metavar="T")
    parser.add_argument("--alphas", type=float, nargs="+", default=list(d.alphas), metavar="A",
                        help="EvoToken mask weights to choose from on the validation problems")
    parser.add_argument("--policies", nargs="+", default=list(d.policies), metavar="NAME",
                        help="decoding policies (rows of evofast.study.scoring.POLICIES)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--base-steps", type=int, default=3000, help="pretraining steps of the main task's base (3000)")
    parser.add_argument("--control-base-steps", type=int, default=1200,
                        help="pretraining steps of the control's base (1200: addition is learnt sooner)")
    parser.add_argument("--base-batch", type=int, default=64)
    parser.add_argument("--base-lr", type=float, default=2e-3)
    parser.add_argument("--ft-steps", type=int, default=d.ft_steps, help=f"fine-tune steps, every arm ({d.ft_steps})")
    parser.add_argument("--ft-batch", type=int, default=d.ft_batch)
    parser.add_argument("--lora-r", type=int, default=d.lora_r, help=f"LoRA rank ({d.lora_r}; alpha 2 r)")
    parser.add_argument("--lora-lr", type=float, default=d.lora_lr)
    parser.add_argument("--full-lr", type=float, default=d.full_lr)
    parser.add_argument("--decode-batch", type=int, default=d.decode_batch, help="problems decoded at once")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything (bases, fine-tunes, problems)")
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "evofast" / "quality"), metavar="DIR",
                        help="where trained bases are kept between runs (~/.cache/evofast/quality)")
    parser.add_argument("--export-model", metavar="DIR", default=None,
                        help="write the main task's CTS model (LoRA, seed 0) here, with its study accuracy")
    parser.add_argument("--json", metavar="FILE", default=None, help="write everything here")
    parser.add_argument("--plot", metavar="FILE.png", default=None, help="write the contrasts' figure here")
    parser.add_argument("--device", default="auto", help="cpu | cuda | cuda:N (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _base(args, task, steps: int, device) -> tuple:
    """(base model, tokenizer, train log dict, reused?): trained into the workdir, or reused from it."""
    from ..models.llada import LLaDAModelLM
    from ..study import pretrain
    from ..tasks import make_tokenizer

    recipe = {"task": task.spec(), "d_model": args.d_model, "layers": args.layers, "heads": args.heads,
              "steps": steps, "batch": args.base_batch, "lr": args.base_lr, "seed": args.seed}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(args.workdir) / f"base-{task.name}-{key}"
    if (out / "model.safetensors").exists():
        _log(f"bench quality: reusing the base {out}")
        model = LLaDAModelLM.from_pretrained(out).to(device).eval()
        return model, make_tokenizer(), json.loads((out / "train_log.json").read_text()), True
    model, tok = pretrain.build_model(task, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                                      seed=args.seed)
    log = pretrain.train(model, tok, task, steps=steps, batch_size=args.base_batch, lr=args.base_lr,
                         seed=args.seed, device=device, progress=args.progress, log_every=100)
    log.config.update(recipe=recipe, parameters=sum(p.numel() for p in model.parameters()))
    pretrain.save(model.cpu(), tok, task, out, log)
    return model.to(device), tok, json.loads((out / "train_log.json").read_text()), False


def _config(args, seeds: int):
    from ..study.experiment import StudyConfig
    return StudyConfig(seeds=seeds, problems=args.problems, val_problems=args.val_problems,
                       tokens_per_step=tuple(args.tokens_per_step), temperatures=tuple(args.temperatures),
                       alphas=tuple(args.alphas), policies=tuple(args.policies), ft_steps=args.ft_steps,
                       ft_batch=args.ft_batch, lora_r=args.lora_r, lora_lr=args.lora_lr, full_lr=args.full_lr,
                       decode_batch=args.decode_batch, seed=args.seed, ft_warmup=max(1, args.ft_steps // 10))


@keeps_torch_threads
def run(args: argparse.Namespace) -> int:
    from ..study.experiment import check_task, run_task
    from ..study.report import render, plot
    from ..tasks import parse_task

    device = _common.pick_device(args.device)
    seeds = args.seeds if args.seeds is not None else (10 if device.type == "cuda" else 3)
    if seeds < 1:
        raise SystemExit(f"--seeds: must be >= 1, got {seeds}")
    try:
        cfg = _config(args, seeds)
        tasks = [("main", parse_task(args.task, synthetic=True), tuple(args.settings), args.base_steps)]
        if args.control != "none":
            tasks.append(("control", parse_task(args.control, synthetic=True), tuple(args.control_settings),
                          args.control_base_steps))
        for _, task, _, steps in tasks:
            if steps < 1:
                raise ValueError(f"base steps: must be >= 1, got {steps}")
            check_task(task, cfg)
    except ValueError as e:
        raise SystemExit(f"evofast bench quality: {e}") from None
    for path, flag in ((args.json, "--json"), (args.plot, "--plot")):
        if path and Path(path).is_dir():
            raise SystemExit(f"{flag}: {path} is a directory")
    if args.export_model and Path(args.export_model).exists() and any(Path(args.export_model).iterdir()):
        raise SystemExit(f"--export-model: {args.export_model} exists and is not empty")
    if args.threads:
        torch.set_num_threads(args.threads)
    env = _common.environment(device)
    contention = _common.CpuContention()
    t_start = time.perf_counter()
    results = []
    for role, task, settings, steps in tasks:
        t0 = time.perf_counter()
        base, tok, train_log, reused = _base(args, task, steps, device)
        base_s = time.perf_counter() - t0
        export = _exporter(args, task, tok) if role == "main" else None
        res = run_task(task, base, tok, cfg, settings=settings, device=device, progress=args.progress, log=_log,
                       on_model=export)
        res.update(role=role, base_train=train_log, base_reused=reused, base_seconds=base_s,
                   seconds=time.perf_counter() - t0)
        if export is not None:
            res["exported"] = export.finish(res)
        results.append(res)
    seconds = time.perf_counter() - t_start
    payload = {"benchmark": "evofast.bench.quality", "schema_version": 2, "env": env, "config": cfg.as_dict(),
               "model": {"d_model": args.d_model, "layers": args.layers, "heads": args.heads,
                         "base_steps": args.base_steps, "control_base_steps": args.control_base_steps,
                         "base_batch": args.base_batch, "base_lr": args.base_lr},
               "device": str(device), "seconds": seconds, "other_cpu": contention.other_fraction(),
               "tasks": results}
    print(render(payload))
    if args.json:
        print(f"\nwrote {_common.write_json(args.json, payload)}")
    if args.plot:
        print(f"wrote {plot(payload, args.plot)}")
    return 0


class _exporter:
    """Keeps the main task's CTS model (LoRA, seed 0) and writes it with its study accuracy."""

    def __init__(self, args, task, tok):
        self.out, self.task, self.tok = args.export_model, task, tok
        self.model = None

    def __call__(self, arm, setting, seed, model):
        if self.out and arm == "cts" and seed == 0 and setting == "lora":
            import copy
            self.model = copy.deepcopy(model).cpu()

    def finish(self, res: dict):
        if not self.out or self.model is None:
            return None
        from ..study import pretrain
        rec = next(m for m in res["models"] if m["arm"] == "cts" and m["setting"] == "lora" and m["seed"] == 0)
        dec = next(d for d in rec["decodings"] if all(d["setting"][k] == v for k, v in SHIPPED_SETTING.items()))
        card = {"arm": "cts", "setting": "lora", "seed": 0, "decoding": {**dec["setting"], "k_soft": 3},
                "accuracy": dec["accuracy"], "n": dec["n"], "task": self.task.spec(),
                "command": " ".join(_common.command_line())}
        path = pretrain.save(self.model, self.tok, self.task, self.out)
        (Path(path) / "study.json").write_text(json.dumps(card, indent=2) + "\n")
        return {"path": str(path), **card}


def main(argv=None) -> int:
    from .. import cli
    return cli.standalone(sys.modules[__name__], "evofast bench quality", argv)

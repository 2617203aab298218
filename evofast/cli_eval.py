"""`evofast eval`: exact-match accuracy and tokens/s of a trained model on its task's test split.

    evofast eval --model DIR [--task NAME[:k=v,...]] [--mode hard|evotoken] [--cache none|prefix|dual]
        [--steps N] [--gen-length N] [--block-length N] [--k-soft 3] [--alpha 0.7] [--problems 500]
        [--seed 0] [--batch-size 128] [--json FILE] [--device auto] [--threads N]

DIR is a checkpoint written by `evofast train-base` (or `train-cts` on one): the task
defaults to DIR's `evofast_task.json`, steps to gen_length / 2. Prints one line with
the accuracy and its Wilson 95% interval (and a JSON record with --json, which also
holds the exact command and a few decoded samples).

Several processes: `torchrun --nproc-per-node N -m evofast eval ...` (or `accelerate
launch -m evofast eval ...`) splits the test set over the processes and gathers the
results; rank 0 prints and writes the JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli import keeps_torch_threads

HELP = "exact-match accuracy (with a Wilson 95 percent interval) and tokens/s of a trained model on a task"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (train-base / train-cts)")
    parser.add_argument("--task", default=None, metavar="NAME[:k=v,...]",
                        help="task (default: the one saved in DIR's evofast_task.json)")
    parser.add_argument("--mode", choices=("hard", "evotoken"), default="hard")
    parser.add_argument("--cache", choices=("none", "prefix", "dual"), default="none")
    parser.add_argument("--steps", type=int, default=None, help="decoding steps (default gen_length / 2)")
    parser.add_argument("--gen-length", type=int, default=None, help="default: the task's")
    parser.add_argument("--block-length", type=int, default=None, help="default: the task's")
    parser.add_argument("--k-soft", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.7)
    # not --n: torchrun would read it as an abbreviation of its own --nnodes / --nproc-per-node
    parser.add_argument("--problems", type=int, default=500, help="test problems (500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the test sample")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", metavar="FILE", default=None, help="write the result record here")
    parser.add_argument("--device", default="auto", help="cpu | cuda | cuda:N (default: cuda when available; "
                                                         "under torchrun cuda:LOCAL_RANK)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")


def load_model_and_task(path, task_text, device):
    """(model patched for generate, tokenizer, task) of a train-base / train-cts directory."""
    import torch

    from .cli_generate import load_checkpoint
    from .models.registry import patch
    from .tasks import TASK_FILE, parse_task, task_from_spec

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"--model: {path} is not a directory")
    if task_text:
        task = parse_task(task_text)
    elif (path / TASK_FILE).exists():
        task = task_from_spec(json.loads((path / TASK_FILE).read_text()))
    else:
        raise ValueError(f"--task: {path} has no {TASK_FILE}; name the task")
    model, tok = load_checkpoint(str(path), device, torch.float32, False)
    patch(model, mask_id=tok.mask_token_id if model.config.mask_token_id is None else None)
    return model, tok, task


def _device(name):
    import os

    import torch

    from .bench._common import pick_device
    if name in (None, "auto") and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return pick_device(name)


@keeps_torch_threads
def run(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    def err(msg):
        print(f"evofast eval: error: {msg}", file=sys.stderr)
        return 2

    if args.threads:
        torch.set_num_threads(args.threads)
    owned = dist.is_available() and not dist.is_initialized()    # a group we start, we also end
    try:
        return _run(args, err)
    finally:
        if owned and dist.is_initialized():
            # all ranks leave together; without it a rank can abort at exit while gloo still runs
            dist.barrier()
            dist.destroy_process_group()


def _run(args, err) -> int:
    import torch

    from .bench import _common
    from .evaluate import distributed_context, evaluate

    try:
        device = _device(args.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model, tok, task = load_model_and_task(args.model, args.task, device)
        rank, world = distributed_context(device)
        res = evaluate(model, tok, task, n=args.problems, seed=args.seed, mode=args.mode,
                       cache=None if args.cache == "none" else args.cache, steps=args.steps,
                       gen_length=args.gen_length, block_length=args.block_length, k_soft=args.k_soft,
                       alpha=args.alpha, batch_size=args.batch_size, progress=not args.no_progress)
    except (OSError, ValueError, NotImplementedError) as e:
        return err(str(e))
    if rank != 0:
        return 0
    res = {"model": str(args.model), **res, "command": _common.command_line(),
           "env": _common.environment(device)}
    tps = res["tokens_per_s"]
    print(f"{task.name} {args.mode} cache={res['cache']} steps={res['steps']}: accuracy {res['accuracy']:.3f} "
          f"[{res['ci95'][0]:.3f}, {res['ci95'][1]:.3f}] ({res['correct']}/{res['n']}), "
          f"{tps:.0f} tokens/s on {world} process{'es' if world > 1 else ''}")
    if args.json:
        print(f"wrote {_common.write_json(args.json, res)}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    from . import cli
    return cli.standalone(sys.modules[__name__], "evofast eval", argv)


if __name__ == "__main__":
    sys.exit(main())

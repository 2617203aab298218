"""`evofast eval`: a model's accuracy and speed on a task, over a grid of decoding settings.

The paper's benchmarks (gsm8k, math500, svamp, countdown) on a checkpoint, with the
released LoRA, the authors' grid in one model load, resumable:

    evofast eval --model LLaDA-8B-Instruct --lora EvoToken_LLaDA_Instruct_8B_Lora \\
        --task gsm8k --data gsm8k_test.jsonl --out results/gsm8k

For these tasks the defaults are the authors' grid (start_eval.sh): evotoken mode,
gen length 128 and 256, steps = gen length x 0.5, block 32, k_soft 3, alpha 0.9 0.8
0.7 0.6 0.5, temperature 0.5; override any of them. --data is a local .jsonl /
.json / .parquet file with the dataset's own fields, or a hub name `datasets` can
load. --out is required: every configuration's per-example records (question,
prompt, generation, ground truth, extracted answer, correct) are appended to
OUT/<configuration>/rank<R>.jsonl batch by batch, so a crash or Ctrl-C loses at
most one batch and the same command resumes where it stopped; a different command
into the same OUT is refused before the model loads. At the end OUT/summary.json
and summary.md hold per configuration the accuracy with its Wilson 95% interval,
tokens/s, seconds and forwards per example, and the best alpha marked (chosen on
the test set, as the paper reports it); --authors-layout also writes the authors'
{task}_{gen}_{steps}_0_generations.json files under OUT/authors/ for their get_acc.py.

A synthetic task on a model from `evofast train-base` (the task defaults to the
model directory's evofast_task.json) without --out decodes one configuration of
its test split and prints one line (and a JSON record with --json):

    evofast eval --model DIR [--task add:digits=2] [--mode evotoken] [--problems 500]

Prompts are sorted by length and batched with left padding (--batch-size; 1 is the
authors' setting and the token-for-token one at temperature 0). Several processes:
`torchrun --nproc-per-node N -m evofast eval ...` splits the examples over them.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from ..evaluation.loading import load_model_and_task, resolve_task
from .common import POLICY_FLAGS, add_policy_arguments, command, policy_kwargs, resolve_device, resolve_dtype

OPTIONS = ("device", "dtype", "seed", "threads", "progress")
FLAGS = {"gen_length": "--gen-length", "block_length": "--block-length", "steps": "--steps", "mode": "--mode",
         "k_soft": "--k-soft", "alpha": "--alpha", "temperature": "--temperature", "cache": "--cache",
         "steps_factor": "--steps-factor", "batch_size": "--batch-size", "task": "--task", "stdd": "--policy",
         **POLICY_FLAGS}

HELP = "accuracy of a model on the paper's benchmarks (a resumable grid) or a synthetic task"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory")
    g.add_argument("--lora", metavar="DIR", default=None, help="a LoRA adapter directory, loaded unmerged")
    g.add_argument("--merge-lora", action="store_true", help="fold --lora into the weights (not token-identical)")
    g.add_argument("--trust-remote-code", action="store_true", help="run the checkpoint's own model code")
    g = parser.add_argument_group("task")
    g.add_argument("--task", default=None, metavar="NAME[:k=v,...]",
                   help="gsm8k | math500 | svamp | countdown, or a synthetic task (default: DIR's evofast_task.json)")
    g.add_argument("--data", default=None, metavar="FILE", help="the benchmark's test file, or a hub name")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N examples")
    # not --n: torchrun would read it as an abbreviation of its own --nnodes / --nproc-per-node
    g.add_argument("--problems", type=int, default=500, help="synthetic tasks: test problems (500)")
    g = parser.add_argument_group("decoding grid (every combination of the values given)")
    g.add_argument("--mode", choices=("hard", "evotoken"), default=None,
                   help="default: evotoken for the paper's benchmarks, hard for synthetic tasks")
    g.add_argument("--gen-length", type=int, nargs="+", default=None, metavar="N")
    g.add_argument("--steps", type=int, nargs="+", default=None, metavar="N", help="one, or one per gen length")
    g.add_argument("--steps-factor", type=float, default=None, metavar="F", help="steps = gen length x F (0.5)")
    g.add_argument("--block-length", type=int, default=None, metavar="N")
    g.add_argument("--k-soft", type=int, default=None, metavar="K")
    g.add_argument("--alpha", type=float, nargs="+", default=None, metavar="A")
    g.add_argument("--temperature", type=float, default=None, metavar="T")
    g.add_argument("--cache", choices=("none", "prefix", "dual"), default="none")
    add_policy_arguments(parser)
    g = parser.add_argument_group("run")
    g.add_argument("--out", default=None, metavar="DIR", help="the run's directory (required for the benchmarks)")
    g.add_argument("--authors-layout", action="store_true", help="also write the authors' result files")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--json", metavar="FILE", default=None, help="without --out: write the result record here")


def _grid(args, task, paper: bool):
    """The configurations the flags ask for, with the task's defaults."""
    from ..evaluation import expand_grid

    mode = args.mode or ("evotoken" if paper else "hard")
    decoding = policy_kwargs(args)
    decoding["stdd"] = decoding.pop("policy", None)
    if paper:
        gens = args.gen_length or list(task.gen_lengths)
        alphas = args.alpha or list(task.alphas)
        block, k, temp = task.block_length, task.k_soft, task.temperature
    else:
        gens = args.gen_length or [task.gen_length]
        alphas = args.alpha or [0.7]
        block, k, temp = min(task.block_length, gens[0]), 3, 0.0
    return expand_grid(mode=mode, gen_lengths=gens, steps=args.steps, steps_factor=args.steps_factor,
                       block_length=args.block_length or block, alphas=alphas,
                       k_soft=args.k_soft if args.k_soft is not None else k,
                       temperature=args.temperature if args.temperature is not None else temp,
                       cache=None if args.cache == "none" else args.cache, **decoding)


def _examples(args, task, paper: bool) -> tuple:
    """(examples, a description of the data for the run's settings)."""
    if paper:
        if args.data is None:
            raise ValueError(f"--data: the {task.name} benchmark needs its test file (or a hub name); see "
                             "`evofast eval --help`")
        exs = task.load(args.data)
        p = Path(args.data)
        data = ({"path": str(p.resolve()), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} if p.is_file()
                else {"hub": args.data})
    else:
        if args.data is not None:
            raise ValueError(f"--data: the synthetic task {task.name!r} makes its own test split")
        exs = task.test_set(args.problems, args.seed)
        data = {"synthetic": task.spec(), "problems": args.problems}
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit: must be >= 1, got {args.limit}")
        exs = exs[:args.limit]
    return exs, data


@command("evofast eval", FLAGS)
def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    owned = dist.is_available() and not dist.is_initialized()    # a group we start, we also end
    try:
        return _run(args)
    finally:
        if owned and dist.is_initialized():
            # all ranks leave together; without it a rank can abort at exit while gloo still runs
            dist.barrier()
            dist.destroy_process_group()


def _run(args) -> int:
    import torch

    from ..tasks import PaperTask

    if args.batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.merge_lora and args.lora is None:
        raise ValueError("--merge-lora needs --lora DIR")
    if not Path(args.model).is_dir():
        raise ValueError(f"--model: {args.model} is not a directory")
    task = resolve_task(Path(args.model), args.task)
    paper = isinstance(task, PaperTask)
    if args.lora is not None:
        from ..models.loading import check_lora
        check_lora(args.lora, args.model)
    configs = _grid(args, task, paper)
    examples, data = _examples(args, task, paper)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.out is None:
        if paper:
            raise ValueError("--out: the paper's benchmarks write their results to a run directory; give --out DIR")
        if len(configs) != 1:
            raise ValueError(f"--out: {len(configs)} configurations need a run directory; give --out DIR")
        return _one_configuration(args, task, examples, configs[0], device, dtype)
    store = _claim_store(args, task, data, configs, dtype, device, len(examples))
    model, tok, _ = load_model_and_task(args.model, args.task, device, dtype, lora=args.lora,
                                        merge_lora=args.merge_lora, trust_remote_code=args.trust_remote_code)
    from ..evaluation import run_grid
    run_grid(model, tok, task, examples, configs, store, batch_size=args.batch_size, seed=args.seed,
             progress=args.progress, authors_layout=args.authors_layout)
    from ..evaluation.runner import distributed_context
    if distributed_context(device)[0] == 0:
        print(f"wrote {store.out / 'summary.md'} and summary.json", file=sys.stderr)
    return 0


def _claim_store(args, task, data, configs, dtype, device, n):
    """The run directory, claimed by process 0 before any model loads; every process stops if it fails."""
    from .. import __version__
    from ..evaluation import ResultStore
    from ..evaluation.runner import distributed_context

    settings = {"model": str(Path(args.model).resolve()), "lora": args.lora and str(Path(args.lora).resolve()),
                "merge_lora": args.merge_lora, "trust_remote_code": args.trust_remote_code,
                "dtype": str(dtype).replace("torch.", ""), "task": getattr(task, "name", str(task)),
                "data": data, "examples": n, "seed": args.seed, "batch_size": args.batch_size,
                "configurations": [c.name for c in configs], "evofast": __version__}
    store = ResultStore(args.out, settings)
    rank, world = distributed_context(device)
    problem = None
    if rank == 0:
        try:
            state = store.claim()
            if state == "resume" and args.progress:
                print(f"evofast eval: resuming the run in {store.out}", file=sys.stderr)
        except ValueError as e:
            problem = str(e)
    if world > 1:
        import torch.distributed as dist
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise ValueError(problem)
    return store


def _one_configuration(args, task, examples, config, device, dtype) -> int:
    """A synthetic task's single configuration, in memory: one line, and a JSON record with --json."""
    from ..bench import _common
    from ..study.evaluate import evaluate
    from ..evaluation.runner import distributed_context

    model, tok, _ = load_model_and_task(args.model, args.task, device, dtype, lora=args.lora,
                                        merge_lora=args.merge_lora, trust_remote_code=args.trust_remote_code)
    rank, world = distributed_context(device)
    res = evaluate(model, tok, task, examples=examples, seed=args.seed, mode=config.mode, cache=config.cache,
                   steps=config.steps, gen_length=config.gen_length, block_length=config.block_length,
                   k_soft=config.k_soft or 3, alpha=config.alpha if config.alpha is not None else 0.7,
                   temperature=config.temperature, threshold=config.threshold, remasking=config.remasking,
                   top_k=config.top_k, top_p=config.top_p, stdd=config.stdd, batch_size=args.batch_size,
                   progress=args.progress)
    if rank != 0:
        return 0
    res = {"model": str(args.model), **res, "command": _common.command_line(), "env": _common.environment(device)}
    tps = res["tokens_per_s"]
    print(f"{task.name} {config.mode} cache={res['cache']} steps={res['steps']}: accuracy {res['accuracy']:.3f} "
          f"[{res['ci95'][0]:.3f}, {res['ci95'][1]:.3f}] ({res['correct']}/{res['n']}), "
          f"{tps:.0f} tokens/s on {world} process{'es' if world > 1 else ''}")
    if args.json:
        print(f"wrote {_common.write_json(args.json, res)}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    from .. import cli
    return cli.standalone(sys.modules[__name__], "evofast eval", argv)


if __name__ == "__main__":
    sys.exit(main())

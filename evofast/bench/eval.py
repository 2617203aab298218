"""`evofast bench eval`: evaluation throughput (examples/s), evofast against the authors' evaluation loop.

The authors evaluate one prompt at a time with `generate_soft_token` (no cache,
float64 post-processing of every row at every step, evaluate.py's batch size 1).
This times the same set of prompts, greedy, k_soft 3, alpha 0.7, through

  authors         their loop, re-stated (`baselines.authors_generate`), batch 1
  evofast-b1      evofast's evaluation loop (`evofast.evaluation.decode_examples`:
                  what `evofast eval` runs) at batch 1, no cache: the same tokens
  evofast-bN      batch N (prompts sorted by length, left-padded), no cache
  evofast-bN-dual batch N with the dual KV cache and threshold decoding (--threshold)

and reports examples/s (examples over the decoding time, device-synchronised),
the speedup over the authors, and the tokens against the authors' (`check`: equal
at batch 1; batched and cached rows give the share of generated tokens equal to
evofast-b1's). The slow providers decode only the first --slow-examples prompts
(their rate does not depend on how many).

Model: a random-weight evofast LLaDA of the shape (prompts of random lengths), or
with --model DIR a trained checkpoint and its task's test split (train-base; the
accuracy of every provider is reported too: what the cache and threshold cost).

Shapes: tiny (V 1000, seconds), cpu (d_model 64, 2 layers, V 126464, gen 128),
llada-8b (LLaDA-8B layers, bf16, prompts of 100..300 tokens, gen 256, block 32,
steps 128, batch 32: the GPU goals are >= 1.3x the authors at batch 1 with equal
tokens, >= 10x batched, >= 30x with the dual cache and a threshold).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .. import baselines
from ..devices import pick_device, synchronize
from ..evaluation import EvalConfig, decode_examples
from . import _common
from .generate import DTYPES, build_model

HELP = "evaluation throughput (examples/s): evofast's eval loop at batch 1 / N / N + dual cache vs the authors'"
K_SOFT, ALPHA = 3, 0.7


@dataclass(frozen=True)
class EvalShape:
    name: str
    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    mlp: Optional[int]
    prompt_lengths: tuple        # (shortest, longest) random prompt
    gen: int
    block: int
    steps: int
    examples: int
    batch: int
    slow_examples: int           # prompts the authors' loop and evofast-b1 decode

    @property
    def mask_id(self) -> int:
        return 126336 if self.vocab > 126336 else self.vocab - 1


SHAPES = {
    "tiny": EvalShape("tiny", 1000, 32, 2, 4, None, (6, 20), 32, 8, 16, 16, 8, 4),
    "cpu": EvalShape("cpu", 126464, 64, 2, 4, None, (32, 96), 128, 32, 64, 32, 16, 4),
    "llada-8b": EvalShape("llada-8b", 126464, 4096, 32, 32, 12288, (100, 300), 256, 32, 128, 64, 32, 2),
}


class _Prompts:
    """The evaluation loop's view of random prompts: a task whose examples are token ids and a
    tokenizer that "decodes" to the ids themselves (so tokens can be compared)."""

    name = "random prompts"

    def encode(self, ex, tok):
        return ex

    def prompt_text(self, ex, tok):
        return ""

    def extract(self, ex, text):
        return None

    def check(self, ex, text):
        return False

    @staticmethod
    def batch_decode(rows, skip_special_tokens=False):
        return [" ".join(map(str, r)) for r in rows]


def _random_prompts(shape: EvalShape, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    lo, hi = shape.prompt_lengths
    lengths = torch.randint(lo, hi + 1, (shape.examples,), generator=g).tolist()
    return [torch.randint(0, shape.mask_id, (n,), generator=g).tolist() for n in lengths]


def _authors(model, task, tok, examples, config: EvalConfig, mask_id: int, device) -> list:
    """Records of the authors' batch-1 loop (one prompt after another)."""
    from ..evaluation.runner import prompt_ids_of
    records = []
    for i, ex in enumerate(examples):
        ids = torch.tensor([prompt_ids_of(task, tok, ex)], device=device)
        synchronize(device)
        t0 = time.perf_counter()
        out = baselines.authors_generate(model, ids, gen_length=config.gen_length, block_length=config.block_length,
                                         steps=config.steps, mask_id=mask_id, k_soft=K_SOFT, alpha=ALPHA)
        synchronize(device)
        text = tok.batch_decode(out[:, ids.shape[1]:].tolist(), skip_special_tokens=False)[0]
        records.append({"index": i, "generation": text, "correct": bool(task.check(ex, text)),
                        "seconds": time.perf_counter() - t0})
    return records


def _row(name: str, records: list, batch: int, cache: str, threshold) -> dict:
    seconds = sum(r["seconds"] for r in records)
    n = len(records)
    return {"provider": name, "batch": batch, "cache": cache, "threshold": threshold, "examples": n,
            "seconds": seconds, "examples_per_s": n / seconds if seconds > 0 else None,
            "accuracy": sum(r["correct"] for r in records) / n if n else None}


def _same_share(a: list, b: list) -> float:
    """Share of equal generated tokens (texts are space-separated ids or text) over common examples."""
    by = {r["index"]: r["generation"] for r in b}
    pairs = [(r["generation"], by[r["index"]]) for r in a if r["index"] in by]
    same = total = 0
    for x, y in pairs:
        xs, ys = x.split(" "), y.split(" ")
        same += sum(p == q for p, q in zip(xs, ys))
        total += max(len(xs), len(ys))
    return same / total if total else 0.0


COLUMNS = [("provider", "provider"), ("batch", "B"), ("cache", "cache"), ("threshold", "threshold"),
           ("examples", "examples"), ("seconds", "seconds"), ("examples_per_s", "examples/s"),
           ("speedup", "speedup"), ("accuracy", "accuracy"), ("check", "check")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=list(SHAPES), default=None,
                        help="tiny | cpu | llada-8b (default: llada-8b on a GPU, cpu on the CPU)")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="a trained checkpoint (train-base) and its task instead of random weights")
    parser.add_argument("--examples", type=int, default=None, help="prompts (default: the shape's)")
    parser.add_argument("--slow-examples", type=int, default=None,
                        help="prompts for the authors' loop and batch 1 (default: the shape's)")
    parser.add_argument("--batch", type=int, default=None, help="the batched providers' batch size")
    parser.add_argument("--threshold", type=float, default=0.9, help="threshold of the dual-cache provider (0.9)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--json", metavar="FILE", default=None, help="write the environment and rows here")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, metavar="N")


def _setup(args, device, dtype):
    """(model, tokenizer-like, task-like, examples, shape, mask id)."""
    shape = SHAPES[args.shape or ("llada-8b" if device.type == "cuda" else "cpu")]
    if args.model is None:
        model = build_model(shape, device, dtype)
        prompts = _random_prompts(shape, args.seed)
        return model, _Prompts(), _Prompts(), prompts, shape, shape.mask_id
    from ..evaluation import load_model_and_task
    from ..models.registry import get_adapter
    model, tok, task = load_model_and_task(args.model, None, device, dtype)
    n = args.examples or shape.examples
    shape = EvalShape(f"model {args.model}", 0, 0, 0, 0, None, (0, 0), task.gen_length,
                      min(task.block_length, task.gen_length), task.gen_length // 2, n, shape.batch,
                      shape.slow_examples)
    return model, tok, task, task.test_set(n, args.seed), shape, get_adapter(model).mask_id


def run(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, tok, task, examples, shape, mask_id = _setup(args, device, dtype)
    examples = examples[:args.examples or len(examples)]
    slow = examples[:args.slow_examples or shape.slow_examples]
    batch = args.batch or shape.batch
    base = EvalConfig(mode="evotoken", gen_length=shape.gen, steps=shape.steps, block_length=shape.block,
                      k_soft=K_SOFT, alpha=ALPHA)
    dual = EvalConfig(**{**base.__dict__, "cache": "dual", "threshold": args.threshold})
    env = _common.environment(device)
    print(f"evofast bench eval: {env['device']} ({device}), torch {env['torch']}, commit "
          f"{(env['commit'] or 'none')[:12]}; shape {shape.name}: {len(examples)} prompts, gen {shape.gen}, "
          f"block {shape.block}, steps {shape.steps}, greedy, k_soft {K_SOFT}, alpha {ALPHA}", flush=True)
    runs = {}
    runs["authors"] = _authors(model, task, tok, slow, base, mask_id, device)
    plan = [("evofast-b1", slow, 1, base), (f"evofast-b{batch}", examples, batch, base),
            (f"evofast-b{batch}-dual", examples, batch, dual)]
    for name, exs, b, config in plan:
        decode_examples(model, tok, task, exs[:min(len(exs), b)], config, batch_size=b)      # warm-up
        runs[name] = decode_examples(model, tok, task, exs, config, batch_size=b, seed=args.seed)
    rows = [_row("authors", runs["authors"], 1, "none", None)]
    rows += [_row(name, runs[name], b, config.cache or "none", config.threshold) for name, _, b, config in plan]
    ref = rows[0]["examples_per_s"]
    for r in rows:
        r["speedup"] = r["examples_per_s"] / ref if ref and r["examples_per_s"] else None
    rows[0]["check"] = "reference"
    same = _same_share(runs["evofast-b1"], runs["authors"])
    rows[1]["check"] = "ok" if same == 1.0 else f"DIFF ({100 * same:.1f}% same)"
    for r, (name, *_rest) in zip(rows[2:], plan[1:]):
        r["check"] = f"{100 * _same_share(runs[name], runs['evofast-b1']):.0f}% same as b1"
    print()
    print(_common.format_table(rows, COLUMNS))
    if args.json:
        path = _common.write_json(args.json, {
            "benchmark": "evofast.bench.eval", "schema_version": _common.SCHEMA_VERSION, "env": env,
            "config": {"shape": shape.name, "examples": len(examples), "slow_examples": len(slow), "batch": batch,
                       "gen": shape.gen, "block": shape.block, "steps": shape.steps, "threshold": args.threshold,
                       "dtype": str(dtype).replace("torch.", ""), "model": args.model, "k_soft": K_SOFT,
                       "alpha": ALPHA},
            "rows": rows})
        print(f"\nwrote {path}")
    return 0


def main(argv=None) -> int:
    from .. import cli
    return cli.standalone(sys.modules[__name__], "evofast bench eval", argv)


if __name__ == "__main__":
    sys.exit(main())

"""`evofast showcase`: the small model trained here answers held-out problems of its task.

    evofast showcase [--model DIR] [--problems 5] [--trace evotoken-trace.html]

The model shipped in evofast (`evofast/data/models/addition`) was trained by the quality
study's command (`evofast bench quality --export-model`): masked-diffusion pretraining on
2-digit addition with worked steps ("13+08=" is answered "3+8+0=11,1+0+1=02;21"), then
a CTS fine-tune (LoRA on q / k / v, merged). This decodes a few held-out problems
with the decoding the study measured (EvoToken), prints each answer and whether it is
right, and the accuracy the study measured on its held-out test problems. --trace writes
the page of that decoding: every position going from mask to soft (its top-k and
weights) to decoded, and where a decoded token was revised. --model takes any
checkpoint directory with a task file (what `evofast train-base` writes).
"""
from __future__ import annotations

import argparse

from .common import CommandError, check_output_file, command, resolve_device

HELP = "the small model trained here answers held-out problems with EvoToken decoding"
OPTIONS = ("device", "threads")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="DIR", help="a model directory (default: the shipped one)")
    parser.add_argument("--problems", type=int, default=5, help="held-out problems to answer (default 5)")
    parser.add_argument("--seed", type=int, default=1, help="which held-out problems (default 1)")
    parser.add_argument("--trace", metavar="FILE.html", default=None, help="write the trace page of their decoding")


def _problem(ex) -> str:
    if ex.meta:                                        # Countdown: the numbers and the target
        return f"Countdown: {' '.join(map(str, ex.meta))} -> {ex.answer}"
    return ex.prompt


@command("evofast showcase")
def run(args: argparse.Namespace) -> int:
    import torch

    from ..study.showcase import load, setting_of, solve

    if args.problems < 1:
        raise CommandError(f"--problems: must be >= 1, got {args.problems}")
    trace_path = check_output_file(args.trace, "--trace")
    device = resolve_device(args.device)
    if args.threads is None and device.type == "cpu":
        torch.set_num_threads(1)                      # a model this small: more threads only add synchronisation
    model, tok, task, card = load(args.model, device)
    setting = setting_of(card)
    examples = task.test_set(args.problems, seed=args.seed)
    k_soft = (card or {}).get("decoding", {}).get("k_soft", 3)
    answers, right, trace = solve(model, tok, task, examples, setting, k_soft=k_soft, trace=trace_path is not None)
    n_params = sum(p.numel() for p in model.parameters())
    how = f"{setting.mode}, {setting.tokens_per_step} tokens per step"
    if setting.alpha is not None:
        how += f", alpha {setting.alpha:g}"
    print(f"evofast showcase: a {n_params / 1e6:.2f} M-parameter model trained here on {task!r} ({how})")
    for ex, answer, ok in zip(examples, answers, right):
        print(f"  {_problem(ex):<26} answer: {answer:<24} {'correct' if ok else 'wrong'}")
    line = f"{sum(right)} of {len(right)} right here"
    if card:
        line += (f"; measured accuracy of this decoding: {100 * card['accuracy']:.1f}% on {card['n']} held-out "
                 f"test problems (the quality study)")
    print(line)
    if trace is not None:
        from ..trace import to_html
        to_html(trace, tok, trace_path, title=f"evofast showcase: {task!r} ({how})")
        print(f"trace: wrote {trace_path} (open it in a browser: every position from mask to soft to decoded, "
              "and its revisions)")
    return 0

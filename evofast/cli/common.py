"""What every `evofast` command shares: the run options, one error convention, path checks.

A command module has `HELP`, `OPTIONS` (which of the shared run options it takes:
"device", "seed", "threads", "dtype", "progress"), `add_arguments(parser)` and
`run(args) -> int`. `command(run)` wraps `run`: it applies --threads (and restores
the caller's thread count afterwards: tests and notebooks call commands
in-process), and turns the errors a user can fix (ValueError, OSError,
ImportError, NotImplementedError) into one line `evofast <cmd>: error: ...` and
exit status 2, the status argparse gives a bad argument. Library errors name the
Python argument; `to_flags` adds the flag and rewrites Python advice in flags.
"""
from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path
from typing import Iterable, Optional

__all__ = ["OPTION_NAMES", "run_options", "command", "CommandError", "resolve_device", "resolve_dtype",
           "check_output_file", "check_output_dir", "to_flags", "keeps_torch_threads", "add_policy_arguments",
           "policy_kwargs", "POLICY_FLAGS"]

OPTION_NAMES = ("device", "seed", "threads", "dtype", "progress")
DTYPES = ("auto", "fp32", "bf16", "fp16")


class CommandError(Exception):
    """A problem with the command's arguments or inputs: printed as one `error:` line, exit status 2."""


def run_options(names: Iterable[str]) -> argparse.ArgumentParser:
    """A parent parser with the shared run options `names` (a subset of OPTION_NAMES)."""
    names = tuple(names)
    unknown = set(names) - set(OPTION_NAMES)
    if unknown:
        raise ValueError(f"OPTIONS: unknown shared options {sorted(unknown)}; choose from {OPTION_NAMES}")
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("run options")
    if "device" in names:
        g.add_argument("--device", default="auto",
                       help="cpu | cuda | cuda:N (default: a GPU when there is one; under torchrun cuda:LOCAL_RANK)")
    if "dtype" in names:
        g.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bf16 on a GPU, fp32 on the CPU")
    if "seed" in names:
        g.add_argument("--seed", type=int, default=0, help="random seed (0)")
    if "threads" in names:
        g.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    if "progress" in names:
        g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                       help="progress bars (--no-progress: none)")
    return p


def keeps_torch_threads(run):
    """Wraps a command's `run`: whatever `torch.set_num_threads` it calls, the caller's thread
    count is restored afterwards."""
    @functools.wraps(run)
    def wrapped(args):
        import torch

        threads = torch.get_num_threads()
        try:
            return run(args)
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
    return wrapped


def command(prog: str, flags: Optional[dict] = None):
    """Decorator for a command's `run(args)`: --threads applied, fixable errors as one `error:` line
    and exit status 2 (see the module docstring); `flags` maps the library's argument names to
    this command's flags for the message."""
    def wrap(run):
        @keeps_torch_threads
        @functools.wraps(run)
        def wrapped(args):
            import torch

            threads = getattr(args, "threads", None)
            try:
                if threads is not None:
                    if threads < 1:
                        raise CommandError(f"--threads: must be >= 1, got {threads}")
                    torch.set_num_threads(threads)
                return run(args)
            except (CommandError, ValueError, OSError, ImportError, NotImplementedError) as e:
                print(f"{prog}: error: {to_flags(str(e), flags or {})}", file=sys.stderr)
                return 2
        return wrapped
    return wrap


# ------------------------------------------------------------------ decoding: what a step decodes
POLICIES = ("schedule", "threshold", "stdd")
# STDD's parameters: (flag, type, help); the defaults are evofast.ops.STDD's
STDD_FLAGS = {"tau": ("--stdd-tau", float, "base threshold"),
              "lam_t": ("--stdd-lam-t", float, "weight of the temporal variation (confidence still moving)"),
              "lam_s": ("--stdd-lam-s", float, "weight of the spatial deviation (disagreeing with neighbours)"),
              "tau_min": ("--stdd-tau-min", float, "lowest threshold"),
              "tau_max": ("--stdd-tau-max", float, "highest threshold"),
              "window": ("--stdd-window", int, "confidences per position the variation looks at"),
              "radius": ("--stdd-radius", int, "neighbours on each side the deviation compares with")}
# the library's argument names -> the flags below (merge into a command's FLAGS)
POLICY_FLAGS = {"remasking": "--remasking", "top_k": "--top-k", "top_p": "--top-p", "threshold": "--threshold",
                "policy": "--policy", **{name: flag for name, (flag, _, _) in STDD_FLAGS.items()}}


def add_policy_arguments(parser) -> None:
    """--remasking, --top-k, --top-p, --policy and its parameters (--threshold, --stdd-*)."""
    from ..decode.config import REMASKING
    from ..ops import STDD

    g = parser.add_argument_group("what a step decodes")
    g.add_argument("--remasking", choices=REMASKING, default="low_confidence",
                   help="the confidence that ranks positions: the chosen token's probability (default), random, "
                        "top-1 minus top-2 probability, or the negative entropy (<= 0)")
    g.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="with --temperature > 0: sample among the K most likely tokens")
    g.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="with --temperature > 0: sample within the smallest set of probability >= P")
    g.add_argument("--policy", choices=POLICIES, default=None,
                   help="schedule: each block's masks split evenly over its steps; threshold: every position at "
                        "least --threshold confident; stdd: per-position thresholds that rise while a position's "
                        "confidence still moves or disagrees with its neighbours (--stdd-*). Default: threshold "
                        "when --threshold is given, else schedule")
    g.add_argument("--threshold", type=float, default=None, metavar="C",
                   help="the confidence --policy threshold needs (implies it)")
    defaults = STDD()
    for name, (flag, kind, text) in STDD_FLAGS.items():
        g.add_argument(flag, dest=f"stdd_{name}", type=kind, default=None, metavar="X" if kind is float else "N",
                       help=f"--policy stdd: {text} ({getattr(defaults, name):g})")


def policy_kwargs(args) -> dict:
    """`generate`'s remasking / top_k / top_p / threshold / policy from add_policy_arguments' flags;
    CommandError for flags that do not fit together, ValueError (naming the argument) from STDD."""
    policy = args.policy or ("threshold" if args.threshold is not None else "schedule")
    given = {name: getattr(args, f"stdd_{name}") for name in STDD_FLAGS}
    given = {name: v for name, v in given.items() if v is not None}
    if given and policy != "stdd":
        raise CommandError(f"{STDD_FLAGS[next(iter(given))][0]}: only with --policy stdd (got --policy {policy})")
    if policy == "threshold" and args.threshold is None:
        raise CommandError("--policy threshold needs --threshold C")
    if policy != "threshold" and args.threshold is not None:
        raise CommandError(f"--threshold: only with --policy threshold (got --policy {policy}; "
                           "--stdd-tau is STDD's base threshold)")
    kw = dict(remasking=args.remasking, top_k=args.top_k, top_p=args.top_p, threshold=args.threshold)
    if policy == "stdd":
        from ..ops import STDD
        kw["policy"] = STDD(**given)
    return kw


# the library's advice in Python terms -> the command line's
_ADVICE = [
    (re.compile(r"use cache=None"), "use --cache none"),
    (re.compile(r"pass evofast\.patch\(model, mask_id=[^)]*\)"), "pass --mask-id ID"),
]


def to_flags(message: str, flags: dict) -> str:
    """A library error in the command line's terms: a leading `name:` names its flag too
    (`k_soft:` -> `--k-soft (k_soft):`), and Python advice becomes flag advice."""
    head, sep, rest = message.partition(":")
    if sep and head in flags:
        message = f"{flags[head]} ({head}):{rest}"
    for pattern, text in _ADVICE:
        message = pattern.sub(text, message)
    return message


def resolve_device(name: Optional[str]):
    """--device: "auto" picks cuda:LOCAL_RANK under torchrun, a GPU when there is one, else the CPU."""
    import os

    import torch

    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CommandError(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: no CUDA device is available here")
    return device


def resolve_dtype(name: str, device):
    import torch

    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    return names.get(name) or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def check_output_file(path, flag: str) -> Optional[Path]:
    """An output file the command will write: not a directory, its folder creatable. Checked
    before any work (the folder is made)."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise CommandError(f"{flag}: {p} is a directory; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise CommandError(f"{flag}: {parent} is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CommandError(f"{flag}: cannot create {parent}: {e.strerror}") from None
    return p


def check_output_dir(path, flag: str) -> Optional[Path]:
    """An output directory: not an existing file (whether it may be non-empty is the command's rule)."""
    if path is None:
        return None
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CommandError(f"{flag}: {p} exists and is not a directory")
    return p

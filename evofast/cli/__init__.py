"""The `evofast` command line.

    evofast bench ops [--shape tiny|cpu|llada-8b] [--json FILE] [--backends ...] [--repeat N]

Commands and benchmarks are registered in the two tables below: a command is a
module with `HELP`, `add_arguments(parser)` and `run(args) -> int`; so is a
benchmark (under `evofast bench`). `generate`, `train-cts`, `bench generate` and
`bench cts` plug in here by adding a row. Modules are imported when the parser is
built (each registers its own options), not at `import evofast`.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .common import keeps_torch_threads  # noqa: F401  (the commands' wrapper, importable from here)
from .common import run_options

# benchmark name -> module (run as `evofast bench <name>`)
BENCHMARKS = {
    "ops": "evofast.bench.ops",
    "generate": "evofast.bench.generate",
    "cts": "evofast.bench.cts",
    "quality": "evofast.bench.quality",
    "eval": "evofast.bench.eval",
    "policies": "evofast.bench.policies",
}

# top-level command -> module (besides `bench`)
COMMANDS: dict[str, str] = {
    "generate": "evofast.cli.generate",
    "train-cts": "evofast.cli.train_cts",
    "train-base": "evofast.cli.train_base",
    "eval": "evofast.cli.eval",
    "demo": "evofast.cli.demo",
    "showcase": "evofast.cli.showcase",
}


def _add_module(subparsers, name: str, module_name: str):
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - one broken command must not take the others down
        problem = f"{type(err).__name__}: {err}"
        p = subparsers.add_parser(name, help=f"(unavailable: {problem})", add_help=False)
        p.set_defaults(_run=lambda args: _unavailable(name, module_name, problem), _any_args=True)
        return p
    p = subparsers.add_parser(name, help=module.HELP, description=module.__doc__,
                              parents=[run_options(getattr(module, "OPTIONS", ()))],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    p.set_defaults(_run=module.run)
    return p


def _unavailable(name: str, module_name: str, problem: str) -> int:
    print(f"evofast: '{name}' is unavailable: importing {module_name} failed ({problem})", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evofast", description="Fused kernels for EvoToken soft-token decoding.")
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"evofast {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    bench = commands.add_parser("bench", help="benchmarks: " + ", ".join(BENCHMARKS),
                                description="Time evofast against its baselines; a table on stdout, "
                                            "optionally JSON with device, versions, commit and time.")
    which = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    which.required = True
    for name, module_name in BENCHMARKS.items():
        _add_module(which, name, module_name)
    for name, module_name in COMMANDS.items():
        _add_module(commands, name, module_name)
    return parser


def quiet_deepspeed_on_cpu() -> None:
    """DeepSpeed, when installed, is imported by accelerate and transformers; on a machine without a
    GPU it then prints a warning line on stdout, where a command's output goes, unless its
    accelerator is named: name the CPU there (a value the user set is kept)."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


#: option dests naming a file a command writes, and their flags: checked before the command runs
OUTPUT_FILES = {"json": "--json", "plot": "--plot", "trace": "--trace"}


def _run_checked(run, args) -> int:
    """`run(args)` once the output files named on the command line can be written (not a directory,
    the folder creatable): a bad path fails before any work, not after it."""
    from .common import CommandError, check_output_file

    try:
        for dest, flag in OUTPUT_FILES.items():
            check_output_file(getattr(args, dest, None), flag)
    except CommandError as e:
        print(f"evofast: error: {e}", file=sys.stderr)
        return 2
    return int(run(args) or 0)


def standalone(module, prog: str, argv=None) -> int:
    """Run one command module on its own (its `main`, e.g. from a script under benchmarks/)."""
    parser = argparse.ArgumentParser(prog=prog, description=module.__doc__,
                                     parents=[run_options(getattr(module, "OPTIONS", ()))],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    quiet_deepspeed_on_cpu()
    return _run_checked(module.run, parser.parse_args(argv))


def main(argv=None) -> int:
    quiet_deepspeed_on_cpu()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_any_args", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return _run_checked(args._run, args)


if __name__ == "__main__":
    sys.exit(main())

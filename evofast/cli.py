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
import functools
import importlib
import sys

# benchmark name -> module (run as `evofast bench <name>`)
BENCHMARKS = {
    "ops": "evofast.bench.ops",
    "generate": "evofast.bench.generate",
    "cts": "evofast.bench.cts",
    "quality": "evofast.bench.quality",
    "eval": "evofast.bench.eval",
}

# top-level command -> module (besides `bench`)
COMMANDS: dict[str, str] = {
    "generate": "evofast.cli_generate",
    "train-cts": "evofast.cli_train_cts",
    "train-base": "evofast.cli_train_base",
    "eval": "evofast.cli_eval",
    "demo": "evofast.cli_demo",
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
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    p.set_defaults(_run=module.run)
    return p


def _unavailable(name: str, module_name: str, problem: str) -> int:
    print(f"evofast: '{name}' is unavailable: importing {module_name} failed ({problem})", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evofast", description="Fused kernels for EvoToken soft-token decoding.")
    from . import __version__
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


def keeps_torch_threads(run):
    """Wraps a command's `run`: whatever `torch.set_num_threads` it calls (a --threads option),
    the caller's thread count is restored afterwards (tests and notebooks call commands in-process)."""
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


def standalone(module, prog: str, argv=None) -> int:
    """Run one command module on its own (its `main`, e.g. from a script under benchmarks/)."""
    parser = argparse.ArgumentParser(prog=prog, description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(argv)) or 0)


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_any_args", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""One CTS training step, evofast's fused cts_loss vs the eager implementation: `evofast bench cts` as a script.

    python benchmarks/bench_cts.py [--shape tiny|cpu|llada-8b] [--json FILE]

The code lives in `evofast/bench/cts.py` (so the installed `evofast` command has
it too); this file only runs it from a checkout.
"""
import sys
from pathlib import Path

try:
    import evofast  # noqa: F401
except ImportError:  # a checkout that was not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evofast.bench.cts import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

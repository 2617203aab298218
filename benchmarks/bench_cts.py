#!/usr/bin/env python
"""One CTS training step, evofast's fused cts_loss vs the eager implementation: `evofast bench cts` as a script.

    python benchmarks/bench_cts.py [--shape tiny|cpu|llada-8b] [--json FILE]

The code lives in `evofast/bench/cts.py` (so the installed `evofast` command has
it too); this file only runs it from a checkout.
"""
import sys

import _checkout  # noqa: F401  (evofast from this checkout when not installed)
from evofast.bench.cts import main

if __name__ == "__main__":
    sys.exit(main())

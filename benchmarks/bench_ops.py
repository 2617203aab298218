#!/usr/bin/env python
"""Latency of evo_step / soft_embed per provider: `evofast bench ops` as a script.

    python benchmarks/bench_ops.py [--shape tiny|cpu|llada-8b] [--json FILE] [--backends ...]

The code lives in `evofast/bench/ops.py` (so the installed `evofast` command has
it too); this file only runs it from a checkout.
"""
import sys

import _checkout  # noqa: F401  (evofast from this checkout when not installed)
from evofast.bench.ops import main

if __name__ == "__main__":
    sys.exit(main())

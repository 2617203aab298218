#!/usr/bin/env python
"""Latency of evo_step / soft_embed per provider: `evofast bench ops` as a script.

    python benchmarks/bench_ops.py [--shape tiny|cpu|llada-8b] [--json FILE] [--backends ...]

The code lives in `evofast/bench/ops.py` (so the installed `evofast` command has
it too); this file only runs it from a checkout.
"""
import sys
from pathlib import Path

try:
    import evofast  # noqa: F401
except ImportError:  # a checkout that was not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evofast.bench.ops import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""End-to-end generation, evofast.generate vs the authors' loop: `evofast bench generate` as a script.

    python benchmarks/bench_generate.py [--shape tiny|cpu|llada-8b] [--json FILE] [--backends ...]

The code lives in `evofast/bench/generate.py` (so the installed `evofast` command has
it too); this file only runs it from a checkout.
"""
import sys
from pathlib import Path

try:
    import evofast  # noqa: F401
except ImportError:  # a checkout that was not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evofast.bench.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

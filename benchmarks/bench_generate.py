#!/usr/bin/env python
"""End-to-end generation, evofast.generate vs the authors' loop: `evofast bench generate` as a script.

    python benchmarks/bench_generate.py [--shape tiny|cpu|llada-8b] [--json FILE] [--backends ...]

The code lives in `evofast/bench/generate.py` (so the installed `evofast` command has
it too); this file only runs it from a checkout.
"""
import sys

import _checkout  # noqa: F401  (evofast from this checkout when not installed)
from evofast.bench.generate import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The trained-model quality study: `evofast bench quality` as a script.

    python benchmarks/bench_quality.py --json benchmarks/results/quality-cpu-2core.json \
        --plot benchmarks/results/quality-cpu-2core.png

The code lives in `evofast/bench/quality.py` (so the installed `evofast` command has
it too); this file only runs it from a checkout.
"""
import sys

import _checkout  # noqa: F401  (evofast from this checkout when not installed)
from evofast.bench.quality import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The trained-model quality study: `evofast bench quality` as a script.

    python benchmarks/bench_quality.py --json benchmarks/results/quality-cpu-2core.json \
        --plot benchmarks/results/quality-cpu-2core.png

The code lives in `evofast/bench/quality.py` (so the installed `evofast` command has
it too); this file only runs it from a checkout.
"""
import sys
from pathlib import Path

try:
    import evofast  # noqa: F401
except ImportError:  # a checkout that was not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evofast.bench.quality import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

"""Makes `import evofast` work from a checkout that was not installed (the benchmark
scripts here import it first: `import _checkout  # noqa: F401`)."""
import sys
from pathlib import Path

try:
    import evofast  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

"""`python -m evofast ...`: the same as the `evofast` console script."""
import sys

from .cli import main

sys.exit(main())

"""`python -m evofast.cli ...`: the same as the `evofast` console script."""
import sys

from . import main

sys.exit(main())

"""`python -m bench ...`: runs main() of bench/harness.py (see bench/README.md)."""
import sys

from .harness import main

sys.exit(main())

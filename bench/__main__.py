"""`python -m bench ...`: runs bench.harness.main (see bench/README.md)."""
import sys

from bench.harness import main

sys.exit(main())

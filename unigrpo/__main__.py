import sys

from unigrpo.cli import main

sys.exit(main())

"""`python -m ovjax <verb> ...`: see ovjax/cli.py."""

import sys

from ovjax.cli import main

if __name__ == "__main__":  # guard kept: spawned worker processes re-import this module
    sys.exit(main())

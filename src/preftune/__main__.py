"""`python -m preftune` behaves exactly like the `preftune` command (launchers rely on it)."""

import sys

from preftune.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m tpfuse``: the command line lives in ``tpfuse/cli``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

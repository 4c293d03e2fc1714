"""``python -m train.bench ...``, the same as ``python -m train bench ...``."""

import sys

from train.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m train.bench ...``, the same as ``python -m train bench ...``."""

import sys

from train.malloc import reexec_with_chosen_malloc

if __name__ == "__main__":
    reexec_with_chosen_malloc()  # before JAX is imported (train/malloc.py)
    from train.bench.cli import main

    sys.exit(main())

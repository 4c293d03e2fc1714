"""``python -m train SUBCOMMAND ...`` (same as the ``finch-train`` console script)."""

import sys

from train.malloc import reexec_with_chosen_malloc

if __name__ == "__main__":
    # First, before JAX is imported: the step's temporaries need an allocator that keeps freed memory (train/malloc.py).
    reexec_with_chosen_malloc()
    from train.cli import main

    sys.exit(main())

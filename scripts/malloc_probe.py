#!/usr/bin/env python
"""Time the bench's JAX train step and count the page faults and kernel time it causes, under whichever malloc the
process was started with (this script does not choose one; ``finch-train`` does: train/malloc.py). The step's
compiled temporaries (5.95 GB for SmolLM2-135M at 4 x 512 tokens, fp32) are one allocation per step; glibc serves
it with a fresh mmap, so every step faults it in page by page. Compare:

    .venv/bin/python scripts/malloc_probe.py
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 .venv/bin/python scripts/malloc_probe.py
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 .venv/bin/python scripts/malloc_probe.py

(Debian: ``apt-get install libgoogle-perftools4 libjemalloc2``.)
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="timed steps (the first one includes warm-up)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--override", action="append", default=[], help="model config key=value, as bench's")
    args = parser.parse_args()
    from train.topology import quiet_libtpu_without_tpus

    quiet_libtpu_without_tpus()
    from train.bench.jax_runner import build_jax_runner
    from train.bench.spec import BenchSpec
    from train.malloc import describe

    preload = f"{describe()} (LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r})"
    runner = build_jax_runner(
        "probe", BenchSpec(overrides=tuple(args.override)), args.dtype, "finch_adamw", mesh_text="data=-1"
    )
    print(f"malloc: {preload}; compile {runner.compile_s:.1f} s", flush=True)
    for i in range(args.steps):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        runner.step()
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        print(
            f"step {i}: {wall:.2f} s wall, {after.ru_minflt - before.ru_minflt} minor page faults, "
            f"user {after.ru_utime - before.ru_utime:.1f} s, system {after.ru_stime - before.ru_stime:.1f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

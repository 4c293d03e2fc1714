#!/usr/bin/env python
"""The E1 grid of docs/results.md: FINCH where it acts (facts, 60 steps) against a front of every checkpoint.

Resumable: finished runs are skipped (their records stay in OUT/runs), so start it again after any interruption.
Runs seed by seed (seed 0 of every arm, then seed 1, ...), under `nice -n 19`, and prints how far it got with an ETA
before it starts and after every run. Each pass ends by rewriting OUT/results.md, results.json and the plots from
the runs of the full grid (only once all of them exist; before that use `--report`).

    scripts/lab_e1_grid.py                 # run or resume (OUT=runs/e1); e.g. nohup ... > runs/e1/grid.log &
    touch runs/e1/STOP; kill -TERM <pid>   # stop after the current step (a SIGTERM alone resumes after 30 s)
    scripts/lab_e1_grid.py --status        # how far it got, loads no model
    scripts/lab_e1_grid.py --report        # tables and plots from the finished runs only, trains nothing
    scripts/lab_e1_grid.py --report --seeds 0,1,2   # the same for seeds 0-2 only (the seeds with full fronts)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from train.lab.config import CompareConfig  # noqa: E402
from train.lab.evalsets import EvalConfig  # noqa: E402

SWEEP = (2.5e-5, 3.5e-5, 5e-5, 7e-5, 1e-4, 1.4e-4)  # constant rates of the front, dense where FINCH's mean lr lands
SEEDS = (0, 1, 2, 3, 4)


def config(methods: tuple[str, ...], seeds: tuple[int, ...] = SEEDS, cache_dir: str = "") -> CompareConfig:
    """The E1 comparison (the pre-registered design in docs/results.md) with the given methods and seeds."""
    return CompareConfig(
        model="gguf:smollm2",
        dtype="float32",
        scan_layers=True,
        task="facts",
        retain="builtin",
        facts_entities=4,
        methods=methods,
        steps=60,
        seeds=seeds,
        max_learning_rate=1e-4,
        batch_size=4,
        seq_len=48,
        weight_decay=0.0,
        eval_every=12,
        bootstrap=2000,
        probe_windows=4,
        cache_dir=cache_dir,
        train_overrides=("progress=false",),
        eval=EvalConfig(seq_len=64, batch_size=16, retain_sequences=64, quiz_items=256, seed=0),
    )


FINCH = "finch:probe=1"  # L* = 1 (base_learning_rate = max_learning_rate), EMA 0.9; the per-step probe on seed 0


def full_methods(five_seed_rates: list[float]) -> tuple[str, ...]:
    others = [lr for lr in SWEEP if lr not in five_seed_rates]
    return (
        FINCH,
        "sweep:lrs=" + "/".join(f"{lr:g}" for lr in five_seed_rates),
        "sweep:lrs=" + "/".join(f"{lr:g}" for lr in others) + ",seeds=3",
        "finch:lstar=0.25,seeds=3",
        "finch:ema=0,seeds=3",
        "warmup_const:frac=0.3,seeds=3",
        "finch:direction=sgd,max_learning_rate=0.1,seeds=1,probe=1",
        "warmup_matched",
    )


def choose_rates(out: Path, cache_dir: str) -> list[float]:
    """The two sweep rates nearest (in log lr) to the mean lr of `finch` seed 0, which runs first if needed; the
    choice is stored in OUT/choice.json and never changes afterwards."""
    path = out / "choice.json"
    if path.is_file():
        return json.loads(path.read_text())["five_seed_rates"]
    from train.lab.runner import run_compare

    run_compare(config((FINCH,), (0,), cache_dir), out)
    record = json.loads((out / "runs" / "finch__seed0.json").read_text())
    mean_lr = sum(record["lr_trace"]) / len(record["lr_trace"])
    rates = sorted(sorted(SWEEP, key=lambda lr: abs(math.log(lr / mean_lr)))[:2])
    path.write_text(json.dumps({"finch_seed0_mean_lr": mean_lr, "five_seed_rates": rates}, indent=1))
    print(f"[e1] finch seed 0 mean lr {mean_lr:.3g}: the rates with 5 seeds are {rates}", flush=True)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "e1"))
    parser.add_argument("--cache-dir", default="", help="prepared data (default ./data_cache)")
    parser.add_argument("--status", action="store_true", help="print how far the grid got and exit")
    parser.add_argument("--report", action="store_true", help="write the report of the finished runs and exit")
    parser.add_argument(
        "--seeds",
        default="",
        help="with --report: only these seeds, e.g. 0,1,2 (the full fronts), into OUT/report-seeds-0-1-2",
    )
    args = parser.parse_args(argv)
    os.nice(max(0, 19 - os.nice(0)))  # the box is shared: run at the lowest priority
    from train.topology import quiet_libtpu_without_tpus

    quiet_libtpu_without_tpus()
    import jax

    # Each arm's train step compiles once for all its seeds (the same program, cached on disk), not once per run.
    jax.config.update(
        "jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", str(ROOT / "runs" / "jax_cache"))
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from train.lab.runner import progress, report_finished, run_compare

    choice = out / "choice.json"
    if args.status or args.report:
        rates = json.loads(choice.read_text())["five_seed_rates"] if choice.is_file() else [5e-5, 7e-5]
        seeds = tuple(int(x) for x in args.seeds.split(",")) if args.seeds else SEEDS
        cfg = config(full_methods(rates), seeds, cache_dir=args.cache_dir)
        done, left, per_run = progress(cfg, out)
        print(
            f"[e1] {len(done)} of {len(done) + len(left)} runs finished; {len(left)} left, about "
            f"{len(left) * per_run / 3600:.1f} h at {per_run / 60:.1f} min per run"
        )
        print(f"[e1] next: {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}")
        if args.report:
            name = "report" + ("-seeds-" + "-".join(map(str, seeds)) if args.seeds else "")
            report_finished(cfg, out, name)
            print(f"[e1] wrote {out}/{name} (finished runs only)")
        return 0
    from train.lab.sources import prepare

    for source in ("austen", "brown", "quiz"):
        prepare(source, args.cache_dir or None, log=lambda msg: print(f"[e1] {msg}", flush=True))
    from train.preemption import Preempted

    stop = out / "STOP"
    stop.unlink(missing_ok=True)
    while True:
        try:
            rates = choose_rates(out, args.cache_dir)
            cfg = config(full_methods(rates), cache_dir=args.cache_dir)
            print(f"[e1] methods: {list(cfg.methods)}; seeds {list(cfg.seeds)}", flush=True)
            run_compare(cfg, out)
            return 0
        except Preempted as e:
            # SIGTERM ends the run in progress (finished runs are kept). Stray SIGTERMs happen on a shared box, so
            # the grid resumes unless OUT/STOP exists: `touch OUT/STOP; kill -TERM <pid>` stops it for good.
            if stop.exists():
                print(f"[e1] {e}; {stop} exists: stopped", flush=True)
                return 143
            print(f"[e1] {e}; resuming in 30 s (touch {stop} first to stop instead)", flush=True)
            time.sleep(30)


if __name__ == "__main__":
    sys.exit(main())

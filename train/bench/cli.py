"""``python -m train bench``: step throughput, MFU, FINCH's overhead, scaling, and the PyTorch side, in one run.

The command line of the benchmark (``train.cli`` dispatches ``bench`` here): parses the flags into a
:class:`~train.bench.spec.BenchSpec`, runs it with :func:`~train.bench.run.run_bench`, prints the table and the JSON
path. ``docs/bench.md`` explains the sections and how they measure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from jax._src import xla_bridge  # private, but the only way to tell whether jax has started its backend

from train import paths
from train.bench.report import format_table
from train.bench.run import run_bench
from train.bench.spec import FLAG_SETS, MALLOCS, SECTIONS, BenchError, BenchSpec

__all__ = ["build_parser", "main", "spec_from_args"]


def _csv(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _int_csv(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = BenchSpec()
    p = argparse.ArgumentParser(
        prog="python -m train bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=d.model,
        help="the model whose architecture is timed, randomly initialised: preset:NAME, hf:DIR or gguf:PATH "
        f"(default {d.model})",
    )
    p.add_argument("--preset", default=None, help=argparse.SUPPRESS)  # before 0.2: --model preset:NAME
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a model config field, e.g. num_layers=4 (repeatable)",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument(
        "--dtype",
        default=d.dtype,
        help="compute dtype(s), comma-separated: auto (float32,bfloat16 on CPU, bfloat16 on GPU/TPU), float32, "
        "bfloat16; params and optimizer state stay float32. The step, finch and torch sections run every one; the "
        "others the first",
    )
    p.add_argument("--mesh", default=d.mesh, help="e.g. data=-1 or data=2,fsdp=2,tensor=2")
    p.add_argument("--devices", type=int, default=d.devices, help="use the first N devices (0 = all)")
    p.add_argument("--remat", action="store_true", help="rematerialise each block")
    p.add_argument("--scan-layers", action="store_true", help="lax.scan over the layers")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="the variants section: a model config change timed against the spec's model (repeatable)",
    )
    p.add_argument("--sections", type=_csv, default=d.sections, help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps per runner after compiling")
    p.add_argument("--rounds", type=int, default=d.rounds, help="interleaved A B ... rounds")
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps per runner per round")
    p.add_argument("--profile-steps", type=int, default=d.profile_steps, help="steps traced by the profile section")
    p.add_argument("--torch-modes", type=_csv, default=d.torch_modes, help="eager,compile")
    p.add_argument(
        "--lora-rank", type=int, default=d.lora_rank, help="the lora section's rank (every projection; default 16)"
    )
    p.add_argument("--scaling-devices", type=_int_csv, default=d.scaling_devices)
    p.add_argument("--scaling-layouts", type=_csv, default=d.scaling_layouts)
    p.add_argument(
        "--trees",
        type=_csv,
        default=d.trees,
        help="the trees section: checkouts of this repository (before,after) whose steps are timed side by side",
    )
    p.add_argument("--flag-sets", type=_csv, default=d.flag_sets, help=f"names from: {', '.join(FLAG_SETS)}")
    p.add_argument(
        "--mallocs",
        type=_csv,
        default=d.mallocs,
        help=f"the malloc section's allocators, from: {', '.join(MALLOCS)} (one not installed is reported as such)",
    )
    p.add_argument(
        "--matmul-iters", type=int, default=d.matmul_iters, help="the matmuls section: calls per shape and dtype"
    )
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for this process (set before jax starts)")
    p.add_argument(
        "--max-minutes", type=float, default=d.max_minutes, help="refuse to start when the estimate is longer"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--peak-sizes",
        type=_int_csv,
        default=d.peak_sizes,
        help="square matmul sizes for the measured peak (default 1024,2048 on CPU, 4096,8192 on GPU)",
    )
    p.add_argument("--out", default="", help="JSON output path (default runs/bench/<model>-<time>.json)")
    p.add_argument("--table", default=None, metavar="JSON", help="print the table of an earlier run's JSON and exit")
    return p


def spec_from_args(args: argparse.Namespace) -> BenchSpec:
    if args.preset is not None:
        print(f"bench: --preset is now --model preset:{args.preset}; --preset goes away in 0.3", file=sys.stderr)
        args.model = f"preset:{args.preset}"
    return BenchSpec(
        model=args.model,
        overrides=tuple(args.override),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        dtype=args.dtype,
        mesh=args.mesh,
        devices=args.devices,
        remat=args.remat,
        scan_layers=args.scan_layers,
        variants=tuple(args.variant),
        trees=tuple(args.trees),
        sections=tuple(args.sections),
        warmup=args.warmup,
        rounds=args.rounds,
        steps=args.steps,
        profile_steps=args.profile_steps,
        torch_modes=tuple(args.torch_modes),
        lora_rank=args.lora_rank,
        scaling_devices=tuple(args.scaling_devices),
        scaling_layouts=tuple(args.scaling_layouts),
        flag_sets=tuple(args.flag_sets),
        mallocs=tuple(args.mallocs),
        matmul_iters=args.matmul_iters,
        max_minutes=args.max_minutes,
        seed=args.seed,
        peak_sizes=tuple(args.peak_sizes),
    )


def _apply_xla_flags(extra: str) -> None:
    """Adds flags to XLA_FLAGS; only possible before jax creates its backend, which reads them once."""
    if not extra.strip():
        return
    if getattr(xla_bridge, "_backends", None):
        raise BenchError(
            "--xla-flags must be applied before jax starts its backend; set XLA_FLAGS in the environment instead"
        )
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + extra).strip()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train bench [options]``; returns the exit status (2 for a request that cannot run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.table is not None:
        paths.check_file_to_read(args.table, "--table")
        try:
            print(format_table(json.loads(Path(args.table).read_text())))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            print(
                f"finch-train bench: error: --table {args.table}: cannot read a bench result ({type(e).__name__}: {e})",
                file=sys.stderr,
            )
            return 2
        return 0
    try:
        _apply_xla_flags(args.xla_flags)
        spec = spec_from_args(args)
        name = spec.model.rstrip("/").split("/")[-1].split(":")[-1]
        out = Path(args.out or f"runs/bench/{name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
        paths.check_file_to_write(out, "--out")
        result = run_bench(spec, argv, out=out)
    except BenchError as e:
        print(f"finch-train bench: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"\nJSON: {out}")
    return 0

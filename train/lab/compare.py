"""``finch-train compare``: FINCH against the baselines on one base model, one task, the same steps and seeds.

Fine-tunes one copy of the base model per (method, seed), evaluates its checkpoints, and writes ``results.json``,
``results.md`` and the plots (:mod:`train.lab.report`) to ``--out``; finished runs are kept in ``--out/runs`` and
skipped when started again. ``--task file:PATH`` and ``--retain file:PATH`` run the protocol on your own data.
Methods, metrics and the statistic: ``docs/lab.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

import models
from train import paths
from train.lab import tasks as tasks_lib
from train.lab.config import CompareConfig
from train.lab.evalsets import EvalConfig
from train.lab.methods import METHODS, expand_runs
from train.lab.report import markdown_table, summary_lines
from train.lab.runner import run_compare, train_config

__all__ = ["config_from_args", "main", "run_cli"]


def _build_parser(prog: str, defaults: CompareConfig, out: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods (--method KIND[:key=value,...]):\n"
        + "\n".join(f"  {k:<15} {m.help} (options: {', '.join(m.options) or 'none'})" for k, m in METHODS.items()),
    )
    p.add_argument("--config", default=None, help="YAML file with CompareConfig keys (CLI flags override it)")
    p.add_argument("--out", default=out, help=f"output directory (resumes finished runs; default {out})")
    p.add_argument(
        "--method",
        action="append",
        default=None,
        dest="methods",
        help="KIND[:key=value,...], repeatable (default: all kinds)",
    )
    p.add_argument("--seeds", default=None, help="comma-separated, e.g. 0,1")
    for f in dataclasses.fields(CompareConfig):
        if f.name in ("methods", "seeds", "eval", "train_overrides"):
            continue
        typ = type(getattr(defaults, f.name))
        if typ is bool:
            p.add_argument(
                f"--{f.name.replace('_', '-')}", default=None, type=lambda s: s.lower() in ("1", "true", "yes")
            )
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", default=None, type=typ)
    for f in dataclasses.fields(EvalConfig):
        p.add_argument(f"--eval-{f.name.replace('_', '-')}", default=None, type=type(f.default), dest=f"eval_{f.name}")
    p.add_argument("--lr-max", type=float, default=None, dest="lr_max_0_1", help=argparse.SUPPRESS)  # 0.1 name
    p.add_argument(
        "--set",
        action="append",
        default=[],
        dest="train_overrides",
        metavar="KEY=VALUE",
        help="train config override for every run, e.g. --set data.grad_accum=2 (repeatable)",
    )
    return p


def config_from_args(
    argv: Sequence[str] | None,
    defaults: CompareConfig,
    prog: str,
    out: str = "runs/compare",
    description: str | None = None,
) -> tuple[CompareConfig, str]:
    """CompareConfig from defaults, then a ``--config`` YAML, then flags; validated (methods included).

    Returns ``(config, output directory)``. Has no side effects, so ``--help`` and bad flags never touch disk.
    """
    args = _build_parser(prog, defaults, out, description or __doc__.split("\n\n")[0]).parse_args(argv)
    values = dataclasses.asdict(defaults)
    values["methods"] = list(defaults.methods)
    if args.config:
        paths.check_file_to_read(args.config, "--config")
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        unknown = sorted(set(loaded) - set(values) - {"lr_max"})
        if unknown:
            raise ValueError(f"{args.config}: unknown key {unknown[0]!r}; valid: {', '.join(sorted(values))}")
        eval_values = loaded.pop("eval", {}) or {}
        bad = sorted(set(eval_values) - set(values["eval"]))
        if bad:
            raise ValueError(f"{args.config}: unknown eval key {bad[0]!r}; valid: {', '.join(sorted(values['eval']))}")
        values["eval"].update(eval_values)
        values.update(loaded)
    if "lr_max" in values:  # the 0.1 name
        warnings.warn("compare: lr_max is now max_learning_rate (until 0.3)", FutureWarning, stacklevel=2)
        values["max_learning_rate"] = values.pop("lr_max")
    if args.lr_max_0_1 is not None:
        print(f"{prog}: --lr-max is now --max-learning-rate (until 0.3)", file=sys.stderr)
        values["max_learning_rate"] = args.lr_max_0_1
    for f in dataclasses.fields(CompareConfig):
        v = getattr(args, f.name, None)
        if f.name not in ("methods", "seeds", "eval", "train_overrides") and v is not None:
            values[f.name] = v
    for f in dataclasses.fields(EvalConfig):
        v = getattr(args, f"eval_{f.name}")
        if v is not None:
            values["eval"][f.name] = v
    if args.methods:
        values["methods"] = args.methods
    if args.seeds:
        values["seeds"] = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.train_overrides:
        values["train_overrides"] = list(values.get("train_overrides") or []) + args.train_overrides
    values["eval"] = EvalConfig(**values["eval"])
    values["methods"] = tuple(values["methods"])
    values["seeds"] = tuple(int(s) for s in values["seeds"])
    values["train_overrides"] = tuple(values["train_overrides"])
    cfg = CompareConfig(**values)
    # Method and train-override errors now, before anything loads.
    train_config(cfg, expand_runs(cfg)[0], None, Path(args.out))
    _check_inputs(cfg, args.out)
    return cfg, args.out


def _check_inputs(cfg: CompareConfig, out: str) -> None:
    """The folder the comparison writes, the user's task and retain files (read whole: a bad row fails now, before
    any download or model load) and the model's config (no weight is read)."""
    paths.check_folder_to_write(out, "--out")
    if cfg.cache_dir:
        paths.check_folder_to_write(cfg.cache_dir, "--cache-dir")
    if cfg.task.startswith("file:"):
        tasks_lib.load_task(cfg.task, num_entities=cfg.facts_entities)
    if cfg.retain.startswith("file:"):
        tasks_lib.load_retain(cfg.retain)
    models.load_config(cfg.model, dtype=cfg.dtype)


def run_cli(
    argv: Sequence[str] | None,
    defaults: CompareConfig,
    prog: str,
    *,
    out: str = "runs/compare",
    description: str | None = None,
    before_run: Callable[[CompareConfig], None] | None = None,
) -> int:
    """Parse ``argv`` over ``defaults``, then ``before_run(cfg)`` (e.g. fetch data), run, print the table."""
    try:
        cfg, out = config_from_args(argv, defaults, prog, out, description)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        if before_run is not None:
            before_run(cfg)
        results = run_compare(cfg, out)
    except (ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print()
    print(markdown_table(cfg, results))
    print()
    print("\n".join(summary_lines(results)))
    if results.get("answers"):
        print("\nGreedy answers to held-out questions (✓ = the answer contains the truth):\n")
        print(results["answers"])
    print(f"\nwrote {out}/results.json, results.md and the plots ({time.perf_counter() - t0:.0f}s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``finch-train compare``: FINCH vs baselines, forgetting vs task score."""
    return run_cli(argv, CompareConfig(), "finch-train compare")

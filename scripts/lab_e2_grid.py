#!/usr/bin/env python
"""The E2 grid of docs/results.md: the paper's three domains (facts, science, spanish), its reported FINCH setting,
LoRA and checkpoint selection, read two ways (the paper's: FINCH vs SFT at matched task loss; E1's: r against the
constant-lr front).

Resumable: finished runs are kept in runs/e2/<domain>/runs and skipped; start it again after any interruption. Runs
under `nice -n 19`. The pilot (one 120-step run per domain) runs first and fixes each domain's length by the
pre-registered rule; its choice is stored in runs/e2/<domain>/length.json and never changes afterwards.

    scripts/lab_e2_grid.py                  # pilot, then the grid, domain by domain (OUT=runs/e2)
    scripts/lab_e2_grid.py --pilot-only     # only the pilots and the lengths they give
    scripts/lab_e2_grid.py --status         # how far it got, loads no model
    scripts/lab_e2_grid.py --report         # docs/results/e2_<domain>.{md,json} from the finished domains
    scripts/lab_e2_grid.py --archive        # finished runs -> docs/results/e2_runs/ (committed: the next machine
                                            # resumes from them; a start copies back whatever runs/e2 lacks)
    scripts/lab_e2_grid.py --check spanish  # the runs finished so far, read again, against the committed report
    touch runs/e2/STOP; kill -TERM <pid>    # stop after the current step

Another model (the paper's sizes on an accelerator: scripts/lab_gpu_grid.sh e2): the same pre-registered grid, its
own pilots and lengths, its records and reports under --out only (nothing archived, docs/results untouched):

    scripts/lab_e2_grid.py --model hub:Qwen/Qwen3-4B --out runs/e2-qwen3-4b     # float32, as the reference grid
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from train.lab.config import CompareConfig  # noqa: E402
from train.lab.evalsets import EvalConfig  # noqa: E402

DOMAINS = ("facts", "science", "spanish")
SEEDS = (0, 1, 2)
SFT = 1e-4
METHODS = (
    "sweep:lrs=3e-5/1e-4/3e-4",  # the front; const@1e-4 is SFT
    "finch:max_learning_rate=5e-5",  # FINCH as reported (cap 5e-5, EMA 0.9, L* = 1)
    "finch",  # FINCH with E1's cap (max_learning_rate = 1e-4)
    "warmup_matched",  # AdamW replaying finch's lr trace of the next seed
    "lora:rank=16,lr=2e-4",
    "finch:lora=16,max_learning_rate=2e-4",
)
PILOT_STEPS, PILOT_EVERY = 120, 12
# Finished records, committed: a grid of several CPU hours outlives the machine it started on. Each record carries
# the fingerprint of its config and data, so one that no longer matches is re-run, never reused.
ARCHIVE = ROOT / "docs" / "results" / "e2_runs"
REFERENCE_MODEL, REFERENCE_DTYPE = "gguf:smollm2", "float32"  # the grid docs/results.md reports
SELECTION_TOLERANCE = 0.05


def config(
    domain: str,
    steps: int,
    methods: tuple[str, ...],
    seeds: tuple[int, ...],
    cache_dir: str = "",
    model: str = REFERENCE_MODEL,
    dtype: str = REFERENCE_DTYPE,
) -> CompareConfig:
    """A domain's comparison in the pre-registered design (docs/results.md, E2)."""
    return CompareConfig(
        model=model,
        dtype=dtype,
        scan_layers=True,
        task=domain,
        retain="builtin",
        facts_entities=4,
        methods=methods,
        steps=steps,
        seeds=seeds,
        max_learning_rate=SFT,
        batch_size=4,
        seq_len=48,
        weight_decay=0.0,
        eval_every=PILOT_EVERY if steps == PILOT_STEPS else max(steps // 5, 1),
        bootstrap=2000,
        cache_dir=cache_dir,
        train_overrides=("progress=false",),
        eval=EvalConfig(seq_len=64, batch_size=16, retain_sequences=64, quiz_items=256, seed=0, common_facts=True),
    )


def run_length(pilot: dict) -> dict:
    """The pre-registered rule: the first evaluated step with 95% of the pilot's task-loss improvement, rounded up
    to a multiple of 10, at least 30."""
    [record] = pilot["runs"]
    start = pilot["base_metrics"]["task_loss"]
    losses = [(c["step"], c["metrics"]["task_loss"]) for c in record["checkpoints"]]
    best = min(loss for _, loss in losses)
    first = next(step for step, loss in losses if start - loss >= 0.95 * (start - best))
    return {"pilot_task_loss": losses, "base_task_loss": start, "first_95": first,
            "steps": max(30, int(math.ceil(first / 10) * 10))}  # fmt: skip


def pilot(domain: str, out: Path, cache_dir: str, model: str = REFERENCE_MODEL, dtype: str = REFERENCE_DTYPE) -> dict:
    path = out / domain / "length.json"
    if path.is_file():
        return json.loads(path.read_text())
    from train.lab.runner import run_compare

    t0 = time.time()
    cfg = config(domain, PILOT_STEPS, ("sweep:lrs=1e-4",), (0,), cache_dir, model, dtype)
    results = run_compare(cfg, out / f"pilot-{domain}")
    choice = run_length(results) | {"pilot_wall_s": time.time() - t0}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(choice, indent=1))
    print(f"[e2] {domain}: pilot task loss {choice['pilot_task_loss']}; runs of {choice['steps']} steps", flush=True)
    return choice


# --------------------------------------------------------------------------------------------------------------------
# the readings


def readings(results: dict) -> dict:
    """Per arm, the paper's reading (vs SFT at matched task loss) and E1's (r against the front), at the final
    checkpoint and at the one least_forgetting selects."""
    from train.lab.front import Point, points_of, ratios, summarize_ratio
    from train.lab.summary import fronts
    from train.selection import Evaluation, Selection

    n = results["config"]["eval"]["retain_sequences"]
    halves = (np.arange(0, n, 2), np.arange(1, n, 2))
    base, records = results["base"], results["runs"]
    base_point = Point(
        task=float(base["checkpoint"]["metrics"]["task_loss"]),
        kl_sums=np.asarray(base["checkpoint"]["retain_kl_sums"], np.float64),
        tokens=np.asarray(base["checkpoint"]["retain_tokens"], np.float64),
        label="base",
    )
    sft = {r["run"]["seed"]: [base_point, *points_of(r)] for r in records if r["run"]["label"] == "const@1e-4"}

    def selected(record):
        points = points_of(record)
        chosen = Selection(
            "least_forgetting", SELECTION_TOLERANCE, [Evaluation(p.step, p.task, p.kl(halves[0])) for p in points]
        ).selected
        return next(p for p in points if p.step == chosen.step)

    out = {}
    for label in dict.fromkeys(r["run"]["label"] for r in records):
        runs = [r for r in records if r["run"]["label"] == label]
        on_front = runs[0]["run"]["on_front"]
        front = fronts(base, records, leave_out=label if on_front else None)
        entry = {}
        for when, pick in (("final", lambda r: points_of(r)[-1]), ("least_forgetting", selected)):
            points = {r["run"]["seed"]: pick(r) for r in runs}
            vs_sft = summarize_ratio(ratios(points, sft, halves, boot=2000)) if label != "const@1e-4" else None
            entry[when] = {
                "steps": {str(s): p.step for s, p in points.items()},
                "vs_sft": vs_sft,
                "reduction_vs_sft": None if not vs_sft or vs_sft["r"] is None else 1 - vs_sft["r"],
                "vs_front": summarize_ratio(ratios(points, front, halves, boot=2000)),
            }
        out[label] = entry
    return out


def _fmt(summary) -> str:
    if summary is None:
        return "—"
    if summary["r"] is None:
        return "outside the range"
    iv = summary.get("interval")
    return f"{summary['r']:.2f}" + (f" [{iv[0]:.2f}, {iv[1]:.2f}]" if iv else "")


def _sft_verdict(summary) -> str:
    if summary is None or summary["r"] is None or not summary.get("interval"):
        return "—" if summary is None else summary["verdict"]
    lo, hi = summary["interval"]
    verdict = ("forgets less" if hi < 0.9 else "the same" if lo >= 0.9 and hi <= 1.1 else "forgets more"
               if lo > 1.1 else "inconclusive")  # fmt: skip
    return verdict + ("; the paper's 93% inside" if lo <= 0.07 <= hi else "")


def render(domain: str, results: dict, read: dict, length: dict) -> str:
    methods = results["summary"]["methods"]
    model = results["config"]["model"]
    on = "" if model == REFERENCE_MODEL else f" on `{model}` ({results['config']['dtype']})"
    lines = [
        f"E2, `{domain}`{on}: {results['config']['steps']} steps (pilot: 95% of the task-loss improvement at step "
        f"{length['first_95']}), seeds {', '.join(map(str, results['config']['seeds']))}. Ratios: geometric mean "
        "over seeds [union of the 95% t-interval and the window bootstrap]; vs SFT = F / F_SFT at matched task "
        "loss (reduction = 1 − ratio); vs front = E1's r.",
        "",
        "| arm | task loss | KL_B | known kept | vs SFT (final) | paper's reading | vs front (final) | E1 reading "
        "| least_forgetting: vs SFT | vs front | reading |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, entry in read.items():
        m = methods[label]
        task, kl, known = m["metrics"]["task_loss"], m["metrics"]["retain_kl_B"], m.get("known_kept", {})
        known_text = "—" if not known or known.get("mean") is None else f"{100 * known['mean']:.1f}%"
        fin, sel = entry["final"], entry["least_forgetting"]
        lines.append(
            f"| {label} | {task['mean']:.3f} ± {task['std']:.3f} | {kl['mean']:.3f} ± {kl['std']:.3f} | {known_text} "
            f"| {_fmt(fin['vs_sft'])} | {_sft_verdict(fin['vs_sft'])} | {_fmt(fin['vs_front'])} | "
            f"{fin['vs_front']['verdict']} | {_fmt(sel['vs_sft'])} | {_fmt(sel['vs_front'])} | "
            f"{sel['vs_front']['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def report(out: Path, cache_dir: str = "", dest: Path = ROOT / "docs" / "results") -> None:
    from train.lab.report import plot_results

    for domain in DOMAINS:
        path = out / domain / "results.json"
        if not path.is_file():
            print(f"[e2] {domain}: no results.json yet")
            continue
        results = json.loads(path.read_text())
        length = json.loads((out / domain / "length.json").read_text())
        read = readings(results)
        # Drawn again from the records, so a report made on a new machine (records restored, no plots) has them too.
        cfg = config(domain, length["steps"], METHODS, SEEDS, cache_dir, results["config"]["model"],
                     results["config"]["dtype"])  # fmt: skip
        plot_results(cfg, results, out / domain)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / f"e2_{domain}.json").write_text(json.dumps({"length": length, "readings": read}, indent=1))
        (dest / f"e2_{domain}.md").write_text(render(domain, results, read, length))
        for name in ("forgetting_vs_task.png", "loss_curves.png", "lr_traces.png"):
            if (out / domain / name).is_file():
                shutil.copyfile(out / domain / name, dest / f"e2_{domain}_{name}")
        print((dest / f"e2_{domain}.md").read_text())


def check(domain: str, out: Path, cache_dir: str = "") -> int:
    """Re-reads the finished runs of ``domain`` (a partial grid too) and compares every per-seed ratio with the
    committed report's; 0 when all agree exactly, 1 otherwise. For runs re-made on another machine or session."""
    from train.lab.runner import report_finished

    length = json.loads((out / domain / "length.json").read_text())
    cfg = config(domain, length["steps"], METHODS, SEEDS, cache_dir)
    fresh = readings(report_finished(cfg, out / domain, name="check"))
    committed = json.loads((ROOT / "docs" / "results" / f"e2_{domain}.json").read_text())["readings"]
    compared, differ = 0, []
    for arm, entry in fresh.items():
        for when, key in itertools.product(("final", "least_forgetting"), ("vs_sft", "vs_front")):
            ours, theirs = entry[when][key], committed[arm][when][key]
            if ours is None or theirs is None:
                continue
            for seed, value in zip(ours["seeds"], ours["per_seed"], strict=True):
                if seed in theirs["seeds"]:
                    compared += 1
                    if value != theirs["per_seed"][theirs["seeds"].index(seed)]:
                        differ.append(f"{arm} {when} {key} seed {seed}")
    print(f"[e2] {domain}: {compared} per-seed ratios of {len(fresh)} arms compared, {len(differ)} differ")
    for line in differ:
        print(f"[e2]   differs: {line}")
    return 1 if differ or not compared else 0


def _records(root: Path) -> list[Path]:
    """Every finished record under ``root``: lengths, base evaluations, run records and their run folders' files."""
    names = ("length.json", "base.json", "results.json")
    keep = [p for p in root.glob("*/*") if p.name in names]
    keep += [p for p in root.glob("*/runs/*.json")]
    keep += [  # a run folder only once its run finished (its record written): a half run is run again
        p
        for p in root.glob("*/runs/*/*")
        if p.suffix in (".json", ".jsonl", ".yaml") and (p.parent.parent / f"{p.parent.name}.json").is_file()
    ]
    return sorted(keep)


def archive(out: Path, dest: Path = ARCHIVE) -> int:
    """Copies what ``out`` finished into ``dest``; returns the number of files copied."""
    copied = 0
    for path in _records(out):
        target = dest / path.relative_to(out)
        if not target.is_file() or target.read_bytes() != path.read_bytes():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            copied += 1
    return copied


def restore(out: Path, source: Path = ARCHIVE) -> int:
    """Copies into ``out`` the archived records it does not have (a new machine); returns how many."""
    copied = 0
    for path in _records(source):
        target = out / path.relative_to(source)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            copied += 1
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "e2"))
    parser.add_argument("--cache-dir", default="", help="prepared data (default ./data_cache)")
    parser.add_argument("--domains", default=",".join(DOMAINS))
    parser.add_argument("--pilot-only", action="store_true")
    parser.add_argument("--status", action="store_true")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--archive", action="store_true", help=f"copy the finished runs to {ARCHIVE.relative_to(ROOT)}")
    parser.add_argument("--check", metavar="DOMAIN", help="compare the finished runs with the committed report")
    parser.add_argument("--model", default=REFERENCE_MODEL, help="a models.load name (default %(default)s)")
    parser.add_argument("--dtype", default=REFERENCE_DTYPE, choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    domains = [d for d in args.domains.split(",") if d]
    unknown = sorted(set(domains) - set(DOMAINS))
    if unknown:
        parser.error(f"unknown domain(s) {', '.join(unknown)}; the grid has {', '.join(DOMAINS)}")  # exit 2
    reference = (args.model, args.dtype) == (REFERENCE_MODEL, REFERENCE_DTYPE)
    if not reference and out.resolve() == (ROOT / "runs" / "e2").resolve():
        parser.error(f"--model {args.model} --dtype {args.dtype} needs its own --out (runs/e2 is the reference grid)")
    try:
        config("facts", PILOT_STEPS, METHODS, SEEDS, args.cache_dir, args.model, args.dtype)
    except ValueError as err:  # a malformed model name, before any data or model loads
        parser.error(str(err))
    report_dir = ROOT / "docs" / "results" if reference else out / "report"
    if args.archive:
        if not reference:
            parser.error(
                "--archive keeps the reference grid's records (docs/results/e2_runs); other models' stay in --out"
            )
        print(f"[e2] {archive(out)} files copied to {ARCHIVE.relative_to(ROOT)}")
        return 0
    # Only the reference grid resumes from the archive: another model's pilots and runs must not be mixed with it.
    restored = restore(out) if reference else 0
    if restored:
        print(f"[e2] {restored} finished files restored from {ARCHIVE.relative_to(ROOT)}", flush=True)
    if args.report:
        report(out, args.cache_dir, report_dir)
        return 0
    if args.check:
        if not reference or args.check not in DOMAINS:
            parser.error(f"--check reads the reference grid's reports: one of {', '.join(DOMAINS)}")
        return check(args.check, out, args.cache_dir)
    from train.malloc import reexec_with_chosen_malloc

    reexec_with_chosen_malloc()  # as finch-train does: tcmalloc halves XLA:CPU's step time (train/malloc.py)
    os.nice(max(0, 19 - os.nice(0)))  # the box is shared: the lowest priority
    from train.topology import quiet_libtpu_without_tpus

    quiet_libtpu_without_tpus()
    import jax

    # Each arm's train step compiles once for all its seeds and domains of one length (cached on disk).
    jax.config.update(
        "jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", str(ROOT / "runs" / "jax_cache"))
    )
    from train.lab.runner import progress, run_compare
    from train.lab.sources import prepare

    if args.status:
        for domain in domains:
            length = out / domain / "length.json"
            if not length.is_file():
                print(f"[e2] {domain}: pilot not run yet")
                continue
            steps = json.loads(length.read_text())["steps"]
            cfg = config(domain, steps, METHODS, SEEDS, args.cache_dir, args.model, args.dtype)
            done, left, per_run = progress(cfg, out / domain)
            print(
                f"[e2] {domain}: {len(done)} of {len(done) + len(left)} runs; ~{len(left) * per_run / 3600:.1f} h left"
            )
        return 0
    for source in ("austen", "brown", "quiz", "spanish", "pydocs"):
        prepare(source, args.cache_dir or None, log=lambda msg: print(f"[e2] {msg}", flush=True))
    lengths = {domain: pilot(domain, out, args.cache_dir, args.model, args.dtype) for domain in domains}
    if args.pilot_only:
        return 0
    for domain in domains:
        cfg = config(domain, lengths[domain]["steps"], METHODS, SEEDS, args.cache_dir, args.model, args.dtype)
        print(f"[e2] {domain}: {cfg.steps} steps, methods {list(cfg.methods)}, seeds {list(cfg.seeds)}", flush=True)
        run_compare(cfg, out / domain)
    report(out, args.cache_dir, report_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

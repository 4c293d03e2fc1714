"""The E1 check of `output.select=least_forgetting`: the product's selection rule applied to every evaluated checkpoint
of the E1 runs (docs/results/e1_results.json), read with E1's own pre-registered rule.

    .venv/bin/python scripts/e1_selection.py        # writes docs/results/e1_selection.{json,md}

For each run, `train.selection.Selection("least_forgetting", tolerance)` picks among its evaluated checkpoints (steps
12-60) the one with the smallest retain KL among those whose validation loss (E1's held-out task loss) is within the
tolerance of the run's best; the KL it selects on is retain half A, and the selected checkpoint is then read on half
B against the constant-lr front exactly as E1 reads a method's final checkpoint (`train.lab.front.ratios`; a
constant-lr arm against the front of the *other* constant-lr runs). No model is trained or evaluated here: every
number comes from the E1 runs' records.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.lab.front import points_of, ratios, summarize_ratio  # noqa: E402
from train.lab.summary import fronts  # noqa: E402
from train.selection import Evaluation, Selection  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "e1_results.json"
OUT_JSON = ROOT / "docs" / "results" / "e1_selection.json"
OUT_MD = ROOT / "docs" / "results" / "e1_selection.md"
TOLERANCE = 0.05  # output.select_tolerance's default
ARMS = ("const@2.5e-5", "const@3.5e-5", "const@5e-5", "const@7e-5", "const@1e-4", "const@1.4e-4", "finch",
        "finch(L*=0.25)", "finch(ema=0)", "warmup_matched")  # fmt: skip


def selected_point(record, half_a, tolerance):
    """The checkpoint the product's rule selects, and its step."""
    points = points_of(record)
    evaluations = [Evaluation(p.step, p.task, p.kl(half_a)) for p in points]
    chosen = Selection("least_forgetting", tolerance, evaluations).selected
    return next(p for p in points if p.step == chosen.step)


def main() -> int:
    results = json.loads(RESULTS.read_text())
    n = results["config"]["eval"]["retain_sequences"]
    halves = (np.arange(0, n, 2), np.arange(1, n, 2))
    base, records = results["base"], results["runs"]
    seeds = sorted({r["run"]["seed"] for r in records})
    out = {"tolerance": TOLERANCE, "source": str(RESULTS.relative_to(ROOT)), "arms": {}}
    for arm in ARMS:
        runs = [r for r in records if r["run"]["label"] == arm]
        if not runs:
            continue
        front = fronts(base, records, leave_out=arm if runs[0]["run"]["on_front"] else None)
        picked = {r["run"]["seed"]: selected_point(r, halves[0], TOLERANCE) for r in runs}
        final = {r["run"]["seed"]: points_of(r)[-1] for r in runs}
        entry = {}
        for name, points in (("least_forgetting", picked), ("final", final)):
            rs = ratios(points, front, halves, boot=2000, rng_seed=0)
            summary = summarize_ratio(rs)
            entry[name] = {
                "steps": {str(s): p.step for s, p in points.items()},
                "task_loss": {str(s): p.task for s, p in points.items()},
                "ratio": summary,
            }
        out["arms"][arm] = entry
    OUT_JSON.write_text(json.dumps(out, indent=1))
    OUT_MD.write_text(render(out, seeds))
    print(OUT_MD.read_text())
    return 0


def _r(summary) -> str:
    if summary["r"] is None:
        return "outside the front's range"
    interval = summary.get("interval")
    span = f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""
    return f"{summary['r']:.2f}{span}"


def render(out, seeds) -> str:
    lines = [
        f"E1 runs (seeds {', '.join(map(str, seeds))}) with `output.select=least_forgetting` "
        f"(tolerance {out['tolerance']:.0%}) applied to their evaluated checkpoints; r = F_B / F_front,B at the "
        "checkpoint's task loss, geometric mean over seeds, [union of the 95% t-interval and the window bootstrap].",
        "",
        "| arm | selected steps (by seed) | r, least_forgetting | reading | r, final checkpoint (E1) | reading |",
        "|---|---|---|---|---|---|",
    ]
    for arm, entry in out["arms"].items():
        lf, fin = entry["least_forgetting"], entry["final"]
        steps = ", ".join(f"{s}:{v}" for s, v in lf["steps"].items())
        lines.append(
            f"| {arm} | {steps} | {_r(lf['ratio'])} | {lf['ratio']['verdict']} | {_r(fin['ratio'])} | "
            f"{fin['ratio']['verdict']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

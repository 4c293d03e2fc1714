"""The constant-lr Pareto front and the per-method summary of a comparison (forgetting vs SFT and vs the front).

A method's forgetting is compared with the front's forgetting linearly interpolated at the method's task score; a
method that some constant-lr run beats on both axes is reported as dominated by it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from train.lab.config import CompareConfig

__all__ = ["dominates", "front_at", "mean_std", "pareto_front", "summarize"]


def dominates(a: tuple[float, float], b: tuple[float, float], *, task_higher_is_better: bool = False) -> bool:
    """Whether point ``a = (task score, forgetting)`` is at least as good as ``b`` on both axes and better on one.

    Examples:
      >>> dominates((0.30, 1.2), (0.35, 2.8))   # lower task loss and less forgetting
      True
      >>> dominates((0.30, 3.0), (0.35, 2.8))   # a trade-off: neither dominates
      False
    """
    (ta, fa), (tb, fb) = a, b
    if task_higher_is_better:
        ta, tb = -ta, -tb
    return ta <= tb and fa <= fb and (ta < tb or fa < fb)


def pareto_front(
    points: Sequence[tuple[float, float]], *, task_higher_is_better: bool = False
) -> list[tuple[float, float]]:
    """The points no other point dominates (see :func:`dominates`), sorted by task score.

    Examples:
      >>> pareto_front([(0.35, 2.8), (0.30, 1.2), (0.50, 0.5)])
      [(0.3, 1.2), (0.5, 0.5)]
    """
    return sorted(
        p for p in points if not any(dominates(q, p, task_higher_is_better=task_higher_is_better) for q in points)
    )


def front_at(front: Sequence[tuple[float, float]], task_score: float) -> float | None:
    """Forgetting of the constant-lr front at ``task_score``, linearly interpolated between its points.

    ``front`` holds ``(task_score, forgetting)`` of the constant-lr runs; returns ``None`` outside their range.

    Examples:
      >>> front_at([(1.0, 0.1), (2.0, 0.3)], 1.5)
      0.2
      >>> front_at([(1.0, 0.1), (2.0, 0.3)], 2.5) is None
      True
    """
    if not front:
        return None
    pts = sorted(front)
    xs = [p[0] for p in pts]
    if task_score < xs[0] or task_score > xs[-1]:
        return None
    return float(np.interp(task_score, xs, [p[1] for p in pts]))


def mean_std(values: Sequence[float | None]) -> dict[str, float | None]:
    """Mean, sample std, min, max and count of the finite values (``None`` s and NaNs skipped)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    a = np.asarray(vals, np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "n": len(vals),
    }


def _reduction(f: float | None, reference: float | None) -> float | None:
    """1 - f / reference: the share of the reference's forgetting avoided (None if undefined)."""
    if f is None or reference is None or not reference > 0:
        return None
    return 1.0 - f / reference


def summarize(
    cfg: CompareConfig, base_metrics: Mapping[str, float], records: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Per method: mean/std over seeds of task score, forgetting and the forgetting reductions.

    * ``reduction_vs_sft``: ``1 - F_method / F_sft`` paired by seed (the paper's comparison, same peak lr).
    * ``reduction_vs_front``: ``1 - F_method / F_front(task score)`` where the front is the Pareto-efficient
      constant-lr runs of the same seed, interpolated at the method's task score (``None`` outside the swept range).
    * ``dominated_by``: per seed, the constant-lr runs that beat the method on both task score and forgetting.
    """
    tm, fm = cfg.task_metric, cfg.forgetting_metric
    by_seed: dict[int, list[Mapping[str, Any]]] = {}
    for r in records:
        by_seed.setdefault(r["run"]["seed"], []).append(r)
    labels = list(dict.fromkeys(r["run"]["label"] for r in records))
    per_method: dict[str, dict[str, list]] = {
        lab: {"task": [], "forgetting": [], "vs_sft": [], "vs_front": [], "dominated_by": []} for lab in labels
    }
    higher = cfg.task_higher_is_better
    for _seed, rs in by_seed.items():
        sft = next((r for r in rs if r["run"]["kind"] == "sft"), None)
        const_points = {r["run"]["label"]: (r["metrics"][tm], r["forgetting"][fm]) for r in rs if r["run"]["on_front"]}
        front = pareto_front(list(const_points.values()), task_higher_is_better=higher)
        for r in rs:
            lab = r["run"]["label"]
            t, f = r["metrics"].get(tm), r["forgetting"].get(fm)
            per_method[lab]["task"].append(t)
            per_method[lab]["forgetting"].append(f)
            per_method[lab]["vs_sft"].append(_reduction(f, sft["forgetting"][fm]) if sft and r is not sft else None)
            per_method[lab]["vs_front"].append(
                None if r["run"]["on_front"] else _reduction(f, front_at(front, t)) if len(front) >= 2 else None
            )
            per_method[lab]["dominated_by"].append(
                [
                    other
                    for other, point in const_points.items()
                    if other != lab and dominates(point, (t, f), task_higher_is_better=higher)
                ]
            )
    methods = {
        lab: {
            "task": mean_std(v["task"]),
            "forgetting": mean_std(v["forgetting"]),
            "reduction_vs_sft": mean_std(v["vs_sft"]),
            "reduction_vs_front": mean_std(v["vs_front"]),
            "per_seed_reduction_vs_sft": v["vs_sft"],
            "per_seed_reduction_vs_front": v["vs_front"],
            "dominated_by": v["dominated_by"],
        }
        for lab, v in per_method.items()
    }
    return {
        "task_metric": tm,
        "forgetting_metric": fm,
        "task_higher_is_better": cfg.task_higher_is_better,
        "base_task": base_metrics.get(tm),
        "methods": methods,
    }

"""The per-method summary of a comparison: final metrics over seeds and the ratio r to the constant-lr front.

See :mod:`train.lab.front` for the front and the statistic. A constant-lr method is read against the front of the
*other* constant-lr runs (its own checkpoints left out), which says how far a single learning rate with early
stopping sits from the envelope of the rest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from train.lab import known as known_lib
from train.lab.config import CompareConfig
from train.lab.front import Point, points_of, ratios, summarize_ratio

__all__ = ["fronts", "mean_std", "summarize"]

_METRICS = ("task_loss", "recall_em", "retain_loss", "retain_kl_B", "mc_acc", "mc_ece", "mc_brier")


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


def fronts(
    base_record: Mapping[str, Any], records: Sequence[Mapping[str, Any]], *, leave_out: str | None = None
) -> dict[int, list[Point]]:
    """seed -> the base model plus every evaluated checkpoint of that seed's constant-lr runs (but ``leave_out``)."""
    base = base_record["checkpoint"]
    base_point = Point(
        task=float(base["metrics"]["task_loss"]),
        kl_sums=np.asarray(base["retain_kl_sums"], np.float64),
        tokens=np.asarray(base["retain_tokens"], np.float64),
        label="base",
        step=0,
    )
    out: dict[int, list[Point]] = {}
    for r in records:
        if r["run"]["on_front"] and r["run"]["label"] != leave_out:
            out.setdefault(r["run"]["seed"], [base_point]).extend(points_of(r))
    return out


def summarize(
    cfg: CompareConfig,
    base_record: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    halves: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """Per method (label): seeds, mean/std of the final metrics, the mean lr and Σlr, and r against the front."""
    by_label: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        by_label.setdefault(r["run"]["label"], []).append(r)
    all_fronts = fronts(base_record, records)
    sft_label = next((lab for lab, rs in by_label.items() if _is_constant_at(rs[0], cfg.max_learning_rate)), None)
    methods: dict[str, Any] = {}
    for label, rs in by_label.items():
        on_front = rs[0]["run"]["on_front"]
        front = fronts(base_record, records, leave_out=label) if on_front else all_fronts
        finals = {r["run"]["seed"]: points_of(r)[-1] for r in rs}
        rs_ratio = ratios(finals, front, halves, boot=cfg.bootstrap, rng_seed=cfg.eval.seed)
        entry: dict[str, Any] = {
            "kind": rs[0]["run"]["kind"],
            "on_front": on_front,
            "seeds": [r["run"]["seed"] for r in rs],
            "metrics": {m: mean_std([r["metrics"].get(m) for r in rs]) for m in _METRICS},
            "mean_lr": mean_std([float(np.mean(r["lr_trace"])) for r in rs]),
            "cum_lr": mean_std([float(np.sum(r["lr_trace"])) for r in rs]),
            "train_s": mean_std([r["train_s"] for r in rs]),
            "known_kept": mean_std([_known_kept(base_record, r) for r in rs]),
            "ratio": summarize_ratio(rs_ratio),
            "per_seed": [
                {"seed": x.seed, "r": x.r, "f_method": x.f_method, "f_front": x.f_front, "front_lrs": x.front_lrs}
                for x in rs_ratio
            ],
        }
        if sft_label is not None and label != sft_label:
            sft = {r["run"]["seed"]: r["metrics"]["retain_kl_B"] for r in by_label[sft_label]}
            paired = [r["metrics"]["retain_kl_B"] / sft[r["run"]["seed"]] for r in rs if r["run"]["seed"] in sft]
            entry["f_vs_sft"] = float(np.exp(np.mean(np.log(paired)))) if paired else None
        methods[label] = entry
    return {"sft_label": sft_label, "base_metrics": base_record["metrics"], "methods": methods}


def _known_kept(base_record: Mapping[str, Any], record: Mapping[str, Any]) -> float | None:
    """The share of the quiz items the base model answered right that this run's final model still answers right
    (the known-knowledge probe, :mod:`train.lab.known`); ``None`` without per-item results."""
    base = base_record.get("checkpoint", {}).get("quiz_correct")
    tuned = record["checkpoints"][-1].get("quiz_correct") if record.get("checkpoints") else None
    if base is None or tuned is None or len(base) != len(tuned):
        return None
    return known_lib.known_share(base, tuned)["kept"]


def _is_constant_at(record: Mapping[str, Any], lr: float) -> bool:
    opt = record["run"]["optimizer"]
    return bool(record["run"]["on_front"]) and math.isclose(opt["learning_rate"], lr, rel_tol=1e-9)

r"""The constant-lr front and the statistic every method is read by: :math:`r = F_\text{method} / F_\text{front}`.

The front is the lower envelope over *all evaluated checkpoints* of the constant-lr AdamW runs of a seed (plus the
base model at step 0): constant lr with early stopping, the baseline a practitioner really has. Forgetting :math:`F`
is KL(base‖ft) per retain token. To keep a lucky checkpoint from flattering anyone, the envelope's points are chosen
on retain half A (the Pareto-efficient checkpoints in task loss and :math:`F_A`) and every number is computed on half
B: the front's :math:`F_B` at the method's final task loss is interpolated geometrically between the two envelope
points around it (linearly where one of them has :math:`F = 0`).

Per seed :math:`r_s = F_{B}(\text{method}_s) / F_{B}(\text{front}_s)`; over seeds the mean of :math:`\log r_s` with a
paired t-interval (the seed fixes data order and init for every method alike), and a percentile bootstrap that
resamples the retain windows of half B (the same resample for every run). :func:`verdict` is the reading rule
written into ``docs/results.md`` before the E1 runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

__all__ = ["Point", "Ratio", "envelope", "front_weights", "points_of", "ratios", "summarize_ratio", "verdict"]


@dataclasses.dataclass(frozen=True)
class Point:
    """One evaluated checkpoint: its task loss and per-window retain KL sums and token counts."""

    task: float
    kl_sums: np.ndarray
    tokens: np.ndarray
    label: str = ""
    step: int = 0

    def kl(self, windows: np.ndarray) -> float:
        return float(self.kl_sums[windows].sum() / self.tokens[windows].sum())


def points_of(record: Mapping[str, Any]) -> list[Point]:
    """Every evaluated checkpoint of a run record (``record["checkpoints"]``) as :class:`Point` s."""
    label = record["run"]["label"]
    return [
        Point(
            task=float(c["metrics"]["task_loss"]),
            kl_sums=np.asarray(c["retain_kl_sums"], np.float64),
            tokens=np.asarray(c["retain_tokens"], np.float64),
            label=label,
            step=int(c["step"]),
        )
        for c in record["checkpoints"]
    ]


def envelope(points: Sequence[Point], half_a: np.ndarray) -> list[Point]:
    """The points no other point beats on both task loss and :math:`F_A` (lower is better), sorted by task loss.

    Examples:
      >>> a = np.array([0])
      >>> p = lambda t, f: Point(t, np.array([f]), np.array([1.0]))
      >>> [(q.task, q.kl(a)) for q in envelope([p(3.0, 0.1), p(1.0, 0.5), p(2.0, 0.6), p(6.0, 0.0)], a)]
      [(1.0, 0.5), (3.0, 0.1), (6.0, 0.0)]
    """
    f = [p.kl(half_a) for p in points]

    def beaten(i: int) -> bool:
        ti, fi = points[i].task, f[i]
        return any(
            points[j].task <= ti and f[j] <= fi and (points[j].task < ti or f[j] < fi) for j in range(len(points))
        )

    return sorted((points[i] for i in range(len(points)) if not beaten(i)), key=lambda p: p.task)


def front_weights(env: Sequence[Point], task: float) -> tuple[int, int, float] | None:
    """``(lo, hi, w)``: the envelope points around ``task`` and the weight of ``hi`` (``None`` outside its range)."""
    xs = [p.task for p in env]
    if not env or task < xs[0] or task > xs[-1]:
        return None
    hi = int(np.searchsorted(xs, task, side="left"))
    if xs[hi] == task:
        return hi, hi, 0.0
    lo = hi - 1
    return lo, hi, (task - xs[lo]) / (xs[hi] - xs[lo])


def _interpolate(f_lo: np.ndarray, f_hi: np.ndarray, w: float) -> np.ndarray:
    # Geometric between positive values (it lies below the chord, so a convex front is not overstated as much);
    # linear where one end is the base model's F = 0.
    with np.errstate(divide="ignore", invalid="ignore"):
        geometric = np.exp((1 - w) * np.log(f_lo) + w * np.log(f_hi))
    return np.where((f_lo > 0) & (f_hi > 0), geometric, (1 - w) * f_lo + w * f_hi)


@dataclasses.dataclass(frozen=True)
class Ratio:
    """:math:`r_s` of one method run against the front of its seed (``r`` is ``None`` outside the front's range)."""

    seed: int
    r: float | None
    f_method: float
    f_front: float | None
    task: float
    front_points: int  # envelope points chosen on half A
    front_lrs: int  # constant-lr runs the front was built from
    boot: np.ndarray | None = None  # r under each bootstrap resample of half B


def ratios(
    method: Mapping[int, Point],
    front: Mapping[int, Sequence[Point]],
    halves: tuple[np.ndarray, np.ndarray],
    *,
    boot: int = 0,
    rng_seed: int = 0,
) -> list[Ratio]:
    """:math:`r_s` for each seed of ``method`` (seed -> its final checkpoint) against ``front`` (seed -> every
    checkpoint of that seed's constant-lr runs, base included), with ``boot`` bootstrap resamples of half B."""
    half_a, half_b = halves
    counts = None
    if boot:
        # One resample of half B's windows (as counts) per row, shared by every run and seed: a paired bootstrap.
        rng = np.random.default_rng(rng_seed)
        counts = rng.multinomial(len(half_b), np.full(len(half_b), 1 / len(half_b)), size=boot).astype(np.float64)

    def f_boot(p: Point) -> np.ndarray:
        return (counts @ p.kl_sums[half_b]) / (counts @ p.tokens[half_b])

    out = []
    for seed, point in method.items():
        env = envelope(front.get(seed, []), half_a)
        where = front_weights(env, point.task)
        f_method = point.kl(half_b)
        lrs = len({p.label for p in front.get(seed, []) if p.step > 0})
        if where is None:
            out.append(Ratio(seed, None, f_method, None, point.task, len(env), lrs))
            continue
        lo, hi, w = where
        f_front = float(_interpolate(np.array(env[lo].kl(half_b)), np.array(env[hi].kl(half_b)), w))
        boot_r = None
        if counts is not None:
            boot_r = f_boot(point) / _interpolate(f_boot(env[lo]), f_boot(env[hi]), w)
        r = f_method / f_front if f_front > 0 else None
        out.append(Ratio(seed, r, f_method, f_front, point.task, len(env), lrs, boot_r))
    return out


def summarize_ratio(rs: Sequence[Ratio], level: float = 0.95) -> dict[str, Any]:
    """Geometric mean of r over seeds, its paired t-interval, the window-bootstrap interval and the verdict."""
    valid = [x for x in rs if x.r is not None and x.r > 0]
    out: dict[str, Any] = {
        "n": len(valid),
        "seeds": [x.seed for x in valid],
        "outside_front": [x.seed for x in rs if x.r is None and x.front_lrs > 0],
        "no_front": [x.seed for x in rs if x.front_lrs == 0],
        "per_seed": [x.r for x in valid],
        "r": None,
        "t_interval": None,
        "boot_interval": None,
    }
    if not valid:
        out["verdict"] = verdict(None, None, 0)
        return out
    logs = np.log([x.r for x in valid])
    out["r"] = float(np.exp(logs.mean()))
    alpha = (1 - level) / 2
    if len(valid) >= 2:
        half = scipy_stats.t.ppf(1 - alpha, len(valid) - 1) * logs.std(ddof=1) / math.sqrt(len(valid))
        out["t_interval"] = [float(np.exp(logs.mean() - half)), float(np.exp(logs.mean() + half))]
    if all(x.boot is not None for x in valid):
        with np.errstate(divide="ignore", invalid="ignore"):
            boot_logs = np.mean([np.log(x.boot) for x in valid], axis=0)
        boot_logs = boot_logs[np.isfinite(boot_logs)]
        if boot_logs.size:
            lo, hi = np.quantile(boot_logs, [alpha, 1 - alpha])
            out["boot_interval"] = [float(np.exp(lo)), float(np.exp(hi))]
    bounds = [b for b in (out["t_interval"], out["boot_interval"]) if b is not None]
    lo = min(b[0] for b in bounds) if out["t_interval"] else None
    hi = max(b[1] for b in bounds) if out["t_interval"] else None
    out["interval"] = [lo, hi] if lo is not None else None
    out["verdict"] = verdict(lo, hi, len(valid))
    return out


def verdict(lo: float | None, hi: float | None, n: int) -> str:
    """The reading rule (pre-registered in ``docs/results.md``), applied to the union of the t-interval over seeds
    and the window-bootstrap interval of r.

    Examples:
      >>> verdict(0.70, 0.85, 3), verdict(0.93, 1.08, 3), verdict(0.80, 1.05, 3), verdict(1.2, 1.5, 3)
      ('beats the front', 'on the front', 'inconclusive', 'above the front')
      >>> verdict(None, None, 1)
      'incomplete (1 seed)'
    """
    if n < 2 or lo is None or hi is None:
        return f"incomplete ({n} seed{'s' if n != 1 else ''})"
    if hi < 0.90:
        return "beats the front"
    if lo >= 0.90 and hi <= 1.10:
        return "on the front"
    if lo > 1.10:
        return "above the front"
    return "inconclusive"

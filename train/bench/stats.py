"""Timing arithmetic of runners measured side by side: turns, summaries, ratios of medians, throughput and MFU.

Plain Python over step times (no jax), so every number the benchmark reports can be checked from given timings.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from models import flops as flops_lib

__all__ = ["interleaved", "ratio_of_medians", "step_result", "summarize_times", "throughput", "timed_steps"]


def summarize_times(times: Sequence[float]) -> dict[str, float]:
    """Median, spread and extremes of step times (seconds).

    ``spread`` is the interquartile range relative to the median (0.02 = the middle half of the steps lies within
    a 2% band).
    """
    if not times:
        raise ValueError("summarize_times needs at least one time")
    xs = sorted(float(t) for t in times)
    median = statistics.median(xs)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {
        "n": len(xs),
        "median_s": median,
        "mean_s": statistics.fmean(xs),
        "min_s": xs[0],
        "max_s": xs[-1],
        "iqr_s": q3 - q1,
        "spread": (q3 - q1) / median if median > 0 else 0.0,
    }


def timed_steps(step: Callable[[], None], n: int, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Runs ``step`` ``n`` times and returns each call's seconds."""
    out = []
    for _ in range(n):
        start = clock()
        step()
        out.append(clock() - start)
    return out


def interleaved(
    steps: Mapping[str, Callable[[], None]],
    *,
    rounds: int,
    steps_per_round: int,
    progress: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[list[float]]]:
    """Times every runner's step in turns: round r runs A x k, B x k, ... and records each step's seconds.

    Args:
      steps: name -> a function that runs one step to completion (blocks until the device is done).
      rounds: number of A B ... rounds.
      steps_per_round: consecutive steps per runner per round.
      progress: called with a short description before each runner's turn.
      clock: the time source (a parameter so tests can drive it).

    Returns:
      name -> ``[rounds][steps_per_round]`` step times in seconds.
    """
    times: dict[str, list[list[float]]] = {name: [] for name in steps}
    for r in range(rounds):
        for name, step in steps.items():
            if progress is not None:
                progress(f"round {r + 1}/{rounds}: {name}")
            times[name].append(timed_steps(step, steps_per_round, clock))
    return times


def ratio_of_medians(numerator: Sequence[Sequence[float]], denominator: Sequence[Sequence[float]]) -> dict[str, Any]:
    """``median(numerator) / median(denominator)`` over all steps, and the per-round ratios as its spread.

    Both arguments are ``[rounds][steps]`` times from :func:`interleaved`, so round r of each ran back to back.
    """
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("ratio_of_medians needs the same non-zero number of rounds on both sides")
    flat_n = [t for rnd in numerator for t in rnd]
    flat_d = [t for rnd in denominator for t in rnd]
    per_round = [statistics.median(n) / statistics.median(d) for n, d in zip(numerator, denominator)]
    return {
        "ratio": statistics.median(flat_n) / statistics.median(flat_d),
        "round_ratios": per_round,
        "low": min(per_round),
        "high": max(per_round),
    }


def throughput(tokens_per_step: int, flops_per_step: float, step_s: float, peak_flops_per_s: float | None) -> dict:
    """Tokens/s, achieved FLOP/s and MFU from a step time."""
    if step_s <= 0:
        raise ValueError(f"step time must be positive, got {step_s}")
    out = {
        "tokens_per_s": tokens_per_step / step_s,
        "achieved_flops_per_s": flops_per_step / step_s,
        "mfu": None,
    }
    if peak_flops_per_s:
        out["mfu"] = flops_lib.mfu(flops_per_step, step_s, peak_flops_per_s)
    return out


def step_result(
    name: str,
    compile_s: float | None,
    times: Sequence[Sequence[float]],
    info: Mapping[str, Any],
    *,
    tokens: int,
    step_flops: float,
    peak: float | None,
) -> dict[str, Any]:
    """One runner's entry of the result: its compile time, the summary of its ``[rounds][steps]`` times, the
    per-round medians, throughput and MFU, then the runner's own ``info``."""
    summary = summarize_times([t for rnd in times for t in rnd])
    return {
        "name": name,
        "compile_s": compile_s,
        **summary,
        "round_medians_s": [statistics.median(r) for r in times],
        **throughput(tokens, step_flops, summary["median_s"], peak),
        **info,
    }

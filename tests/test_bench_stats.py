"""The benchmark's arithmetic from given timings and results: summaries, MFU, ratios of medians, turns, targets."""

from __future__ import annotations

import statistics

import pytest

from models import flops as flops_lib
from train.bench.report import check_targets
from train.bench.stats import interleaved, ratio_of_medians, summarize_times, throughput


def test_summary_mfu_and_ratios_from_given_timings():
    s = summarize_times([1.0, 4.0, 2.0, 3.0, 100.0])
    assert s["median_s"] == 3.0 and s["min_s"] == 1.0 and s["max_s"] == 100.0 and s["n"] == 5
    assert s["iqr_s"] == 4.0 - 2.0 and s["spread"] == pytest.approx(2.0 / 3.0)

    t = throughput(tokens_per_step=2048, flops_per_step=2e12, step_s=4.0, peak_flops_per_s=1e12)
    assert t == {"tokens_per_s": 512.0, "achieved_flops_per_s": 5e11, "mfu": 0.5}
    assert throughput(10, 1.0, 2.0, None)["mfu"] is None
    assert flops_lib.mfu(3e12, 2.0, 2e12) == 0.75

    finch = [[1.02, 1.04], [1.10, 1.00]]
    adamw = [[1.00, 1.00], [1.00, 1.20]]
    r = ratio_of_medians(finch, adamw)
    assert r["ratio"] == pytest.approx(statistics.median([1.02, 1.04, 1.10, 1.00]) / 1.0)
    assert r["round_ratios"] == pytest.approx([1.03, 1.05 / 1.10])
    assert r["low"] == pytest.approx(1.05 / 1.10) and r["high"] == pytest.approx(1.03)
    with pytest.raises(ValueError):
        ratio_of_medians([[1.0]], [[1.0], [2.0]])


def test_interleaved_takes_turns_and_times_each_step():
    calls, now = [], [0.0]
    durations = {"A": 1.0, "B": 3.0}

    def make(name):
        def step():
            calls.append(name)
            now[0] += durations[name]

        return step

    times = interleaved({"A": make("A"), "B": make("B")}, rounds=3, steps_per_round=2, clock=lambda: now[0])
    assert calls == ["A", "A", "B", "B"] * 3
    assert times == {"A": [[1.0, 1.0]] * 3, "B": [[3.0, 3.0]] * 3}
    assert ratio_of_medians(times["B"], times["A"])["ratio"] == 3.0


def test_targets_from_a_given_result():
    runner = {"name": "jax finch_adamw", "mfu": 0.77, "compiled_memory": {"temp_size_in_bytes": 2.5e9}}
    result = {
        "meta": {"backend": "cpu"},
        "flops": {"tokens_per_step": 2048},
        "runners": [runner],
        "ratios": {
            "finch_over_adamw_step_time": {"ratio": 1.02},
            "jax_over_torch_eager_tokens_per_s": {"ratio": 0.85},
            "jax_over_torch_compile_tokens_per_s": {"ratio": 0.7},
        },
    }
    t = check_targets(result)
    assert t["finch_over_adamw_le_1.01"] == {"value": 1.02, "met": False}
    assert t["jax_over_torch_eager_ge_0.65"] == {"value": 0.85, "met": True}
    assert t["mfu_ge_0.75_of_measured_peak"] == {"value": 0.77, "met": True, "applies": True}
    assert t["temp_le_2GB"] == {"value": 2.5e9, "met": False, "applies": True}
    # on an accelerator the MFU target is against the chip's published peak
    runner["mfu_spec"] = 0.3
    result["meta"]["backend"] = "gpu"
    assert check_targets(result)["mfu_ge_0.45_of_spec_peak"] == {"value": 0.3, "met": False, "applies": True}
    assert check_targets({"runners": []})["jax_over_torch_eager_ge_0.65"] is None

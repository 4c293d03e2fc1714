"""The constant-lr front and r: envelope chosen on half A and read on half B, geometric interpolation, the paired
t-interval, the window bootstrap and the pre-registered reading rule."""

import math

import numpy as np
import pytest
from scipy import stats

from train.lab import front
from train.lab.front import Point

HALVES = (np.array([0, 2]), np.array([1, 3]))  # windows 0, 2 are half A; 1, 3 half B


def _p(task, kl_a, kl_b, label="c", step=12):
    """A checkpoint whose two A windows both have KL kl_a and both B windows kl_b (one token each)."""
    return Point(task, np.array([kl_a, kl_b, kl_a, kl_b], float), np.ones(4), label, step)


BASE = _p(6.0, 0.0, 0.0, "base", 0)


def test_envelope_is_chosen_on_half_a_and_read_on_half_b():
    lucky = _p(2.0, 0.10, 0.50)  # looks best on A, is poor on B
    honest = _p(2.0, 0.20, 0.20)
    env = front.envelope([BASE, lucky, honest, _p(1.0, 0.4, 0.4)], HALVES[0])
    assert [p.task for p in env] == [1.0, 2.0, 6.0] and env[1] is lucky
    # A method exactly at the lucky point's task loss is read against the lucky point's B value, not its A value.
    (r,) = front.ratios({0: _p(2.0, 0.9, 0.25)}, {0: [BASE, lucky, honest, _p(1.0, 0.4, 0.4)]}, HALVES)
    assert r.f_front == pytest.approx(0.50) and r.r == pytest.approx(0.5)


def test_front_is_interpolated_geometrically_and_linearly_next_to_the_base_model():
    pts = [BASE, _p(4.0, 0.1, 0.1), _p(2.0, 0.4, 0.4)]
    (mid,) = front.ratios({0: _p(3.0, 0.2, 0.2)}, {0: pts}, HALVES)
    assert mid.f_front == pytest.approx(math.sqrt(0.1 * 0.4))  # below the chord's 0.25
    (near_base,) = front.ratios({0: _p(5.0, 0.05, 0.05)}, {0: pts}, HALVES)
    assert near_base.f_front == pytest.approx(0.05)  # linear between 0 (base, task 6) and 0.1 (task 4)
    (outside,) = front.ratios({0: _p(1.0, 0.5, 0.5)}, {0: pts}, HALVES)
    assert outside.r is None and outside.front_lrs == 1
    assert front.front_weights([], 3.0) is None


def test_ratio_summary_t_interval_bootstrap_and_verdict():
    fronts = {s: [BASE, _p(4.0, 0.1, 0.1), _p(2.0, 0.4, 0.4)] for s in range(3)}
    method = {s: _p(2.0, 0.3, 0.4 * f) for s, f in enumerate((0.8, 0.85, 0.9))}
    rs = front.ratios(method, fronts, HALVES, boot=200, rng_seed=1)
    summary = front.summarize_ratio(rs)
    logs = np.log([0.8, 0.85, 0.9])
    half = stats.t.ppf(0.975, 2) * logs.std(ddof=1) / math.sqrt(3)
    assert summary["r"] == pytest.approx(math.exp(logs.mean()))
    assert summary["t_interval"] == pytest.approx([math.exp(logs.mean() - half), math.exp(logs.mean() + half)])
    # Every B window of a method and its front moves together here, so every resample gives the same r.
    assert summary["boot_interval"] == pytest.approx([summary["r"]] * 2)
    assert summary["interval"] == pytest.approx(summary["t_interval"])
    assert summary["verdict"] == front.verdict(*summary["t_interval"], 3)


def test_bootstrap_resamples_windows_and_is_shared_by_every_run():
    rng = np.random.default_rng(0)
    windows = 20
    halves = (np.arange(0, windows, 2), np.arange(1, windows, 2))
    f_front = rng.uniform(0.1, 0.5, windows)

    def point(task, kl):
        return Point(task, kl, np.ones(windows), "c", 12)

    same = point(3.0, f_front.copy())
    pts = [point(6.0, np.zeros(windows)), point(3.0, f_front), point(1.0, f_front * 3)]
    (r,) = front.ratios({0: same}, {0: pts}, halves, boot=100)
    np.testing.assert_allclose(r.boot, 1.0)  # a method equal to the front is 1 in every resample
    noisy = point(3.0, f_front * rng.uniform(0.5, 1.5, windows))
    (r,) = front.ratios({0: noisy}, {0: pts}, halves, boot=500)
    lo, hi = np.quantile(r.boot, [0.025, 0.975])
    assert lo < r.r < hi and hi - lo > 0.05


def test_summary_with_one_seed_or_outside_the_front():
    fronts = {0: [BASE, _p(4.0, 0.1, 0.1)]}
    one = front.summarize_ratio(front.ratios({0: _p(5.0, 0.01, 0.01)}, fronts, HALVES))
    assert one["n"] == 1 and one["t_interval"] is None and one["verdict"] == "incomplete (1 seed)"
    none = front.summarize_ratio(front.ratios({0: _p(1.0, 0.1, 0.1)}, fronts, HALVES))
    assert none["r"] is None and none["outside_front"] == [0] and none["verdict"] == "incomplete (0 seeds)"


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [
        (0.5, 0.899, "beats the front"),
        (0.5, 0.90, "inconclusive"),
        (0.90, 1.10, "on the front"),
        (0.899, 1.0, "inconclusive"),
        (1.0, 1.101, "inconclusive"),
        (1.101, 2.0, "above the front"),
    ],
)
def test_reading_rule_boundaries(lo, hi, expected):
    assert front.verdict(lo, hi, 3) == expected

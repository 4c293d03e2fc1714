"""Metrics of the forgetting lab against hand-computed values, plus invariants (hypothesis)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from train.lab import metrics as em
from train.step import token_loss_sums


def test_token_loss_sums_hand_computed():
    # Row 0: uniform over 4 tokens -> NLL ln 4 at each of 2 positions; row 1 masked out entirely.
    logits = jnp.zeros((2, 2, 4))
    batch = {
        "tokens": jnp.zeros((2, 2), jnp.int32),
        "positions": jnp.zeros((2, 2), jnp.int32),
        "segment_ids": jnp.ones((2, 2), jnp.int32),
        "targets": jnp.array([[1, 3], [0, 0]]),
        "loss_mask": jnp.array([[1.0, 1.0], [0.0, 0.0]]),
    }
    total, count = token_loss_sums(lambda params, *_: logits, None, batch)
    assert float(count) == 2.0
    assert float(total) == pytest.approx(2 * math.log(4), rel=1e-6)
    assert em.perplexity(float(total / count)) == pytest.approx(4.0, rel=1e-6)


def test_kl_hand_computed_per_position():
    base = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1]]]))
    tuned = jnp.log(jnp.array([[[0.25, 0.75], [0.1, 0.9]]]))
    # KL(p||q) at position 0 = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3).
    kl = np.asarray(em.token_kl(base, tuned))
    assert kl.shape == (1, 2)
    assert kl[0, 0] == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)
    assert kl[0, 1] == pytest.approx(0.9 * math.log(9) + 0.1 * math.log(1 / 9), rel=1e-5)
    # Direction matters: KL(base||tuned) weights by the base distribution; tuned logits need not be normalised.
    asym = float(em.token_kl(jnp.log(jnp.array([[[0.5, 0.5]]])), jnp.log(jnp.array([[[0.9, 0.1]]])) + 3.0)[0, 0])
    assert asym == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), rel=1e-5)
    reverse = float(em.token_kl(jnp.log(jnp.array([[[0.9, 0.1]]])), jnp.log(jnp.array([[[0.5, 0.5]]])))[0, 0])
    assert reverse == pytest.approx(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5), rel=1e-5)
    assert abs(asym - reverse) > 0.1


def test_multiple_choice_length_normalisation():
    ll = np.array([[-6.0, -4.0, -9.0, -8.0]])
    lengths = np.array([[3, 1, 6, 2]])
    norm = em.score_multiple_choice(ll, lengths, np.array([2]))
    np.testing.assert_allclose(norm.scores, [[-2.0, -4.0, -1.5, -4.0]])
    assert norm.predictions.tolist() == [2] and norm.accuracy == 1.0
    # The probabilities are the model's own, normalised over the choices: not length-normalised.
    expected = np.exp(ll[0]) / np.exp(ll[0]).sum()
    np.testing.assert_allclose(norm.probs[0], expected, rtol=1e-12)
    raw = em.score_multiple_choice(ll, lengths, np.array([2]), length_normalize=False)
    assert raw.predictions.tolist() == [1] and raw.accuracy == 0.0


def test_multiple_choice_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shapes"):
        em.score_multiple_choice(np.zeros((2, 4)), np.ones((2, 3)), np.zeros(2, int))
    with pytest.raises(ValueError, match="positive"):
        em.score_multiple_choice(np.zeros((1, 2)), np.array([[1, 0]]), np.zeros(1, int))


def test_ece_equal_count_bins_hand_computed():
    # 4 items, at most 2 bins of >= 2 items: sorted confidences [0.3, 0.62 | 0.85, 0.95].
    conf = np.array([0.95, 0.85, 0.62, 0.3])
    correct = np.array([True, False, True, True])
    low = abs(1.0 - (0.3 + 0.62) / 2)
    high = abs(0.5 - (0.85 + 0.95) / 2)
    assert em.expected_calibration_error(conf, correct, 10, min_per_bin=2) == pytest.approx((low + high) / 2)
    # One item per bin when allowed: the mean of |correct - confidence|.
    assert em.expected_calibration_error(conf, correct, 10, min_per_bin=1) == pytest.approx(
        (0.05 + 0.85 + 0.38 + 0.7) / 4
    )
    # Too few items for 2 bins of 3: one bin, |mean acc - mean conf|.
    assert em.expected_calibration_error(conf, correct, 10, min_per_bin=3) == pytest.approx(abs(0.75 - conf.mean()))


def test_ece_bins_hold_at_least_min_per_bin():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.25, 1.0, 256)
    correct = rng.uniform(size=256) < conf  # calibrated by construction
    ece = em.expected_calibration_error(conf, correct, 10, min_per_bin=10)
    assert 0.0 <= ece < 0.1
    # 25 items: at most 2 bins of >= 10, never 10 bins of 2-3 items.
    small = em.expected_calibration_error(conf[:25], correct[:25], 10, min_per_bin=10)
    halves = np.array_split(np.argsort(conf[:25], kind="stable"), 2)
    expected = sum(len(h) / 25 * abs(correct[:25][h].mean() - conf[:25][h].mean()) for h in halves)
    assert small == pytest.approx(expected)


def test_brier_hand_computed():
    probs = np.array([[0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25]])
    # item 0: 0.3² + 0.2² + 0.1² = 0.14; item 1: 0.75² + 3 · 0.25² = 0.75.
    assert em.brier_score(probs, np.array([0, 1])) == pytest.approx((0.14 + 0.75) / 2)


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(np.float64, st.tuples(st.integers(1, 6), st.just(4)), elements=st.floats(-30, 0)),
    st.integers(0, 3),
)
def test_mc_probabilities_and_calibration_bounds(ll, label):
    labels = np.full(ll.shape[0], label)
    mc = em.score_multiple_choice(ll, np.ones_like(ll), labels)
    np.testing.assert_allclose(mc.probs.sum(axis=1), 1.0, rtol=1e-9)
    conf = mc.probs[np.arange(len(labels)), mc.predictions]
    assert 0.0 <= em.expected_calibration_error(conf, mc.correct) <= 1.0
    assert 0.0 <= em.brier_score(mc.probs, labels) <= 2.0


@settings(max_examples=25, deadline=None)
@given(
    hnp.arrays(np.float32, (2, 3, 5), elements=st.floats(-8, 8, width=32)),
    hnp.arrays(np.float32, (2, 3, 5), elements=st.floats(-8, 8, width=32)),
)
def test_kl_nonnegative_and_zero_on_itself(a, b):
    base = jnp.asarray(a) - jax.nn.logsumexp(jnp.asarray(a), axis=-1, keepdims=True)
    assert float(em.token_kl(base, jnp.asarray(b)).min()) >= -1e-5
    assert float(jnp.abs(em.token_kl(base, jnp.asarray(a))).max()) < 1e-5


def test_common_facts_are_four_choice_items_with_the_answer_among_them():
    from train.lab import known

    items = known.common_fact_items(seed=0)
    assert len(items) == sum(len(v) for v in known.COMMON_FACTS.values())
    for item in items:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
        prompt_answers = dict(known.COMMON_FACTS[item.table])
        assert item.choices[item.label] == prompt_answers[item.prompt]


def test_known_share_counts_only_what_the_base_knew():
    from train.lab import known

    base = [True, True, True, False, True]
    tuned = [True, False, True, True, True]  # lost one of the four known; learned one it did not know (not counted)
    out = known.known_share(base, tuned)
    assert out["known"] == 4 and out["kept"] == 0.75 and out["points_lost"] == 25.0
    assert out["se"] == pytest.approx((0.75 * 0.25 / 4) ** 0.5)

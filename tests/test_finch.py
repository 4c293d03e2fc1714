"""FINCH's math against a NumPy float64 reference, its invariants, and its handling of bad input."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import finch_optax
from finch_optax import _finch

RTOL = 2e-6  # float32 arithmetic against a float64 reference.


# --------------------------------------------------------------------------------------------------------------
# The reference: the formula of the issue, written independently of the implementation, in float64.
# --------------------------------------------------------------------------------------------------------------


def reference_finch(
    losses: Sequence[float],
    base_learning_rate: float | Callable[[int], float],
    max_learning_rate: float | Callable[[int], float],
    *,
    ema_decay: float = 0.9,
    min_loss: float = 0.0,
    eps: float = 1e-8,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-update (learning rate applied, running loss); a non-finite loss applies lr 0 and keeps the state."""
    at = lambda h, t: float(h(t)) if callable(h) else float(h)
    ema, count, lr_state = 0.0, 0, 0.0
    applied, emas = [], []
    for loss in losses:
        if not math.isfinite(loss):
            applied.append(0.0)
            emas.append(ema)
            continue
        ema = loss if count == 0 else ema_decay * ema + (1.0 - ema_decay) * loss
        below_cap = at(base_learning_rate, count) / math.sqrt(max(ema - min_loss, 0.0) + eps)
        lr_state = min(at(max_learning_rate, count), below_cap)
        count += 1
        applied.append(lr_state)
        emas.append(ema)
    return np.asarray(applied), np.asarray(emas)


def run_finch(tx: optax.GradientTransformationExtraArgs, losses: Sequence[float], grad: np.ndarray):
    """Feeds ``grad`` with each loss through ``tx``; returns updates, states per step (jitted once)."""
    params = jnp.zeros_like(jnp.asarray(grad))
    update = jax.jit(lambda g, s, v: tx.update(g, s, params, value=v))
    state = tx.init(params)
    updates, states = [], []
    for loss in losses:
        u, state = update(jnp.asarray(grad), state, jnp.float32(loss))
        updates.append(np.asarray(u, np.float64))
        states.append(jax.device_get(state))
    return np.stack(updates), states


def assert_matches_reference(tx, losses, grad, **reference_kwargs) -> None:
    """The applied update is -lr_ref * grad and the state's lr/EMA equal the reference at every step."""
    updates, states = run_finch(tx, losses, grad)
    lr_ref, ema_ref = reference_finch(losses, **reference_kwargs)
    np.testing.assert_allclose(updates, -lr_ref[:, None] * grad[None, :], rtol=RTOL, atol=0)
    accepted = np.isfinite(losses)
    lr_state = np.array([s.learning_rate for s in states], np.float64)
    ema_state = np.array([s.ema_loss for s in states], np.float64)
    np.testing.assert_allclose(lr_state[accepted], lr_ref[accepted], rtol=RTOL)
    np.testing.assert_allclose(ema_state, ema_ref, rtol=RTOL)


GRAD = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
LOSSES = [3.2, 2.9, 2.0, 2.4, 1.1, 0.7, 0.3, 0.05, 0.01, 0.2]


# --------------------------------------------------------------------------------------------------------------
# Exact math
# --------------------------------------------------------------------------------------------------------------


def test_first_update_uses_the_raw_loss():
    tx = finch_optax.scale_by_finch(0.01, 1.0)
    updates, states = run_finch(tx, [4.0], GRAD)
    np.testing.assert_allclose(updates[0], -0.01 / math.sqrt(4.0 + 1e-8) * GRAD, rtol=RTOL)
    assert float(states[0].ema_loss) == 4.0 and int(states[0].count) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(base_learning_rate=0.01, max_learning_rate=0.02),  # hits the cap once the loss is below 0.25
        dict(base_learning_rate=0.01, max_learning_rate=0.02, ema_decay=0.0),  # raw per-batch loss
        dict(base_learning_rate=0.01, max_learning_rate=0.02, ema_decay=0.5, min_loss=0.25),  # clamp too
        dict(base_learning_rate=3e-4, max_learning_rate=1e-2, ema_decay=0.99, eps=1e-3),
        dict(base_learning_rate=0.01, max_learning_rate=0.1, min_loss=-1.0),
    ],
)
def test_multi_step_matches_numpy_reference(kwargs):
    tx = finch_optax.scale_by_finch(**kwargs)
    assert_matches_reference(tx, LOSSES, GRAD, **kwargs)


def test_schedules_for_base_and_cap_match_reference():
    base = optax.linear_schedule(0.0, 0.02, transition_steps=4)  # also warm up the base rate
    cap = optax.warmup_cosine_decay_schedule(0.0, 0.05, warmup_steps=3, decay_steps=10, end_value=0.001)
    tx = finch_optax.scale_by_finch(base, cap, ema_decay=0.8)
    assert_matches_reference(tx, LOSSES, GRAD, base_learning_rate=base, max_learning_rate=cap, ema_decay=0.8)


def test_schedules_are_indexed_by_accepted_updates():
    cap = lambda count: 0.01 * (count + 1)
    tx = finch_optax.scale_by_finch(1e3, cap)  # always at the cap, so lr = cap(count)
    losses = [1.0, float("nan"), 1.0, float("inf"), 1.0]
    updates, states = run_finch(tx, losses, GRAD)
    np.testing.assert_allclose(updates[:, 0], [-0.01, 0.0, -0.02, 0.0, -0.03], rtol=RTOL)
    assert [int(s.count) for s in states] == [1, 1, 2, 2, 3]
    assert [int(s.skipped) for s in states] == [0, 1, 1, 2, 2]


def test_learning_rate_state_starts_at_zero():
    state = finch_optax.scale_by_finch(1e-3, 1e-2).init(jnp.zeros(3))
    assert float(finch_optax.current_learning_rate(state)) == 0.0
    assert int(state.count) == 0 and int(state.skipped) == 0


def test_negative_excess_loss_is_clamped():
    # Lbar - min_loss = -0.5 is clamped to 0: lr = min(cap, base / sqrt(eps)).
    tx = finch_optax.scale_by_finch(1e-3, 5.0, min_loss=1.0, eps=1e-4)
    updates, states = run_finch(tx, [0.5], GRAD)
    np.testing.assert_allclose(float(states[0].learning_rate), 1e-3 / math.sqrt(1e-4), rtol=RTOL)


def test_base_learning_rate_for_target_loss_reaches_cap_at_target():
    lr_max, target = 2e-4, 0.3
    base = finch_optax.base_learning_rate_for_target_loss(lr_max, target)
    lr_at = lambda loss: float(finch_optax.finch_learning_rate(loss, base, lr_max))
    np.testing.assert_allclose(lr_at(target), lr_max, rtol=RTOL)
    np.testing.assert_allclose(lr_at(4 * target), lr_max / 2, rtol=RTOL)  # sqrt: 4x the loss, half the rate
    assert lr_at(target / 10) == pytest.approx(lr_max, rel=1e-6)  # capped below the target
    with pytest.raises(ValueError, match="target_loss"):
        finch_optax.base_learning_rate_for_target_loss(lr_max, 0.0)


# --------------------------------------------------------------------------------------------------------------
# The suite catches broken formulas: each mutant below makes the reference comparison fail.
# --------------------------------------------------------------------------------------------------------------


def _lr_without_sqrt(ema, base, cap, *, min_loss=0.0, eps=1e-8):
    return jnp.minimum(jnp.float32(cap), jnp.float32(base) / (jnp.maximum(ema - min_loss, 0.0) + eps))


def _lr_ignoring_cap(ema, base, cap, *, min_loss=0.0, eps=1e-8):
    return jnp.float32(base) / jnp.sqrt(jnp.maximum(ema - min_loss, 0.0) + eps)


def _lr_min_loss_sign_flipped(ema, base, cap, *, min_loss=0.0, eps=1e-8):
    return jnp.minimum(jnp.float32(cap), jnp.float32(base) / jnp.sqrt(jnp.maximum(ema + min_loss, 0.0) + eps))


def _ema_weights_swapped(ema, loss, decay, *, is_first):
    return jnp.where(is_first, loss, (1.0 - decay) * ema + decay * loss)


def _ema_never_seeded(ema, loss, decay, *, is_first):
    return decay * ema + (1.0 - decay) * loss


@pytest.mark.parametrize(
    "target, mutant",
    [
        ("finch_learning_rate", _lr_without_sqrt),
        ("finch_learning_rate", _lr_ignoring_cap),
        ("finch_learning_rate", _lr_min_loss_sign_flipped),
        ("running_loss", _ema_weights_swapped),
        ("running_loss", _ema_never_seeded),
    ],
    ids=["sqrt-removed", "cap-ignored", "min_loss-sign-flipped", "ema-weights-swapped", "ema-not-seeded"],
)
def test_reference_comparison_catches_mutant(monkeypatch, target, mutant):
    monkeypatch.setattr(_finch, target, mutant)
    kwargs = dict(base_learning_rate=0.01, max_learning_rate=0.02, ema_decay=0.4, min_loss=0.05)
    tx = finch_optax.scale_by_finch(0.01, 0.02, ema_decay=0.4, min_loss=0.05)
    with pytest.raises(AssertionError):
        assert_matches_reference(tx, LOSSES, GRAD, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Invariants (hypothesis). One jitted scan, compiled once; hyperparameters are injected as data.
# --------------------------------------------------------------------------------------------------------------

_NUM_STEPS = 6
_injected = optax.inject_hyperparams(finch_optax.scale_by_finch)(
    base_learning_rate=1.0, max_learning_rate=1.0, ema_decay=0.9, min_loss=0.0, eps=1e-8
)


@jax.jit
def _lr_trace(losses, base, cap, decay, min_loss):
    """Learning rate and running loss after each of ``losses``, for injected hyperparameters."""
    params = jnp.zeros(2)
    state = _injected.init(params)
    hyper = dict(state.hyperparams, base_learning_rate=base, max_learning_rate=cap, ema_decay=decay, min_loss=min_loss)
    state = state._replace(hyperparams=hyper)

    def step(state, loss):
        _, state = _injected.update(jnp.ones(2), state, params, value=loss)
        return state, (state.inner_state.learning_rate, state.inner_state.ema_loss)

    return jax.lax.scan(step, state, losses)[1]


_loss = st.floats(0.0, 1e4, allow_nan=False, width=32)
_rate = st.floats(float(np.float32(1e-6)), 1.0, width=32)
_decay = st.floats(0.0, float(np.float32(0.99)), width=32)


@settings(max_examples=40, deadline=None)
@given(
    losses=st.lists(_loss, min_size=_NUM_STEPS, max_size=_NUM_STEPS),
    base=_rate,
    cap=_rate,
    decay=_decay,
    min_loss=st.floats(0.0, 2.0, width=32),
)
def test_property_lr_in_range_and_bounded_by_base(losses, base, cap, decay, min_loss):
    f32 = np.float32
    losses32 = jnp.asarray(losses, jnp.float32)
    lr, ema = map(np.asarray, _lr_trace(losses32, f32(base), f32(cap), f32(decay), f32(min_loss)))
    assert np.all(lr > 0) and np.all(lr <= f32(cap))
    below_cap = lr < f32(cap)
    # lr * sqrt(Lbar - min_loss) <= base whenever the cap is not active (float32 rounding aside).
    excess = np.maximum(ema.astype(np.float64) - float(f32(min_loss)), 0.0)
    assert np.all(lr[below_cap].astype(np.float64) * np.sqrt(excess[below_cap]) <= base * (1 + 1e-5))

    # With min_loss = 0 (no cancellation in Lbar - min_loss) it matches the float64 reference all along.
    lr, ema = map(np.asarray, _lr_trace(losses32, f32(base), f32(cap), f32(decay), f32(0.0)))
    lr_ref, ema_ref = reference_finch(
        [float(f32(x)) for x in losses], float(f32(base)), float(f32(cap)), ema_decay=float(f32(decay))
    )
    np.testing.assert_allclose(lr, lr_ref, rtol=1e-5)
    np.testing.assert_allclose(ema, ema_ref, rtol=1e-5, atol=1e-30)


@settings(max_examples=40, deadline=None)
@given(prefix=st.lists(_loss, min_size=_NUM_STEPS - 1, max_size=_NUM_STEPS - 1), a=_loss, b=_loss, decay=_decay)
def test_property_lr_non_increasing_in_loss(prefix, a, b, decay):
    low, high = sorted([a, b])
    f32 = np.float32
    trace = lambda last: np.asarray(
        _lr_trace(jnp.asarray(prefix + [last], jnp.float32), f32(1e-3), f32(0.05), f32(decay), f32(0.0))[0]
    )[-1]
    assert trace(low) >= trace(high)


# --------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------


def test_missing_value_raises_type_error_naming_value():
    tx = finch_optax.scale_by_finch(1e-3, 1e-2)
    params = jnp.zeros(3)
    with pytest.raises(TypeError, match=r"value=loss.*GradientTransformationExtraArgs"):
        tx.update(params, tx.init(params), params)


def test_missing_value_inside_chain_raises_type_error():
    tx = finch_optax.finch_adamw(1e-3, 1e-2)
    params = jnp.zeros(3)
    with pytest.raises(TypeError, match=r"value=loss"):
        jax.jit(lambda s: tx.update(params, s, params))(tx.init(params))


@pytest.mark.parametrize("shape", [(1,), (4,), (2, 3)])
def test_non_scalar_value_raises_at_trace_time(shape):
    tx = finch_optax.scale_by_finch(1e-3, 1e-2)
    params = jnp.zeros(3)
    traced = jax.jit(lambda s, v: tx.update(params, s, params, value=v))
    with pytest.raises(ValueError, match=r"scalar loss.*" + re.escape(str(shape))):
        traced(tx.init(params), jnp.ones(shape))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_value_zeroes_update_and_keeps_state(bad):
    tx = finch_optax.finch_adamw(1e-2, 1e-1)
    params = jnp.array([1.0, -1.0])
    update = jax.jit(lambda g, s, v: tx.update(g, s, params, value=v))
    state = tx.init(params)
    _, state = update(jnp.ones(2), state, jnp.float32(2.0))
    before = state
    # A NaN loss usually comes with NaN gradients: still nothing non-finite may reach the params or the state.
    updates, state = update(jnp.full(2, jnp.nan), state, jnp.float32(bad))
    np.testing.assert_array_equal(np.asarray(updates), 0.0)
    jax.tree.map(np.testing.assert_array_equal, state.inner_state, before.inner_state)  # Adam's moments too
    assert tuple(map(int, finch_optax.skip_counts(state))) == (1, 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_scale_by_finch_alone_zeroes_update_and_counts_the_skip(bad):
    tx = finch_optax.scale_by_finch(1e-2, 1e-1)
    params = jnp.array([1.0, -1.0])
    update = jax.jit(lambda g, s, v: tx.update(g, s, params, value=v))
    _, before = update(jnp.ones(2), tx.init(params), jnp.float32(2.0))
    updates, after = update(jnp.full(2, jnp.nan), before, jnp.float32(bad))
    np.testing.assert_array_equal(np.asarray(updates), 0.0)
    jax.tree.map(np.testing.assert_array_equal, after._replace(skipped=before.skipped), before)
    assert int(after.skipped) == int(before.skipped) + 1


def test_skipped_count_saturates_like_optax():
    tx = finch_optax.scale_by_finch(1e-2, 1e-1)
    params = jnp.ones(2)
    top = jnp.iinfo(jnp.int32).max
    state = tx.init(params)._replace(skipped=jnp.int32(top))
    _, state = jax.jit(lambda s: tx.update(jnp.ones(2), s, params, value=jnp.float32(jnp.nan)))(state)
    assert int(state.skipped) == top and state.skipped.dtype == jnp.int32


def test_loss_is_read_at_the_params_precision():
    # A finite loss beyond float32's range is inf for float32 params (skipped), and an ordinary loss for float64.
    tx = finch_optax.scale_by_finch(1e-2, 1e-1)
    _, state = tx.update(jnp.ones(2), tx.init(jnp.ones(2)), value=1e39)
    assert int(state.skipped) == 1 and state.ema_loss.dtype == jnp.float32
    with jax.enable_x64(True):
        params = jnp.ones(2, jnp.float64)
        updates, state = tx.update(jnp.ones(2, jnp.float64), tx.init(params), params, value=1e39)
        assert int(state.skipped) == 0 and state.ema_loss.dtype == state.learning_rate.dtype == jnp.float64
        assert float(state.learning_rate) == pytest.approx(1e-2 / math.sqrt(1e39), rel=1e-14)
        assert updates.dtype == jnp.float64


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(base_learning_rate=0.0), "base_learning_rate"),
        (dict(base_learning_rate=-1e-3), "base_learning_rate"),
        (dict(max_learning_rate=0.0), "max_learning_rate"),
        (dict(max_learning_rate=float("nan")), "max_learning_rate"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(ema_decay=-0.1), "ema_decay"),
        (dict(eps=0.0), "eps"),
        (dict(eps=-1e-8), "eps"),
        (dict(min_loss=float("inf")), "min_loss"),
        (dict(ema_decay=np.float32(1.5)), "ema_decay"),
    ],
)
def test_bad_python_hyperparameters_raise_at_construction(kwargs, field):
    args = dict(base_learning_rate=1e-3, max_learning_rate=1e-2) | kwargs
    with pytest.raises(ValueError, match=field):
        finch_optax.scale_by_finch(**args)
    adamw_args = {("finch_eps" if name == "eps" else name): value for name, value in args.items()}
    with pytest.raises(ValueError, match=field):
        finch_optax.finch_adamw(**adamw_args)


def test_hyperparameter_of_wrong_type_raises_type_error():
    with pytest.raises(TypeError, match="base_learning_rate"):
        finch_optax.scale_by_finch(None, 1e-2)
    with pytest.raises(TypeError, match="max_learning_rate"):
        finch_optax.scale_by_finch(1e-3, "1e-2")
    with pytest.raises(TypeError, match="ema_decay"):  # only the two rates take schedules
        finch_optax.scale_by_finch(1e-3, 1e-2, ema_decay=optax.constant_schedule(0.9))


def test_traced_hyperparameters_are_not_python_checked():
    # inject_hyperparams passes arrays (traced under jit); construction must not try to bool() them.
    tx = optax.inject_hyperparams(finch_optax.scale_by_finch)(base_learning_rate=1e-3, max_learning_rate=1e-2)
    params = jnp.zeros(2)
    step = jax.jit(lambda s, v: tx.update(jnp.ones(2), s, params, value=v))
    updates, _ = step(tx.init(params), jnp.float32(1.0))
    np.testing.assert_allclose(np.asarray(updates), -1e-3 / math.sqrt(1.0 + 1e-8), rtol=RTOL)

"""skip_nonfinite: a step with a NaN/inf loss (or gradient) leaves the whole optimizer as if it never happened."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import finch_optax

NAN = float("nan")


def _params():
    return {"w": jnp.asarray(np.linspace(-1.0, 1.0, 6).reshape(2, 3), jnp.float32), "b": jnp.asarray([0.5, -0.25])}


def _grads(step: int):
    rng = np.random.default_rng(step)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), _params())


def _nan_like(tree):
    return jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), tree)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


# Optimizers of every kind the training stack wraps: FINCH or not, stateful, scheduled, injected.
WRAPPED = {
    "adamw": lambda: optax.adamw(optax.linear_schedule(1e-2, 1e-3, 10), weight_decay=0.1),
    "sgd_momentum": lambda: optax.sgd(1e-2, momentum=0.9),
    "injected_adamw": lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=optax.cosine_decay_schedule(1e-2, 9)),
    "finch_lion": lambda: optax.chain(optax.scale_by_lion(), finch_optax.scale_by_finch(1e-2, 1e-1)),
    "clip_finch_momentum": lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.trace(0.9), finch_optax.scale_by_finch(1e-2, 1e-1)
    ),
}


def _trajectory(tx, schedule):
    """Runs ``tx`` on ``schedule``, a list of step indices or ``None`` for a NaN-loss, NaN-gradient step."""
    step = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v))
    params = _params()
    state = tx.init(params)
    updates_seen = []
    for i in schedule:
        if i is None:
            updates, state = step(_nan_like(params), state, params, jnp.float32(NAN))
        else:
            updates, state = step(_grads(i), state, params, jnp.float32(1.0 + 0.1 * i))
        updates_seen.append(updates)
        params = optax.apply_updates(params, updates)
    return params, state, updates_seen


# --------------------------------------------------------------------------------------------------------------
# Issue #10, point 1: a NaN loss must not poison the chain
# --------------------------------------------------------------------------------------------------------------


def test_issue_reproduction_finch_adamw_recovers_after_a_nan_loss():
    t = finch_optax.finch_adamw(1e-3, 1e-2)
    p = jnp.ones(2)
    s = t.init(p)
    _, s = t.update(p, s, p, value=1.0)
    _, s = t.update(p * jnp.nan, s, p, value=jnp.nan)
    after_nan, _ = t.update(p, s, p, value=1.0)

    clean = t.init(p)
    _, clean = t.update(p, clean, p, value=1.0)
    never_nan, _ = t.update(p, clean, p, value=1.0)
    assert bool(jnp.all(jnp.isfinite(after_nan)))
    np.testing.assert_array_equal(after_nan, never_nan)


@pytest.mark.parametrize("name", sorted(WRAPPED))
def test_skipped_step_leaves_any_optimizer_as_if_it_never_happened(name):
    tx = finch_optax.skip_nonfinite(WRAPPED[name]())
    params_bad, state_bad, updates_bad = _trajectory(tx, [0, 1, None, None, 2, 3])
    params_ok, state_ok, _ = _trajectory(tx, [0, 1, 2, 3])
    for updates in updates_bad[2:4]:
        assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    _assert_trees_equal(params_bad, params_ok)
    _assert_trees_equal(state_bad.inner_state, state_ok.inner_state)  # counts, moments, schedules, injected rates
    assert tuple(map(int, finch_optax.skip_counts(state_bad))) == (2, 0)


def test_skipped_step_keeps_the_inner_state_bit_for_bit():
    tx = finch_optax.finch_adamw(1e-2, 1e-1)
    _, before, _ = _trajectory(tx, [0, 1])
    _, after, _ = _trajectory(tx, [0, 1, None])
    _assert_trees_equal(after.inner_state, before.inner_state)


def test_counts_total_and_consecutive_skips():
    tx = finch_optax.finch_adamw(1e-2, 1e-1)
    step = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v))
    params = _params()
    state, counts = tx.init(params), []
    for grads, loss in [(_nan_like(params), NAN), (_grads(0), NAN), (_grads(0), 1.0), (_nan_like(params), 1.0)]:
        _, state = step(grads, state, params, jnp.float32(loss))
        counts.append(tuple(map(int, finch_optax.skip_counts(state))))
    assert counts == [(1, 1), (2, 2), (2, 0), (3, 1)]


def test_nan_gradients_with_a_finite_loss_are_skipped_unless_check_updates_is_off():
    params = _params()
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.inf), _grads(0))
    checked = finch_optax.skip_nonfinite(optax.adam(1e-2))
    updates, state = checked.update(bad, checked.init(params), params, value=1.0)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    assert int(finch_optax.skip_counts(state).skipped) == 1

    loss_only = finch_optax.skip_nonfinite(optax.adam(1e-2), check_updates=False)
    updates, state = loss_only.update(bad, loss_only.init(params), params, value=1.0)
    assert not all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    assert int(finch_optax.skip_counts(state).skipped) == 0
    with pytest.raises(TypeError, match="value=loss"):
        loss_only.update(bad, loss_only.init(params), params)


def test_without_value_only_the_updates_are_checked():
    tx = finch_optax.skip_nonfinite(optax.sgd(0.1))
    params = jnp.ones(2)
    updates, state = tx.update(jnp.ones(2), tx.init(params), params)
    np.testing.assert_allclose(updates, -0.1)
    updates, state = tx.update(jnp.array([1.0, jnp.nan]), state, params)
    np.testing.assert_array_equal(updates, 0.0)
    assert int(finch_optax.skip_counts(state).skipped) == 1


def test_extra_args_reach_the_inner_transformation():
    seen = {}

    def update(updates, state, params=None, **extra_args):
        seen.update(extra_args)
        return updates, state

    inner = optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)
    tx = finch_optax.skip_nonfinite(inner)
    params = jnp.ones(2)
    tx.update(jnp.ones(2), tx.init(params), params, value=2.0, batch_index=7)
    assert float(seen["value"]) == 2.0 and seen["batch_index"] == 7
    # A plain GradientTransformation (no extra args) is wrapped too; the extra args are dropped for it.
    plain = finch_optax.skip_nonfinite(optax.scale(2.0))
    updates, _ = plain.update(jnp.ones(2), plain.init(params), params, value=2.0, batch_index=7)
    np.testing.assert_array_equal(updates, 2.0)


def test_counters_saturate_like_optax():
    tx = finch_optax.finch_adamw(1e-2, 1e-1)
    params = jnp.ones(2)
    top = jnp.iinfo(jnp.int32).max
    state = tx.init(params)._replace(skipped=jnp.int32(top), consecutive_skips=jnp.int32(top))
    _, state = tx.update(jnp.ones(2), state, params, value=jnp.nan)
    assert tuple(map(int, finch_optax.skip_counts(state))) == (top, top)


# --------------------------------------------------------------------------------------------------------------
# skip_counts: found anywhere, once
# --------------------------------------------------------------------------------------------------------------


def test_skip_counts_reads_the_outermost_wrapper_through_any_nesting():
    params = jnp.ones(2)
    tx = optax.MultiSteps(finch_optax.skip_nonfinite(finch_optax.finch_adamw(1e-2, 1e-1)), every_k_schedule=1)
    state = tx.init(params)
    _, state = tx.update(jnp.ones(2), state, params, value=jnp.nan)
    assert tuple(map(int, finch_optax.skip_counts(state))) == (1, 1)
    assert int(state.inner_opt_state.inner_state.skipped) == 0  # kept whole by the outer wrapper

    state = jax.jit(lambda s: tx.update(jnp.ones(2), s, params, value=1.0)[1])(state)
    assert tuple(map(int, finch_optax.skip_counts(state))) == (1, 0)


def test_skip_counts_raises_when_absent_or_ambiguous():
    params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match="no SkipNonfiniteState"):
        finch_optax.skip_counts(optax.adamw(1e-3).init(params))
    two = optax.multi_transform(
        {"x": finch_optax.finch_adamw(1e-2, 1.0), "y": finch_optax.finch_adamw(1e-3, 1.0)}, {"a": "x", "b": "y"}
    )
    with pytest.raises(ValueError, match="2 SkipNonfiniteStates"):
        finch_optax.skip_counts(two.init(params))


def test_skip_counts_in_flax_nnx_optimizer():
    from flax import nnx

    class Linear(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.asarray([1.0, -2.0]))

    model = Linear()
    optimizer = nnx.Optimizer(model, finch_optax.finch_adamw(1e-2, 1.0), wrt=nnx.Param)
    optimizer.update(model, nnx.state(model, nnx.Param), value=jnp.float32(jnp.nan))
    for state in (optimizer.opt_state, nnx.state(optimizer)):  # the live tree and its flattened State
        assert tuple(map(int, finch_optax.skip_counts(state))) == (1, 1)


# --------------------------------------------------------------------------------------------------------------
# Inside jit with sharded params (8 simulated CPU devices, tests/conftest.py)
# --------------------------------------------------------------------------------------------------------------


def test_sharded_skip_keeps_shardings_and_state():
    if jax.device_count() < 8:
        pytest.fail("needs 8 devices: tests/conftest.py sets --xla_force_host_platform_device_count=8")
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):
        params = {"w": jax.device_put(jnp.ones((4, 16)), NamedSharding(mesh, P(None, "x")))}
        tx = finch_optax.skip_nonfinite(optax.adamw(1e-2))
        state = jax.jit(tx.init)(params)
        step = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v))
        _, state = step(jax.tree.map(lambda p: p * 0.5, params), state, params, jnp.float32(2.0))
        updates, skipped = step(_nan_like(params), state, params, jnp.float32(jnp.nan))
        assert jax.tree.map(jax.typeof, skipped) == jax.tree.map(jax.typeof, state)
        for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(skipped)):
            assert after.sharding.is_equivalent_to(before.sharding, before.ndim)
        _assert_trees_equal(skipped.inner_state, state.inner_state)
        assert updates["w"].sharding.is_equivalent_to(params["w"].sharding, 2)
        np.testing.assert_array_equal(np.asarray(updates["w"]), 0.0)
        assert int(finch_optax.skip_counts(skipped).skipped) == 1


# --------------------------------------------------------------------------------------------------------------
# Issue #10, point 2: gradients through a skipped step stay finite (the double-where pattern)
# --------------------------------------------------------------------------------------------------------------


def _meta_loss(make_tx, rate, bad_step: int | None):
    """Final loss of 4 unrolled steps on a parabola, as a function of a learning-rate hyperparameter.

    At ``bad_step`` the loss and the gradients are replaced by NaN constants: the optimizer must add no NaN to the
    gradient. (A NaN computed *from* the params, e.g. by a NaN in the data, is the loss function's own trap.)
    """
    target = jnp.array([1.0, -2.0, 0.5])
    loss_fn = lambda p: jnp.sum((p - target) ** 2)
    tx = make_tx(rate)
    params = jnp.zeros(3)
    state = tx.init(params)
    for i in range(5 if bad_step is not None else 4):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        if i == bad_step:
            loss, grads = jnp.full_like(loss, jnp.nan), jnp.full_like(grads, jnp.nan)
        updates, state = tx.update(grads, state, params, value=loss)
        params = optax.apply_updates(params, updates)
    return loss_fn(params)


META = {
    "scale_by_finch": lambda r: finch_optax.scale_by_finch(r, 1.0),  # FINCH alone: its own where must be double
    "finch_adamw": lambda r: finch_optax.finch_adamw(r, 1.0),
    "skip(adam)": lambda r: finch_optax.skip_nonfinite(optax.adam(r)),
}


@pytest.mark.parametrize("name", sorted(META))
def test_meta_gradient_through_a_skipped_step_is_finite_and_unchanged(name):
    grad_with_bad = jax.jit(jax.grad(lambda r: _meta_loss(META[name], r, bad_step=2)))(0.05)
    grad_clean = jax.jit(jax.grad(lambda r: _meta_loss(META[name], r, bad_step=None)))(0.05)
    assert math.isfinite(float(grad_with_bad))
    np.testing.assert_allclose(float(grad_with_bad), float(grad_clean), rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Issue #10, point 5: bad `value` types, huge losses
# --------------------------------------------------------------------------------------------------------------


LOSS_TAKERS = {
    "scale_by_finch": lambda: finch_optax.scale_by_finch(1e-2, 1e-1),
    "skip(adam)": lambda: finch_optax.skip_nonfinite(optax.adam(1e-2)),
    "finch_adamw": lambda: finch_optax.finch_adamw(1e-2, 1e-1),
}


@pytest.mark.parametrize("value", [True, jnp.bool_(False), 1.0 + 0j, jnp.complex64(2.0)], ids=str)
@pytest.mark.parametrize("name", sorted(LOSS_TAKERS))
def test_bool_or_complex_loss_is_a_type_error(name, value):
    tx = LOSS_TAKERS[name]()
    params = jnp.ones(2)
    with pytest.raises(TypeError, match="real scalar loss"):
        tx.update(jnp.ones(2), tx.init(params), params, value=value)


def test_non_scalar_loss_is_a_value_error():
    tx = finch_optax.skip_nonfinite(optax.adam(1e-2))
    params = jnp.ones(2)
    with pytest.raises(ValueError, match=r"scalar loss.*\(2,\)"):
        tx.update(jnp.ones(2), tx.init(params), params, value=jnp.ones(2))


@pytest.mark.filterwarnings("error")  # no numpy overflow warning either
def test_finite_loss_beyond_float32_is_skipped_with_float32_params_and_kept_with_float64():
    huge = 1e39  # finite as a Python float, inf in float32
    tx = finch_optax.finch_adamw(1e-2, 1e-1)
    params = jnp.ones(2, jnp.float32)
    updates, state = tx.update(jnp.ones(2), tx.init(params), params, value=huge)
    np.testing.assert_array_equal(updates, 0.0)
    assert int(finch_optax.skip_counts(state).skipped) == 1
    with jax.enable_x64(True):
        params = jnp.ones(2, jnp.float64)
        updates, state = tx.update(jnp.ones(2), tx.init(params), params, value=huge)
        assert int(finch_optax.skip_counts(state).skipped) == 0
        np.testing.assert_allclose(float(finch_optax.current_learning_rate(state)), 1e-2 / math.sqrt(huge), rtol=1e-12)

"""FINCH composed with optax: chains, directions, wrappers, jit/scan, dtypes, sharding, convergence."""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import finch_optax

RTOL = 2e-6


def _params(dtype=jnp.float32):
    return {"w": jnp.asarray(np.linspace(-1.0, 1.0, 12).reshape(3, 4), dtype), "b": jnp.asarray([0.5, -0.25], dtype)}


def _grads(step: int, dtype=jnp.float32):
    rng = np.random.default_rng(step)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), dtype), _params(dtype))


LOSSES = [2.5, 2.0, 1.2, 0.9, 0.4, 0.1]


def _expected_lr(losses, base, cap, ema_decay=0.9):
    ema = None
    out = []
    for loss in losses:
        ema = loss if ema is None else ema_decay * ema + (1 - ema_decay) * loss
        out.append(min(cap, base / math.sqrt(ema + 1e-8)))
    return out


# --------------------------------------------------------------------------------------------------------------
# FINCH scales any direction: chain(direction, finch) == -lr_t * direction
# --------------------------------------------------------------------------------------------------------------

DIRECTIONS = {
    "sgd": lambda: optax.identity(),
    "adam": lambda: optax.scale_by_adam(),
    "lion": lambda: optax.scale_by_lion(),
    "adafactor": lambda: optax.scale_by_factored_rms(min_dim_size_to_factor=2),
}


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_finch_scales_any_direction(name):
    direction = DIRECTIONS[name]()
    base, cap = 0.05, 0.08
    tx = optax.chain(DIRECTIONS[name](), finch_optax.scale_by_finch(base, cap))
    params = _params()
    d_state, state = direction.init(params), tx.init(params)
    direction_step = jax.jit(direction.update)
    finch_step = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v))
    for step, (loss, lr) in enumerate(zip(LOSSES, _expected_lr(LOSSES, base, cap))):
        grads = _grads(step)
        d_updates, d_state = direction_step(grads, d_state, params)
        updates, state = finch_step(grads, state, params, jnp.float32(loss))
        check = lambda u, d, lr=lr: np.testing.assert_allclose(u, -lr * np.asarray(d), rtol=RTOL, atol=1e-9)
        jax.tree.map(check, updates, d_updates)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(float(finch_optax.current_learning_rate(state)), lr, rtol=RTOL)


def test_named_chain_and_tree_get():
    tx = optax.named_chain(("adam", optax.scale_by_adam()), ("finch", finch_optax.scale_by_finch(0.01, 1.0)))
    params = _params()
    state = tx.init(params)
    _, state = tx.update(_grads(0), state, params, value=jnp.float32(4.0))
    found = optax.tree.get(state, "FinchState")
    assert isinstance(found, finch_optax.FinchState) and found is state["finch"]
    np.testing.assert_allclose(float(finch_optax.current_learning_rate(state)), 0.01 / 2.0, rtol=RTOL)
    assert [path for path, _ in finch_optax.find_finch_states(state)] == ["['finch']"]


# --------------------------------------------------------------------------------------------------------------
# finch_adamw is optax.adamw when FINCH is switched off
# --------------------------------------------------------------------------------------------------------------


def _run_side_by_side(reference, finch, dtype, cap_is_schedule):
    """Both optimizers on the same gradients for LOSSES; asserts their updates are equal bit for bit."""
    params_ref = params_finch = _params(dtype)
    state_ref, state_finch = reference.init(params_ref), finch.init(params_finch)
    # XLA's default backend optimisation (level 3), whatever the test session's XLA_FLAGS (conftest compiles at -O0,
    # where LLVM's unoptimised code rounds two different programs differently in the last bit): the claim is for
    # the programs users run.
    options = {"xla_backend_optimization_level": 3}
    step_ref = jax.jit(lambda g, s, p, v: reference.update(g, s, p, value=v), compiler_options=options)
    step_finch = jax.jit(lambda g, s, p, v: finch.update(g, s, p, value=v), compiler_options=options)
    for step, loss in enumerate(LOSSES):
        loss = jnp.asarray(loss, dtype)
        u_ref, state_ref = step_ref(_grads(step, dtype), state_ref, params_ref, loss)
        u_finch, state_finch = step_finch(_grads(step, dtype), state_finch, params_finch, loss)
        assert all(u.dtype == dtype for u in jax.tree.leaves(u_finch))
        jax.tree.map(np.testing.assert_array_equal, u_finch, u_ref)  # bit for bit
        params_ref = optax.apply_updates(params_ref, u_ref)
        params_finch = optax.apply_updates(params_finch, u_finch)
    return state_finch


@pytest.mark.parametrize("schedule", [False, True], ids=["constant", "schedule"])
@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_finch_adamw_equals_adamw_when_finch_is_off(schedule, x64):
    # FINCH's stage is optax's learning-rate stage at the params' precision, float64 included (issue #10, 3).
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        cap = optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=2, decay_steps=8) if schedule else 3e-3
        mask = {"w": True, "b": False}
        kwargs = dict(b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1, mask=mask)
        # The bare chain against optax.adamw itself...
        bare = optax.chain(
            optax.scale_by_adam(b1=0.8, b2=0.95, eps=1e-6),
            optax.add_decayed_weights(0.1, mask),
            finch_optax.scale_by_finch(1e30, cap),
        )
        state = _run_side_by_side(optax.with_extra_args_support(optax.adamw(cap, **kwargs)), bare, dtype, schedule)
        assert state[-1].learning_rate.dtype == state[-1].ema_loss.dtype == dtype
        # ...and finch_adamw against optax.adamw wrapped the same way (masking the inputs of a skipped step can
        # change how XLA fuses Adam's arithmetic, so only like is compared with like, bit for bit).
        _run_side_by_side(
            finch_optax.skip_nonfinite(optax.adamw(cap, **kwargs)),
            finch_optax.finch_adamw(1e30, cap, **kwargs),
            dtype,
            schedule,
        )


def test_finch_adamw_signature_is_optax_adamw_with_the_two_rates():
    ours = list(inspect.signature(finch_optax.finch_adamw).parameters.values())
    theirs = list(inspect.signature(optax.adamw).parameters.values())
    described = lambda params: [(p.name, p.kind, p.default) for p in params]
    assert [p.name for p in ours[:2]] == ["base_learning_rate", "max_learning_rate"]
    assert theirs[0].name == "learning_rate"
    # Same parameters, same order, same kinds and defaults (nesterov keyword-only in both)...
    assert described(ours[2 : 1 + len(theirs)]) == described(theirs[1:])
    # ...then FINCH's own, keyword-only.
    extras = ours[1 + len(theirs) :]
    assert [p.name for p in extras] == ["ema_decay", "min_loss", "finch_eps", "check_updates", "skip_nonfinite"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extras)


def test_finch_adamw_takes_optax_adamw_arguments_positionally():
    mask = {"w": True, "b": False}
    args = (0.8, 0.95, 1e-6, 1e-4, jnp.float32, 0.1, mask)  # b1, b2, eps, eps_root, mu_dtype, weight_decay, mask
    _run_side_by_side(
        finch_optax.skip_nonfinite(optax.adamw(3e-3, *args, nesterov=True)),
        finch_optax.finch_adamw(1e30, 3e-3, *args, nesterov=True),
        jnp.float32,
        False,
    )


# --------------------------------------------------------------------------------------------------------------
# Wrappers: inject_hyperparams, apply_if_finite, MultiSteps, masked
# --------------------------------------------------------------------------------------------------------------


def test_inject_hyperparams_under_jit_and_changing_a_hyperparameter():
    tx = optax.inject_hyperparams(finch_optax.finch_adamw)(base_learning_rate=1e-3, max_learning_rate=1.0)
    params = _params()
    step = jax.jit(lambda s, v: tx.update(_grads(0), s, params, value=v))
    state = tx.init(params)
    updates_1, state_1 = step(state, jnp.float32(4.0))
    np.testing.assert_allclose(float(finch_optax.current_learning_rate(state_1)), 1e-3 / 2.0, rtol=RTOL)
    # Double the base rate in the injected state: same compiled step, twice the update.
    doubled = state._replace(hyperparams=dict(state.hyperparams, base_learning_rate=jnp.float32(2e-3)))
    updates_2, state_2 = step(doubled, jnp.float32(4.0))
    np.testing.assert_allclose(float(finch_optax.current_learning_rate(state_2)), 2e-3 / 2.0, rtol=RTOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, 2 * np.asarray(a), rtol=1e-5), updates_1, updates_2)
    # The cap as an injected hyperparameter binds too.
    capped = state._replace(hyperparams=dict(state.hyperparams, max_learning_rate=jnp.float32(1e-4)))
    _, state_3 = step(capped, jnp.float32(4.0))
    np.testing.assert_allclose(float(finch_optax.current_learning_rate(state_3)), 1e-4, rtol=RTOL)


def test_inject_hyperparams_with_bf16_params_keeps_float32_state():
    # inject_hyperparams casts hyperparameters to the params' dtype (bf16 here); FINCH's state stays float32.
    tx = optax.inject_hyperparams(finch_optax.scale_by_finch)(base_learning_rate=1e-3, max_learning_rate=1.0)
    params = _params(jnp.bfloat16)
    state = tx.init(params)
    _, new_state = jax.jit(lambda s: tx.update(_grads(0, jnp.bfloat16), s, params, value=jnp.float32(4.0)))(state)
    assert jax.tree.map(jax.typeof, new_state.inner_state) == jax.tree.map(jax.typeof, state.inner_state)
    assert new_state.inner_state.learning_rate.dtype == jnp.float32


def _applied_rates(tx, losses):
    params = _params()
    step = jax.jit(lambda s, v: tx.update(_grads(0), s, params, value=v))
    state, rates = tx.init(params), []
    for loss in losses:
        updates, state = step(state, jnp.float32(loss))
        finite = all(bool(jnp.all(u != 0)) for u in jax.tree.leaves(updates))
        rates.append(float(finch_optax.current_learning_rate(state)) if finite else 0.0)
    return rates, state


SKIPPY_LOSSES = [1.0, float("nan"), 1.0, float("inf"), 1.0]


def test_inject_hyperparams_schedules_count_accepted_updates_when_wrapped_from_outside():
    cap = lambda count: 0.01 * (count + 1)  # FINCH always at the cap here, so the rate is cap(count)
    injected = optax.inject_hyperparams(finch_optax.scale_by_finch)(base_learning_rate=1e3, max_learning_rate=cap)
    rates, state = _applied_rates(finch_optax.skip_nonfinite(injected), SKIPPY_LOSSES)
    np.testing.assert_allclose(rates, [0.01, 0.0, 0.02, 0.0, 0.03], rtol=RTOL)
    inject_state = state.inner_state
    assert int(inject_state.count) == int(inject_state.inner_state.count) == 3
    assert tuple(map(int, finch_optax.skip_counts(state))) == (2, 0)


def test_inject_hyperparams_around_finch_adamw_counts_every_call():
    # What the docs say: inject_hyperparams' own count (and so its schedules) advances on skipped calls too,
    # while FINCH's count, inside finch_adamw's skip wrapper, counts accepted updates only.
    cap = lambda count: 0.01 * (count + 1)
    tx = optax.inject_hyperparams(finch_optax.finch_adamw)(base_learning_rate=1e3, max_learning_rate=cap)
    rates, state = _applied_rates(tx, SKIPPY_LOSSES)
    np.testing.assert_allclose(rates, [0.01, 0.0, 0.03, 0.0, 0.05], rtol=RTOL)
    assert int(state.count) == 5
    assert [int(s.count) for _, s in finch_optax.find_finch_states(state)] == [3]


def test_tree_set_learning_rate_changes_nothing_and_injected_rates_do():
    tx = finch_optax.finch_adamw(1e-3, 1e-2)
    params = _params()
    step = jax.jit(lambda s: tx.update(_grads(1), s, params, value=jnp.float32(4.0)))
    _, state = step(tx.init(params))
    poked = optax.tree.set(state, learning_rate=jnp.float32(1.0))  # writes FINCH's record of the last rate...
    jax.tree.map(np.testing.assert_array_equal, step(poked), step(state))  # ...and changes nothing
    # The way that works: inject the rates, then set them.
    injected = optax.inject_hyperparams(finch_optax.finch_adamw)(base_learning_rate=1e-3, max_learning_rate=1e-2)
    state = injected.init(params)
    state = optax.tree.set(state, max_learning_rate=jnp.float32(1e-4))
    _, state = injected.update(_grads(1), state, params, value=jnp.float32(4.0))
    np.testing.assert_allclose(float(finch_optax.current_learning_rate(state)), 1e-4, rtol=RTOL)


def test_apply_if_finite_skips_nan_gradients_and_keeps_finch_state():
    tx = optax.apply_if_finite(finch_optax.finch_adamw(1e-2, 1e-1), max_consecutive_errors=5)
    params = _params()
    step = jax.jit(lambda g, s, v: tx.update(g, s, params, value=v))
    state = tx.init(params)
    _, state = step(_grads(0), state, jnp.float32(1.0))
    before = optax.tree.get(state, "FinchState")
    nan_grads = jax.tree.map(lambda g: g.at[0].set(jnp.nan), _grads(1))
    updates, state = step(nan_grads, state, jnp.float32(0.5))
    after = optax.tree.get(state, "FinchState")
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    assert int(state.total_notfinite) == 1
    np.testing.assert_allclose(float(finch_optax.current_learning_rate(state)), 1e-2, rtol=RTOL)


def test_multi_steps_feeds_only_the_last_micro_batch_value():
    k = 3
    base, cap = 1e-2, 1.0
    tx = optax.MultiSteps(finch_optax.scale_by_finch(base, cap, ema_decay=0.0), every_k_schedule=k)
    params = _params()
    step = jax.jit(lambda g, s, v: tx.update(g, s, params, value=v))
    state = tx.init(params)
    micro_losses = [9.0, 4.0, 1.0]
    for i, loss in enumerate(micro_losses):
        updates, state = step(_grads(i), state, jnp.float32(loss))
    # The emitted update used the last micro-batch's loss (1.0), not the mean (4.67): lr = base / sqrt(1).
    np.testing.assert_allclose(float(finch_optax.current_learning_rate(state)), base / math.sqrt(1.0 + 1e-8), rtol=RTOL)
    mean_grads = jax.tree.map(lambda *g: sum(np.asarray(x) for x in g) / k, *[_grads(i) for i in range(k)])
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -base * g, rtol=1e-5), updates, mean_grads)

    # The documented recipe: pass the running mean of the window's losses, so the emitting call sees the mean.
    state = tx.init(params)
    for i in range(k):
        running_mean = sum(micro_losses[: i + 1]) / (i + 1)
        _, state = step(_grads(i), state, jnp.float32(running_mean))
    mean = sum(micro_losses) / k
    lr = float(finch_optax.current_learning_rate(state))
    np.testing.assert_allclose(lr, base / math.sqrt(mean + 1e-8), rtol=RTOL)


def test_masked_and_multiple_finch_states():
    params = _params()
    masked = optax.masked(finch_optax.finch_adamw(1e-2, 1.0), {"w": True, "b": False})
    state = masked.init(params)
    _, state = masked.update(_grads(0), state, params, value=jnp.float32(4.0))
    np.testing.assert_allclose(float(finch_optax.current_learning_rate(state)), 1e-2 / 2.0, rtol=RTOL)

    two = optax.multi_transform(
        {"fast": finch_optax.scale_by_finch(1e-2, 1.0), "slow": finch_optax.scale_by_finch(1e-3, 1.0)},
        {"w": "fast", "b": "slow"},
    )
    state = two.init(params)
    _, state = two.update(_grads(0), state, params, value=jnp.float32(4.0))
    with pytest.raises(ValueError, match=r"2 FinchStates.*find_finch_states"):
        finch_optax.current_learning_rate(state)
    rates = {path: float(s.learning_rate) for path, s in finch_optax.find_finch_states(state)}
    assert len(rates) == 2 and sorted(rates.values()) == pytest.approx([5e-4, 5e-3], rel=1e-6)

    with pytest.raises(ValueError, match="no FinchState"):
        finch_optax.current_learning_rate(optax.adamw(1e-3).init(params))


# --------------------------------------------------------------------------------------------------------------
# jit, scan, dtypes
# --------------------------------------------------------------------------------------------------------------


def test_jit_compiles_once_across_steps_and_with_unrelated_extra_args():
    tx = finch_optax.finch_adamw(1e-2, 1e-1)
    traces = []

    @jax.jit
    def step(params, state, grads, loss, other):
        traces.append(None)  # runs only when jax traces
        updates, state = tx.update(grads, state, params, value=loss, unrelated=other)
        return optax.apply_updates(params, updates), state

    params, state = _params(), tx.init(_params())
    plain = jax.jit(lambda p, s, g, v: tx.update(g, s, p, value=v))
    for i, loss in enumerate(LOSSES):
        expected_updates, _ = plain(params, state, _grads(i), jnp.float32(loss))
        new_params, state = step(params, state, _grads(i), jnp.float32(loss), jnp.int32(i))
        expected_params = optax.apply_updates(params, expected_updates)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new_params, expected_params)
        params = new_params
    assert len(traces) == 1


def test_lax_scan_matches_python_loop():
    tx = finch_optax.finch_adamw(1e-2, 5e-2)
    params0 = _params()
    grads = [_grads(i) for i in range(len(LOSSES))]
    losses = jnp.asarray(LOSSES, jnp.float32)

    def body(carry, xs):
        params, state = carry
        g, loss = xs
        updates, state = tx.update(g, state, params, value=loss)
        return (optax.apply_updates(params, updates), state), finch_optax.current_learning_rate(state)

    stacked = jax.tree.map(lambda *x: jnp.stack(x), *grads)
    run_scan = jax.jit(lambda carry, xs: jax.lax.scan(body, carry, xs))
    (scan_params, _), scan_lrs = run_scan((params0, tx.init(params0)), (stacked, losses))

    carry, loop_lrs = (params0, tx.init(params0)), []
    for g, loss in zip(grads, losses):
        carry, lr = body(carry, (g, loss))
        loop_lrs.append(float(lr))
    np.testing.assert_allclose(np.asarray(scan_lrs), loop_lrs, rtol=RTOL)
    np.testing.assert_allclose(np.asarray(scan_lrs), _expected_lr(LOSSES, 1e-2, 5e-2), rtol=RTOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), scan_params, carry[0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("loss_dtype", [jnp.float32, jnp.bfloat16, "python"])
def test_dtypes_are_fixed_and_never_weak(dtype, loss_dtype):
    tx = finch_optax.finch_adamw(1e-2, 1e-1)
    params = _params(dtype)
    state = tx.init(params)
    finch_state = optax.tree.get(state, "FinchState")
    assert [x.dtype for x in finch_state] == [jnp.int32, jnp.float32, jnp.float32, jnp.int32]
    loss = 1.5 if loss_dtype == "python" else jnp.asarray(1.5, loss_dtype)
    updates, new_state = jax.jit(lambda s, v: tx.update(_grads(0, dtype), s, params, value=v))(state, loss)
    # Same abstract type (dtype, shape, weak_type) for every state leaf before and after the update.
    assert jax.tree.map(jax.typeof, new_state) == jax.tree.map(jax.typeof, state)
    assert not any(jax.typeof(x).weak_type for x in jax.tree.leaves(new_state))
    assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


# --------------------------------------------------------------------------------------------------------------
# Sharding: 8 simulated CPU devices (tests/conftest.py)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_sharded_state_is_stable_and_finch_state_replicated(axis_type):
    if jax.device_count() < 8:
        pytest.fail("needs 8 devices: tests/conftest.py sets --xla_force_host_platform_device_count=8")
    kind = jax.sharding.AxisType.Explicit if axis_type == "explicit" else jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((8,), ("x",), axis_types=(kind,))
    with jax.set_mesh(mesh):
        column = NamedSharding(mesh, P(None, "x"))
        params = {
            "w": jax.device_put(jnp.ones((4, 16)), column),
            "b": jax.device_put(jnp.ones((16,)), NamedSharding(mesh, P("x"))),
        }
        grads = jax.tree.map(lambda p: p * 0.5, params)
        loss = jax.device_put(jnp.float32(2.0), NamedSharding(mesh, P()))
        tx = finch_optax.finch_adamw(1e-2, 1e-1)
        if axis_type == "auto":
            # Auto mode does not propagate shardings into zeros_like; say where the state lives, the usual way.
            replicated = NamedSharding(mesh, P())
            state_shardings = optax.tree.map_params(
                tx,
                lambda _, p: p.sharding,
                jax.eval_shape(tx.init, params),
                params,
                transform_non_params=lambda _: replicated,
            )
            state = jax.jit(tx.init, out_shardings=state_shardings)(params)
        else:  # Explicit mode: shardings are part of the types and propagate by themselves.
            state = jax.jit(tx.init)(params)
        step = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v))
        updates, new_state = step(grads, state, params, loss)
        _, newer_state = step(grads, new_state, params, loss)

        types = jax.tree.map(jax.typeof, state)
        assert jax.tree.map(jax.typeof, new_state) == types and jax.tree.map(jax.typeof, newer_state) == types
        for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(newer_state)):
            assert after.sharding.is_equivalent_to(before.sharding, before.ndim)
        for leaf in optax.tree.get(newer_state, "FinchState"):
            assert leaf.shape == () and leaf.sharding.is_fully_replicated
        # Adam's moments follow the params; the updates keep the params' sharding.
        assert state.inner_state[0].mu["w"].sharding.is_equivalent_to(column, 2)
        for leaf in finch_optax.skip_counts(newer_state):
            assert leaf.shape == () and leaf.sharding.is_fully_replicated
        assert updates["w"].sharding.is_equivalent_to(column, 2)
        lr = float(finch_optax.current_learning_rate(newer_state))
        np.testing.assert_allclose(lr, 1e-2 / math.sqrt(2.0), rtol=RTOL)


# --------------------------------------------------------------------------------------------------------------
# Convergence
# --------------------------------------------------------------------------------------------------------------


def test_finch_adamw_solves_logistic_regression():
    rng = np.random.default_rng(0)
    n, d = 256, 5
    x = rng.normal(size=(n, d))
    true_w = rng.normal(size=d)
    y = (rng.random(n) < 1 / (1 + np.exp(-(x @ true_w)))).astype(np.float64)  # noisy labels: a finite optimum

    # The optimum by Newton's method in float64, with a small L2 term so it is unique.
    l2 = 1e-2
    w = np.zeros(d)
    for _ in range(30):
        p = 1 / (1 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) / n + l2 * w
        hess = (x.T * (p * (1 - p))) @ x / n + l2 * np.eye(d)
        w -= np.linalg.solve(hess, grad)
    optimum = w

    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

    def loss_fn(w):
        logits = xj @ w
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, yj)) + 0.5 * l2 * jnp.sum(w**2)

    loss_at_optimum = float(loss_fn(jnp.asarray(optimum, jnp.float32)))
    # Reach the full rate near the optimum's loss; far from it FINCH takes smaller steps.
    base = finch_optax.base_learning_rate_for_target_loss(0.02, loss_at_optimum)
    tx = finch_optax.finch_adamw(base, optax.cosine_decay_schedule(0.02, 1500), weight_decay=0.0)

    def body(carry, _):
        w, state = carry
        loss, g = jax.value_and_grad(loss_fn)(w)
        updates, state = tx.update(g, state, w, value=loss)
        return (optax.apply_updates(w, updates), state), finch_optax.current_learning_rate(state)

    w0 = jnp.zeros(d, jnp.float32)
    (w_final, state), lrs = jax.jit(lambda c: jax.lax.scan(body, c, None, length=1500))((w0, tx.init(w0)))
    np.testing.assert_allclose(np.asarray(w_final), optimum, atol=2e-3)
    assert float(loss_fn(w_final)) - loss_at_optimum < 1e-5
    lrs = np.asarray(lrs)
    assert lrs[0] < 0.9 * 0.02  # started below the cap: the initial loss (log 2) is above the target


def test_current_learning_rate_in_flax_nnx_optimizer():
    from flax import nnx  # in the test extra; finch_optax itself never imports flax

    class Linear(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.asarray([1.0, -2.0]))

    model = Linear()
    optimizer = nnx.Optimizer(model, finch_optax.finch_adamw(1e-2, 1.0), wrt=nnx.Param)
    grads = nnx.state(model, nnx.Param)
    optimizer.update(model, grads, value=jnp.float32(4.0))
    for state in (optimizer.opt_state, nnx.state(optimizer)):  # the live tree and its flattened State
        lr = finch_optax.current_learning_rate(state)
        assert isinstance(lr, jax.Array)
        np.testing.assert_allclose(float(lr), 1e-2 / 2.0, rtol=RTOL)

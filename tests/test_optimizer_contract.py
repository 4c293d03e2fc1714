"""The contract every optimizer of :mod:`train.optimizers` keeps: one table, the same checks for all.

Modelled on optax's ``contrib/_common_test.py``. Each case is an ``OptimizerConfig`` built by
``make_optimizer`` exactly as a training run builds it, and must

* converge on a parabola and on Rosenbrock's function (optax's targets, steps and tolerances);
* give the same updates and state inside ``optax.inject_hyperparams``;
* keep its state's structure, dtypes and weak types across steps and under ``lax.cond``, for bf16/f32/f64 params;
* pass unrelated extra args through, and compile once;
* skip a step with a NaN loss and NaN gradients: the next step is finite and equal to a run that never saw it.

A new entry of ``OPTIMIZERS`` must add its row to ``HYPERPARAMETERS`` (checked below).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train.config import OptimizerConfig
from train.optimizers import OPTIMIZERS, make_optimizer

STEPS = 30_000  # optax's contract runs 30k steps and checks rtol = atol = 3e-2.
TOLERANCE = 3e-2

# name -> hyperparameters that reach the tolerance on both targets in STEPS steps. FINCH's base rate is set below
# the cap, so the loss-adaptive regime is crossed on the way down.
HYPERPARAMETERS: dict[str, dict] = {
    "finch_adamw": dict(max_learning_rate=1e-2, base_learning_rate=3e-3),
    "finch_adam": dict(max_learning_rate=1e-2, base_learning_rate=3e-3),
    "finch_sgd": dict(max_learning_rate=1.5e-3, base_learning_rate=4.5e-4),
    "finch_momentum": dict(max_learning_rate=1e-3, base_learning_rate=3e-4),
    "finch_lion": dict(max_learning_rate=1e-3, base_learning_rate=1e-2, b2=0.99),
    "finch_adafactor": dict(max_learning_rate=3e-3, base_learning_rate=3e-3),
    "adamw": dict(learning_rate=1e-2),
    "sgd": dict(learning_rate=1e-3),
}


def _schedule(schedule: str, learning_rate: float) -> dict:
    if schedule == "warmup_cosine":
        return dict(schedule=schedule, warmup_steps=100, decay_steps=STEPS)
    if schedule == "trace":  # a short ramp, then the last rate held
        return dict(schedule=schedule, lr_trace=(learning_rate / 10, learning_rate / 3, learning_rate))
    return dict(schedule=schedule)


def _cases() -> list:
    cases = []
    for name in sorted(OPTIMIZERS):
        hyper = HYPERPARAMETERS.get(name, {})
        schedules = ["constant"] if name.startswith("finch_") else ["constant", "warmup_cosine", "trace"]
        for schedule in schedules:
            config = dict(hyper, name=name, **_schedule(schedule, hyper.get("learning_rate", 1e-3)))
            cases.append(pytest.param(config, id=f"{name}-{schedule}"))
    # FINCH inside a warmup/decay envelope (the envelope scales both rates), and a clipped chain.
    finch_cosine = dict(HYPERPARAMETERS["finch_adamw"], base_learning_rate=3e-2, name="finch_adamw")
    cases.append(pytest.param(dict(finch_cosine, **_schedule("warmup_cosine", 1e-2)), id="finch_adamw-warmup_cosine"))
    cases.append(
        pytest.param(dict(HYPERPARAMETERS["finch_adam"], name="finch_adam", clip_norm=1.0), id="finch_adam-clip")
    )
    cases.append(pytest.param(dict(HYPERPARAMETERS["adamw"], name="adamw", clip_norm=1.0), id="adamw-clip"))
    return cases


CASES = _cases()


def _optimizer(config: dict) -> optax.GradientTransformationExtraArgs:
    return make_optimizer(OptimizerConfig(**config), total_steps=STEPS)


# optax's targets (contrib/_common_test.py), as (initial params, solution, loss).
def _parabola(dtype=jnp.float32):
    solution = jnp.array([1.0, -1.0, 1.0], dtype)
    return jnp.array([-1.0, 10.0, 1.0], dtype), solution, lambda p: jnp.sum((p - solution) ** 2)


def _rosenbrock(dtype=jnp.float32):
    a, b = 1.0, 100.0
    return jnp.zeros(2, dtype), jnp.array([a, a**2], dtype), lambda p: (a - p[0]) ** 2 + b * (p[1] - p[0] ** 2) ** 2


def _update_fn(tx, loss_fn: Callable, **extra_args):
    """``(params, state) -> (params, state, updates)``: one step on ``loss_fn``, the loss passed as ``value``."""

    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params, value=loss, **extra_args)
        return optax.apply_updates(params, updates), state, updates

    return step


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_every_registered_optimizer_has_a_row():
    assert set(OPTIMIZERS) == set(HYPERPARAMETERS), "add the new optimizer's hyperparameters to HYPERPARAMETERS"


@pytest.mark.parametrize("target", [_parabola, _rosenbrock], ids=["parabola", "rosenbrock"])
@pytest.mark.parametrize("config", CASES)
def test_converges(config, target):
    tx = _optimizer(config)
    params, solution, loss_fn = target()
    step = _update_fn(tx, loss_fn)

    def body(carry, _):
        return step(*carry)[:2], None

    params, _ = jax.jit(lambda c: jax.lax.scan(body, c, length=STEPS)[0])((params, tx.init(params)))
    np.testing.assert_allclose(params, solution, rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("config", CASES)
def test_same_result_inside_inject_hyperparams(config):
    cfg = OptimizerConfig(**config)

    # inject_hyperparams reads the factory's signature: one factory per set of rates an optimizer reads.
    def finch_factory(max_learning_rate, base_learning_rate):
        changed = dataclasses.replace(cfg, max_learning_rate=max_learning_rate, base_learning_rate=base_learning_rate)
        return make_optimizer(changed, total_steps=STEPS)

    def plain_factory(learning_rate):
        return make_optimizer(dataclasses.replace(cfg, learning_rate=learning_rate), total_steps=STEPS)

    if cfg.name.startswith("finch_"):
        injected = optax.inject_hyperparams(finch_factory)(
            max_learning_rate=cfg.max_learning_rate, base_learning_rate=cfg.base_learning_rate
        )
    else:
        injected = optax.inject_hyperparams(plain_factory)(learning_rate=cfg.learning_rate)
    plain = _optimizer(config)
    params, _, loss_fn = _parabola()
    # Not jitted: the registry may check its hyperparameters in Python, which needs them concrete.
    step_plain, step_injected = _update_fn(plain, loss_fn), _update_fn(injected, loss_fn)
    params_plain, state_plain = params, plain.init(params)
    params_injected, state_injected = params, injected.init(params)
    for _ in range(3):
        params_plain, state_plain, updates_plain = step_plain(params_plain, state_plain)
        params_injected, state_injected, updates_injected = step_injected(params_injected, state_injected)
        close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
        jax.tree.map(close, updates_injected, updates_plain)
        jax.tree.map(close, state_injected.inner_state, state_plain)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
@pytest.mark.parametrize("config", CASES)
def test_state_keeps_structure_and_dtypes(config, dtype):
    with jax.enable_x64(dtype == "float64"):
        dtype = jnp.dtype(dtype)
        tx = _optimizer(config)
        params, _, loss_fn = _parabola(dtype)

        @jax.jit
        def step(params, state):
            loss, grads = jax.value_and_grad(loss_fn)(params)
            loss = loss.astype(jnp.float16)  # a loss of another dtype than the params, on purpose
            # lax.cond needs both branches to return the same types: the update may not change any.
            pick = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            updates, state = jax.lax.cond(
                pick,
                lambda: tx.update(grads, state, params, value=loss),
                lambda: (jax.tree.map(jnp.zeros_like, params), state),
            )
            return optax.apply_updates(params, updates), state, updates

        state = tx.init(params)
        types = jax.tree.map(jax.typeof, state)
        for _ in range(2):
            params, state, updates = step(params, state)
            assert jax.tree.map(jax.typeof, state) == types
            assert params.dtype == dtype and updates.dtype == dtype


@pytest.mark.parametrize("config", CASES)
def test_passes_extra_args_and_compiles_once(config):
    tx = _optimizer(config)
    params, _, loss_fn = _rosenbrock()
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(None)  # runs only while jax traces
        return _update_fn(tx, loss_fn, unexpected_extra_arg_nobody_reads=1)(params, state)

    reference = jax.jit(_update_fn(tx, loss_fn))
    state = reference_state = tx.init(params)
    reference_params = params
    for _ in range(3):
        params, state, _ = step(params, state)
        reference_params, reference_state, _ = reference(reference_params, reference_state)
    assert len(traces) == 1, "the update recompiles: its state changes type between steps"
    _assert_trees_equal((params, state), (reference_params, reference_state))


@pytest.mark.parametrize("config", CASES)
def test_nan_loss_step_is_skipped(config):
    tx = _optimizer(config)
    params0, _, loss_fn = _rosenbrock()

    @jax.jit
    def update(params, state, grads, loss):
        updates, state = tx.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state, updates

    def run(bad_at: int | None):
        params, state = params0, tx.init(params0)
        seen = []
        for i in range(4 if bad_at is None else 5):
            loss, grads = jax.value_and_grad(loss_fn)(params)
            if i == bad_at:
                loss, grads = jnp.float32(jnp.nan), jnp.full_like(grads, jnp.nan)
            params, state, updates = update(params, state, grads, loss)
            seen.append(updates)
        return params, seen

    params_bad, updates_bad = run(bad_at=2)
    params_clean, updates_clean = run(bad_at=None)
    np.testing.assert_array_equal(updates_bad[2], 0.0)
    assert bool(jnp.all(jnp.isfinite(updates_bad[3]))), "the step after a NaN loss is not finite"
    np.testing.assert_array_equal(updates_bad[3], updates_clean[2])
    np.testing.assert_array_equal(params_bad, params_clean)

"""Optimizers by name: FINCH on top of an optax direction, and the baselines users compare it with.

==================  ==========================================================================================
name                chain
==================  ==========================================================================================
``finch_adamw``     ``finch_optax.finch_adamw`` (Adam direction, decoupled weight decay, FINCH lr) — default
``finch_adam``      ``scale_by_adam`` → ``scale_by_finch``
``finch_sgd``       ``scale_by_finch`` on the raw gradient
``finch_momentum``  ``trace(momentum)`` → ``scale_by_finch``
``finch_lion``      ``scale_by_lion`` → ``add_decayed_weights`` → ``scale_by_finch``
``finch_adafactor`` ``scale_by_factored_rms`` → ``scale_by_finch``
``adamw``           ``optax.adamw`` with a ``constant``, ``warmup_cosine`` or ``trace`` schedule
``sgd``             ``optax.sgd`` (with ``momentum``) and the same schedules
==================  ==========================================================================================

With ``clip_norm > 0`` every chain starts with ``clip_by_global_norm``. For FINCH, a ``warmup_cosine`` schedule
multiplies both ``lr_base`` and ``lr_max``, so FINCH's loss adaptation still acts within the warmup/decay envelope.
FINCH needs the loss at every update: ``tx.update(grads, state, params, value=loss)``; the non-FINCH chains accept and
ignore ``value`` so :mod:`train.step` can call every optimizer the same way. The plain optimizers run inside
``optax.inject_hyperparams``, so the rate each update applied is read back from the optimizer state
(:func:`applied_learning_rate`), as it is from FINCH's state. New optimizers are added to :data:`OPTIMIZERS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import finch_optax
from train.config import ConfigError, OptimizerConfig

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "applied_learning_rate",
    "is_finch",
    "make_optimizer",
    "make_schedule",
    "skip_metrics",
]

SCHEDULES = ("constant", "warmup_cosine", "trace")

# name -> builder(opt_cfg, total_steps) -> the optimizer without gradient clipping.
Builder = Callable[[OptimizerConfig, "int | None"], optax.GradientTransformation]
OPTIMIZERS: dict[str, Builder] = {}


def _register(name: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        OPTIMIZERS[name] = builder
        return builder

    return add


def is_finch(opt_cfg: OptimizerConfig) -> bool:
    """Whether the optimizer's learning rate comes from FINCH (and so needs ``value``)."""
    return opt_cfg.name.startswith("finch_")


def _validate(opt_cfg: OptimizerConfig, total_steps: int | None) -> None:
    if opt_cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name={opt_cfg.name!r} is unknown; valid names: {', '.join(OPTIMIZERS)}")
    if opt_cfg.schedule not in SCHEDULES:
        raise ConfigError(f"optimizer.schedule={opt_cfg.schedule!r} is unknown; valid: {', '.join(SCHEDULES)}")
    if opt_cfg.schedule == "trace":
        if is_finch(opt_cfg):
            raise ConfigError("optimizer.schedule=trace replays a fixed lr list; it is for adamw/sgd, not FINCH")
        if not opt_cfg.lr_trace:
            raise ConfigError("optimizer.schedule=trace needs optimizer.lr_trace (one learning rate per step)")
        if any(not lr >= 0 for lr in opt_cfg.lr_trace):
            raise ConfigError("optimizer.lr_trace must hold non-negative numbers")
    rates = ("max_learning_rate", "base_learning_rate") if is_finch(opt_cfg) else ("learning_rate",)
    for key in rates:
        if not 0 < getattr(opt_cfg, key) < math.inf:
            raise ConfigError(f"optimizer.{key} must be > 0 and finite, got {getattr(opt_cfg, key)}")
    _check_ranges(opt_cfg)
    if opt_cfg.schedule == "warmup_cosine" and not (opt_cfg.decay_steps or total_steps):
        raise ConfigError("optimizer.schedule=warmup_cosine needs optimizer.decay_steps (or the run's steps)")
    if opt_cfg.clip_norm < 0:
        raise ConfigError(f"optimizer.clip_norm must be >= 0 (0 = off), got {opt_cfg.clip_norm}")


# key -> (low, high, whether low is allowed, whether high is allowed)
_RANGES = {
    "b1": (0.0, 1.0, True, False),
    "b2": (0.0, 1.0, True, False),
    "momentum": (0.0, 1.0, True, False),
    "ema_decay": (0.0, 1.0, True, False),
    "eps": (0.0, math.inf, True, False),
    "weight_decay": (0.0, math.inf, True, False),
    "clip_norm": (0.0, math.inf, True, False),
    "final_lr_ratio": (0.0, 1.0, True, True),
    "min_loss": (-math.inf, math.inf, False, False),
}
# Settings only FINCH reads: set on another optimizer they would silently do nothing.
_FINCH_ONLY = ("max_learning_rate", "base_learning_rate", "ema_decay", "min_loss")


def _check_ranges(opt_cfg: OptimizerConfig) -> None:
    for key, (low, high, low_ok, high_ok) in _RANGES.items():
        value = getattr(opt_cfg, key)
        above = value > low or (low_ok and value == low)
        below = value < high or (high_ok and value == high)
        if not (above and below):  # also false for NaN
            interval = f"{'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
            raise ConfigError(f"optimizer.{key} must be in {interval}, got {value}")
    for key in ("warmup_steps", "decay_steps"):
        if getattr(opt_cfg, key) < 0:
            raise ConfigError(f"optimizer.{key} must be >= 0, got {getattr(opt_cfg, key)}")
    if any(not math.isfinite(lr) for lr in opt_cfg.lr_trace):
        raise ConfigError("optimizer.lr_trace must hold finite numbers")
    if not is_finch(opt_cfg):
        defaults = OptimizerConfig()
        for key in _FINCH_ONLY:
            if getattr(opt_cfg, key) != getattr(defaults, key):
                raise ConfigError(
                    f"optimizer.{key}={getattr(opt_cfg, key)} is a FINCH setting, but optimizer.name="
                    f"{opt_cfg.name!r} does not use it; remove it or pick a finch_* optimizer"
                )


def make_schedule(opt_cfg: OptimizerConfig, total_steps: int | None = None, peak: float = 1.0) -> optax.Schedule:
    """The learning-rate schedule scaled to ``peak``: step -> lr (a jnp scalar, traceable)."""
    if opt_cfg.schedule == "constant":
        return optax.constant_schedule(peak)
    if opt_cfg.schedule == "warmup_cosine":
        decay_steps = opt_cfg.decay_steps or int(total_steps)
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=opt_cfg.warmup_steps,
            decay_steps=max(decay_steps, opt_cfg.warmup_steps + 1),
            end_value=peak * opt_cfg.final_lr_ratio,
        )
    trace = jnp.asarray(opt_cfg.lr_trace, dtype=jnp.float32)

    def replay(count: jax.Array) -> jax.Array:
        # Step t uses the t-th recorded rate; past the end the last one is held.
        return trace[jnp.clip(count, 0, trace.shape[0] - 1)]

    return replay


def _finch_rates(opt_cfg: OptimizerConfig, total_steps: int | None) -> tuple[Any, Any]:
    """FINCH's ``(lr_base, lr_max)``: floats, or both scaled by the schedule's shape."""
    if opt_cfg.schedule == "constant":
        return opt_cfg.base_learning_rate, opt_cfg.max_learning_rate
    shape = make_schedule(opt_cfg, total_steps, peak=1.0)
    return (lambda t: opt_cfg.base_learning_rate * shape(t)), (lambda t: opt_cfg.max_learning_rate * shape(t))


def _finch(opt_cfg: OptimizerConfig, total_steps: int | None, direction: optax.GradientTransformation):
    lr_base, lr_max = _finch_rates(opt_cfg, total_steps)
    finch = finch_optax.scale_by_finch(lr_base, lr_max, ema_decay=opt_cfg.ema_decay, min_loss=opt_cfg.min_loss)
    return optax.chain(direction, finch)


@_register("finch_adamw")
def _finch_adamw(opt_cfg: OptimizerConfig, total_steps: int | None) -> optax.GradientTransformation:
    lr_base, lr_max = _finch_rates(opt_cfg, total_steps)
    return finch_optax.finch_adamw(
        lr_base,
        lr_max,
        b1=opt_cfg.b1,
        b2=opt_cfg.b2,
        eps=opt_cfg.eps,
        weight_decay=opt_cfg.weight_decay,
        ema_decay=opt_cfg.ema_decay,
        min_loss=opt_cfg.min_loss,
        skip_nonfinite=False,  # make_optimizer wraps the whole chain, clipping included, in the one skip_nonfinite
    )


@_register("finch_adam")
def _finch_adam(opt_cfg: OptimizerConfig, total_steps: int | None) -> optax.GradientTransformation:
    return _finch(opt_cfg, total_steps, optax.scale_by_adam(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps))


@_register("finch_sgd")
def _finch_sgd(opt_cfg: OptimizerConfig, total_steps: int | None) -> optax.GradientTransformation:
    return _finch(opt_cfg, total_steps, optax.identity())


@_register("finch_momentum")
def _finch_momentum(opt_cfg: OptimizerConfig, total_steps: int | None) -> optax.GradientTransformation:
    return _finch(opt_cfg, total_steps, optax.trace(decay=opt_cfg.momentum))


@_register("finch_lion")
def _finch_lion(opt_cfg: OptimizerConfig, total_steps: int | None) -> optax.GradientTransformation:
    lion = optax.chain(
        optax.scale_by_lion(b1=opt_cfg.b1, b2=opt_cfg.b2), optax.add_decayed_weights(opt_cfg.weight_decay)
    )
    return _finch(opt_cfg, total_steps, lion)


@_register("finch_adafactor")
def _finch_adafactor(opt_cfg: OptimizerConfig, total_steps: int | None) -> optax.GradientTransformation:
    return _finch(opt_cfg, total_steps, optax.scale_by_factored_rms())


@_register("adamw")
def _adamw(opt_cfg: OptimizerConfig, total_steps: int | None) -> optax.GradientTransformation:
    schedule = make_schedule(opt_cfg, total_steps, peak=opt_cfg.learning_rate)
    return optax.inject_hyperparams(optax.adamw)(
        learning_rate=schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay
    )


@_register("sgd")
def _sgd(opt_cfg: OptimizerConfig, total_steps: int | None) -> optax.GradientTransformation:
    schedule = make_schedule(opt_cfg, total_steps, peak=opt_cfg.learning_rate)
    return optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, momentum=opt_cfg.momentum or None)


def make_optimizer(opt_cfg: OptimizerConfig, total_steps: int | None = None) -> optax.GradientTransformationExtraArgs:
    """Builds the optax transformation named by ``opt_cfg.name`` (a key of :data:`OPTIMIZERS`).

    Args:
      opt_cfg: the optimizer section of the config.
      total_steps: the run's length, used by ``warmup_cosine`` when ``decay_steps`` is 0.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; call ``update(grads, state, params, value=loss)``. The whole
      chain (clipping included) is wrapped in :func:`finch_optax.skip_nonfinite`: a step whose ``value`` or any
      gradient is NaN/inf is skipped whole and counted (:func:`skip_metrics` reads the counters).

    Raises:
      ConfigError: unknown name or schedule, or hyperparameters that cannot work.
    """
    _validate(opt_cfg, total_steps)
    parts = [optax.clip_by_global_norm(opt_cfg.clip_norm)] if opt_cfg.clip_norm > 0 else []
    parts.append(OPTIMIZERS[opt_cfg.name](opt_cfg, total_steps))
    parts.append(_updates_like_params())
    # The divergence guard: a NaN/inf loss or gradient leaves params and the whole chain's state untouched.
    return finch_optax.skip_nonfinite(optax.chain(*parts))


def _updates_like_params() -> optax.GradientTransformation:
    """Casts updates to the params' dtype: a float32 schedule value must not turn bf16 updates into float32."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        return jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def skip_metrics(opt_state: optax.OptState) -> dict[str, jax.Array]:
    """``{"skipped": in all, "consecutive_skips": in a row}`` from the state's skip wrapper (empty without one)."""
    try:
        counts = finch_optax.skip_counts(opt_state)
    except ValueError:  # an optimizer built without make_optimizer, e.g. a bare optax transform in a test
        return {}
    return counts._asdict()


def _is_injected(node: Any) -> bool:
    return isinstance(node, optax.InjectStatefulHyperparamsState)


def applied_learning_rate(opt_state: optax.OptState) -> jax.Array:
    """The learning rate the last update applied, read from the optimizer state (call after ``update``).

    FINCH records its rate in its state; the plain optimizers are wrapped in ``optax.inject_hyperparams``, whose
    state holds the rate it evaluated for the update.
    """
    if finch_optax.find_finch_states(opt_state):
        return jnp.asarray(finch_optax.current_learning_rate(opt_state), jnp.float32)
    injected = [node for node in jax.tree.leaves(opt_state, is_leaf=_is_injected) if _is_injected(node)]
    if len(injected) != 1 or "learning_rate" not in injected[0].hyperparams:
        raise ValueError("the optimizer state holds neither a FINCH state nor one inject_hyperparams learning rate")
    return jnp.asarray(injected[0].hyperparams["learning_rate"], jnp.float32)

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
ignore ``value`` so :mod:`train.step` can call every optimizer the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import finch_optax
from train.config import ConfigError, OptimizerConfig

__all__ = ["FINCH_DIRECTIONS", "applied_learning_rate", "is_finch", "make_optimizer", "make_schedule"]

FINCH_DIRECTIONS = ("adamw", "adam", "sgd", "momentum", "lion", "adafactor")
_PLAIN = ("adamw", "sgd")
SCHEDULES = ("constant", "warmup_cosine", "trace")


def is_finch(opt_cfg: OptimizerConfig) -> bool:
    """Whether the optimizer's learning rate comes from FINCH (and so needs ``value``)."""
    return opt_cfg.name.startswith("finch_")


def _validate(opt_cfg: OptimizerConfig, total_steps: int | None) -> None:
    valid_names = [f"finch_{d}" for d in FINCH_DIRECTIONS] + list(_PLAIN)
    if opt_cfg.name not in valid_names:
        raise ConfigError(f"optimizer.name={opt_cfg.name!r} is unknown; valid names: {', '.join(valid_names)}")
    if opt_cfg.schedule not in SCHEDULES:
        raise ConfigError(f"optimizer.schedule={opt_cfg.schedule!r} is unknown; valid: {', '.join(SCHEDULES)}")
    if opt_cfg.schedule == "trace":
        if is_finch(opt_cfg):
            raise ConfigError("optimizer.schedule=trace replays a fixed lr list; it is for adamw/sgd, not FINCH")
        if not opt_cfg.lr_trace:
            raise ConfigError("optimizer.schedule=trace needs optimizer.lr_trace (one learning rate per step)")
        if any(not lr >= 0 for lr in opt_cfg.lr_trace):
            raise ConfigError("optimizer.lr_trace must hold non-negative numbers")
    if opt_cfg.learning_rate <= 0:
        raise ConfigError(f"optimizer.learning_rate must be > 0, got {opt_cfg.learning_rate}")
    if is_finch(opt_cfg) and opt_cfg.base_learning_rate <= 0:
        raise ConfigError(f"optimizer.base_learning_rate must be > 0, got {opt_cfg.base_learning_rate}")
    if opt_cfg.schedule == "warmup_cosine" and not (opt_cfg.decay_steps or total_steps):
        raise ConfigError("optimizer.schedule=warmup_cosine needs optimizer.decay_steps (or the run's steps)")
    if opt_cfg.clip_norm < 0:
        raise ConfigError(f"optimizer.clip_norm must be >= 0 (0 = off), got {opt_cfg.clip_norm}")


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


def _finch_direction(opt_cfg: OptimizerConfig) -> optax.GradientTransformation:
    direction = opt_cfg.name.removeprefix("finch_")
    if direction == "adam":
        return optax.scale_by_adam(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps)
    if direction == "sgd":
        return optax.identity()
    if direction == "momentum":
        return optax.trace(decay=opt_cfg.momentum)
    if direction == "lion":
        return optax.chain(
            optax.scale_by_lion(b1=opt_cfg.b1, b2=opt_cfg.b2), optax.add_decayed_weights(opt_cfg.weight_decay)
        )
    if direction == "adafactor":
        return optax.scale_by_factored_rms()
    raise AssertionError(direction)


def make_optimizer(opt_cfg: OptimizerConfig, total_steps: int | None = None) -> optax.GradientTransformationExtraArgs:
    """Builds the optax transformation named by ``opt_cfg.name``.

    Args:
      opt_cfg: the optimizer section of the config.
      total_steps: the run's length, used by ``warmup_cosine`` when ``decay_steps`` is 0.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; call ``update(grads, state, params, value=loss)``.

    Raises:
      ConfigError: unknown name or schedule, or hyperparameters that cannot work.
    """
    _validate(opt_cfg, total_steps)
    parts: list[optax.GradientTransformation] = []
    if opt_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(opt_cfg.clip_norm))
    if is_finch(opt_cfg):
        shape = make_schedule(opt_cfg, total_steps, peak=1.0)
        if opt_cfg.schedule == "constant":
            lr_base: float | Callable = opt_cfg.base_learning_rate
            lr_max: float | Callable = opt_cfg.learning_rate
        else:
            lr_base = lambda t: opt_cfg.base_learning_rate * shape(t)  # noqa: E731
            lr_max = lambda t: opt_cfg.learning_rate * shape(t)  # noqa: E731
        if opt_cfg.name == "finch_adamw":
            parts.append(
                finch_optax.finch_adamw(
                    lr_base,
                    lr_max,
                    b1=opt_cfg.b1,
                    b2=opt_cfg.b2,
                    eps=opt_cfg.eps,
                    weight_decay=opt_cfg.weight_decay,
                    ema_decay=opt_cfg.ema_decay,
                    min_loss=opt_cfg.min_loss,
                )
            )
        else:
            parts.append(_finch_direction(opt_cfg))
            parts.append(
                finch_optax.scale_by_finch(lr_base, lr_max, ema_decay=opt_cfg.ema_decay, min_loss=opt_cfg.min_loss)
            )
    else:
        schedule = make_schedule(opt_cfg, total_steps, peak=opt_cfg.learning_rate)
        if opt_cfg.name == "adamw":
            parts.append(
                optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay)
            )
        else:
            parts.append(optax.sgd(schedule, momentum=opt_cfg.momentum or None))
    return optax.with_extra_args_support(optax.chain(*parts))


def applied_learning_rate(
    opt_cfg: OptimizerConfig, opt_state: optax.OptState, step: jax.Array, total_steps: int | None = None
) -> jax.Array:
    """The learning rate the last update used (call after ``update``; ``step`` is that update's index, from 0).

    For FINCH it is read from the optimizer state; for scheduled optimizers it is the schedule at ``step``.
    """
    if is_finch(opt_cfg):
        return jnp.asarray(finch_optax.current_learning_rate(opt_state), jnp.float32)
    schedule = make_schedule(opt_cfg, total_steps, peak=opt_cfg.learning_rate)
    return jnp.asarray(schedule(step), jnp.float32)

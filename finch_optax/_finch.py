r"""FINCH: a loss-adaptive learning rate as an optax gradient transformation.

FINCH sets the step size from a running average of the training loss,

.. math::

    \bar{L}_t = a \, \bar{L}_{t-1} + (1 - a) \, L_t, \qquad
    \eta_t = \min\left(\eta_{\max},\;
            \frac{\eta_{\mathrm{base}}}{\sqrt{\bar{L}_t + \epsilon}}\right),

so large steps are taken only once the loss is already small, which limits how far fine-tuning drifts from the
pretrained weights while the objective itself is left untouched.

References:
    FINCH, a loss-adaptive learning rate for fine-tuning with less forgetting,
    `arXiv:2605.20005 <https://arxiv.org/abs/2605.20005>`_, 2026.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# A float, a jax scalar (e.g. traced inside ``optax.inject_hyperparams``) or an optax schedule ``count -> value``.
ScalarOrSchedule = float | jax.Array | optax.Schedule

_MISSING_VALUE_MSG = (
    "scale_by_finch needs the current loss: call `update(grads, state, params, value=loss)`. "
    "FINCH is an optax.GradientTransformationExtraArgs; wrappers such as optax.chain, named_chain, "
    "inject_hyperparams, MultiSteps and apply_if_finite forward `value` only when the caller passes it "
    "as the keyword argument `value=`."
)


class FinchState(NamedTuple):
    """State of :func:`scale_by_finch`.

    All fields are scalars of a dtype fixed at ``init``, so the state is replicated on any device mesh and never
    changes type between steps. FINCH computes in the params' precision: float32, or float64 when a param is
    float64 (under ``jax_enable_x64``); bfloat16 and float16 params still get a float32 rate.

    Attributes:
        count: int32, number of accepted updates (updates whose loss was finite). FINCH's own schedules are
            evaluated at it.
        ema_loss: the running loss :math:`\\bar{L}_t` (0 before the first accepted update).
        learning_rate: the learning rate applied at the last accepted update (0 before the first one). A record,
            not a setting: writing it (e.g. with ``optax.tree.set``) changes nothing.
        skipped: int32, number of updates FINCH itself skipped because the loss it was given was NaN or
            infinite; saturates at :math:`2^{31} - 1`. Under :func:`finch_optax.skip_nonfinite` (every ``finch_*``
            alias) the wrapper skips such a step first and FINCH never sees the loss, so this stays 0: read
            :func:`finch_optax.skip_counts` there.
    """

    count: jax.Array
    ema_loss: jax.Array
    learning_rate: jax.Array
    skipped: jax.Array


def _check_hyperparameter(
    name: str, value: object, *, accept: Callable[[float], bool], rule: str, schedule_ok: bool = False
) -> None:
    """Validates a hyperparameter given as a Python (or NumPy) number; arrays and schedules are left alone."""
    kinds = "a number, a jax scalar or a schedule" if schedule_ok else "a number or a jax scalar"
    if value is None or isinstance(value, (str, bytes)) or (callable(value) and not schedule_ok):
        raise TypeError(f"scale_by_finch: {name} must be {kinds}, got {value!r}")
    if isinstance(value, numbers.Real) and not accept(float(value)):
        raise ValueError(f"scale_by_finch: {name} must be {rule}, got {value!r}")


def _evaluate(hyperparameter: ScalarOrSchedule, count: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """A scalar of ``dtype``: the schedule at ``count``, or the constant itself."""
    value = hyperparameter(count) if callable(hyperparameter) else hyperparameter
    return jnp.asarray(value, dtype=dtype)


def float_dtype(tree: object) -> jnp.dtype:
    """The dtype FINCH computes in for a pytree of arrays: its widest real float dtype, and at least float32.

    float32 for float32, bfloat16 or float16 leaves; float64 when a leaf is float64 (``jax_enable_x64``); complex
    leaves count as their real part. Leaves without a dtype (Python numbers) are ignored.
    """
    dtype = jnp.dtype(jnp.float32)
    for leaf in jax.tree.leaves(tree):
        leaf_dtype = getattr(leaf, "dtype", None)
        if leaf_dtype is not None and jnp.issubdtype(leaf_dtype, jnp.inexact):
            dtype = jnp.promote_types(dtype, jnp.finfo(leaf_dtype).dtype)
    return jax.dtypes.canonicalize_dtype(dtype)


def read_loss(value: object, dtype: jnp.dtype, *, who: str) -> jax.Array:
    """``value`` as a scalar loss of ``dtype``; raises for a bool, complex or non-scalar ``value``.

    A finite loss too large for ``dtype`` (a Python float above float32's maximum, with float32 params) becomes
    inf, so the update that carries it is skipped like any other non-finite loss.
    """
    value_dtype = jnp.result_type(value)
    if value_dtype == jnp.bool_ or jnp.issubdtype(value_dtype, jnp.complexfloating):
        raise TypeError(f"{who}: `value` must be a real scalar loss, got dtype {value_dtype}")
    if jnp.shape(value) != ():
        raise ValueError(
            f"{who}: `value` must be a scalar loss, got shape {jnp.shape(value)}; reduce it first "
            "(e.g. `value=loss.mean()`)."
        )
    with np.errstate(over="ignore"):  # a Python float beyond ``dtype``'s range is inf by design: no warning
        return jnp.asarray(value).astype(dtype)


def running_loss(ema_loss: jax.Array, loss: jax.Array, ema_decay: jax.Array, *, is_first: jax.Array) -> jax.Array:
    r"""One step of FINCH's running loss: :math:`\bar{L}_t = a \bar{L}_{t-1} + (1 - a) L_t`, or :math:`L_t` first."""
    # The first accepted loss seeds the average; starting from the zero initial state instead would bias it low
    # (and the learning rate high) for the first ~1/(1-a) steps.
    return jnp.where(is_first, loss, ema_decay * ema_loss + (1.0 - ema_decay) * loss)


def finch_learning_rate(
    ema_loss: jax.typing.ArrayLike,
    base_learning_rate: jax.typing.ArrayLike,
    max_learning_rate: jax.typing.ArrayLike,
    *,
    min_loss: jax.typing.ArrayLike = 0.0,
    eps: jax.typing.ArrayLike = 1e-8,
) -> jax.Array:
    r"""The FINCH learning rate for a given running loss (elementwise; float32, or float64 for float64 inputs).

    .. math::

        \eta = \min\left(\eta_{\max},\;
                \frac{\eta_{\mathrm{base}}}{\sqrt{\max(\bar{L} - L_{\min}, 0) + \epsilon}}\right)

    Args:
        ema_loss: the running loss :math:`\bar{L}`.
        base_learning_rate: :math:`\eta_{\mathrm{base}}`.
        max_learning_rate: the cap :math:`\eta_{\max}`.
        min_loss: :math:`L_{\min}`, the loss treated as zero; a running loss below it is clamped to it.
        eps: :math:`\epsilon`, keeps the rate finite when :math:`\bar{L} = L_{\min}`.

    Returns:
        The learning rate, float32 unless an input is a float64 array (then float64).

    Examples:
        >>> import finch_optax
        >>> print(round(float(finch_optax.finch_learning_rate(4.0, 1e-3, 1.0)), 6))
        0.0005
        >>> print(round(float(finch_optax.finch_learning_rate(1e-6, 1e-3, 0.1)), 6))  # capped
        0.1
    """
    dtype = jnp.result_type(jnp.float32, ema_loss, base_learning_rate, max_learning_rate, min_loss, eps)
    cast = lambda x: jnp.asarray(x, dtype=dtype)
    excess = jnp.maximum(cast(ema_loss) - cast(min_loss), 0.0)
    return jnp.minimum(cast(max_learning_rate), cast(base_learning_rate) / jnp.sqrt(excess + cast(eps)))


def base_learning_rate_for_target_loss(
    max_learning_rate: float,
    target_loss: float,
    *,
    min_loss: float = 0.0,
    eps: float = 1e-8,
) -> float:
    r"""The ``base_learning_rate`` at which FINCH reaches ``max_learning_rate`` exactly when the loss hits a target.

    Below the cap :math:`\eta_t = \eta_{\mathrm{base}} / \sqrt{\bar{L}_t - L_{\min} + \epsilon}`; solving
    :math:`\eta_t = \eta_{\max}` at :math:`\bar{L}_t = L^\star` gives

    .. math::

        \eta_{\mathrm{base}} = \eta_{\max} \sqrt{L^\star - L_{\min} + \epsilon}.

    Above the target loss FINCH then runs at :math:`\eta_{\max} \sqrt{L^\star / \bar{L}_t}` (for
    :math:`L_{\min} = 0`): e.g. a quarter of the cap while the loss is 16 times the target.

    Args:
        max_learning_rate: the cap :math:`\eta_{\max}`, > 0.
        target_loss: the loss :math:`L^\star` at which the cap should be reached, > ``min_loss``.
        min_loss: the same ``min_loss`` given to :func:`scale_by_finch`.
        eps: the same ``eps`` given to :func:`scale_by_finch`.

    Returns:
        ``base_learning_rate`` as a Python float.

    Examples:
        >>> import finch_optax
        >>> print(round(finch_optax.base_learning_rate_for_target_loss(1e-3, 0.25), 6))
        0.0005
    """
    if not max_learning_rate > 0:
        raise ValueError(f"max_learning_rate must be > 0, got {max_learning_rate!r}")
    if not target_loss > min_loss:
        raise ValueError(f"target_loss must be > min_loss={min_loss!r}, got {target_loss!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    return float(max_learning_rate) * math.sqrt(float(target_loss) - float(min_loss) + float(eps))


def scale_by_finch(
    base_learning_rate: ScalarOrSchedule,
    max_learning_rate: ScalarOrSchedule,
    *,
    ema_decay: jax.typing.ArrayLike = 0.9,
    min_loss: jax.typing.ArrayLike = 0.0,
    eps: jax.typing.ArrayLike = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    r"""Scale updates by the FINCH loss-adaptive learning rate.

    FINCH is the learning-rate stage of a chain, like :func:`optax.scale_by_learning_rate`: it multiplies the
    incoming direction (Adam, Lion, SGD, ...) by :math:`-\eta_t`, where :math:`\eta_t` follows an exponential
    moving average of the loss passed to ``update`` as ``value``:

    .. math::

        \bar{L}_1 &= L_1, \qquad \bar{L}_t = a \, \bar{L}_{t-1} + (1 - a) \, L_t, \\
        \eta_t &= \min\left(\eta_{\max}(t),\;
                \frac{\eta_{\mathrm{base}}(t)}{\sqrt{\max(\bar{L}_t - L_{\min}, 0) + \epsilon}}\right), \\
        u_t &= -\eta_t \, g_t .

    With :math:`a = 0` the raw per-batch loss is used. A high loss gives small steps, and the rate grows towards
    the cap as the loss falls; :math:`\eta_t \sqrt{\bar{L}_t - L_{\min}} \le \eta_{\mathrm{base}}` whenever the cap
    is not active. To pick :math:`\eta_{\mathrm{base}}` from the loss at which the full rate should be reached, use
    :func:`base_learning_rate_for_target_loss`: :math:`\eta_{\mathrm{base}} = \eta_{\max} \sqrt{L^\star}`.

    Every update needs the loss: ``updates, state = tx.update(grads, state, params, value=loss)``.

    * A missing, bool or complex ``value`` raises ``TypeError``; a non-scalar one ``ValueError``, at trace time.
    * A NaN or infinite ``value`` zeroes FINCH's update (even where the incoming update is itself NaN), keeps
      FINCH's state and counts the update in ``skipped``. That protects FINCH alone: stages before it in a chain
      (e.g. Adam's moments) have already taken the step's gradients. To skip the step for the whole chain, wrap
      the chain in :func:`finch_optax.skip_nonfinite` (:func:`finch_optax.finch_adamw` already is).
    * ``value`` is read in FINCH's dtype (see :class:`FinchState`): a finite loss too large for it (above
      :math:`3.4 \times 10^{38}` with float32 params) reads as inf and is skipped like one.
    * Gradients *through* a skipped update (meta-gradients of an unrolled loop) stay finite: the NaN inputs are
      replaced before any arithmetic (the double-``where`` pattern), not only masked after it.
    * Schedules given here are evaluated at ``count``, the number of accepted updates. A schedule given to
      :func:`optax.inject_hyperparams` is evaluated at that wrapper's own count, which advances on every call,
      skipped or not, unless :func:`finch_optax.skip_nonfinite` wraps it from outside.
    * :math:`\bar{L}_t - L_{\min}` below zero is clamped to zero, so the rate is then
      :math:`\min(\eta_{\max}, \eta_{\mathrm{base}} / \sqrt{\epsilon})`, normally the cap.
    * :class:`optax.MultiSteps` calls its inner optimizer with the ``value`` of the *last* micro-batch only.
      To drive FINCH with the mean loss of the accumulated batch, pass the running mean of the micro-batch losses
      seen so far in the current accumulation window as ``value`` (at micro-step :math:`k` of :math:`K`,
      ``value = mean(losses[:k+1])``), so the call that emits the update sees the mean over all :math:`K`.

    Args:
        base_learning_rate: :math:`\eta_{\mathrm{base}}`, a float > 0 or an optax schedule of the update count.
        max_learning_rate: the cap :math:`\eta_{\max}`, a float > 0 or an optax schedule (e.g. a warmup, so FINCH
            composes with warmup and decay).
        ema_decay: :math:`a \in [0, 1)`, the weight of the past in the running loss.
        min_loss: :math:`L_{\min}`, the loss treated as zero (e.g. the entropy floor of the data).
        eps: :math:`\epsilon > 0` under the square root.

    Returns:
        A :class:`optax.GradientTransformationExtraArgs` whose state is a :class:`FinchState`.

    Raises:
        ValueError: at construction, for hyperparameters given as Python numbers out of range (learning rates
            :math:`\le 0`, ``ema_decay`` outside :math:`[0, 1)`, ``eps`` :math:`\le 0`, non-finite ``min_loss``).
            Arrays (as traced by :func:`optax.inject_hyperparams`) and schedules are not checked.

    Examples:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import optax
        >>> import finch_optax
        >>> # Plain gradient descent with a FINCH step: the rate rises towards the cap as the loss falls.
        >>> tx = finch_optax.scale_by_finch(base_learning_rate=0.2, max_learning_rate=0.5, ema_decay=0.5)
        >>> params = jnp.array([1.0, 2.0])
        >>> loss_fn = lambda p: 0.5 * jnp.sum(p ** 2)
        >>> state = tx.init(params)
        >>> for _ in range(5):
        ...     loss, grads = jax.value_and_grad(loss_fn)(params)
        ...     updates, state = tx.update(grads, state, params, value=loss)
        ...     params = optax.apply_updates(params, updates)
        ...     print(f"loss={float(loss):.4f} lr={float(finch_optax.current_learning_rate(state)):.4f}")
        loss=2.5000 lr=0.1265
        loss=1.9075 lr=0.1347
        loss=1.4282 lr=0.1484
        loss=1.0357 lr=0.1675
        loss=0.7178 lr=0.1932

    References:
        FINCH, a loss-adaptive learning rate for fine-tuning with less forgetting,
        `arXiv:2605.20005 <https://arxiv.org/abs/2605.20005>`_, 2026.
    """
    positive = dict(accept=lambda x: x > 0, rule="> 0")
    _check_hyperparameter("base_learning_rate", base_learning_rate, **positive, schedule_ok=True)
    _check_hyperparameter("max_learning_rate", max_learning_rate, **positive, schedule_ok=True)
    _check_hyperparameter("ema_decay", ema_decay, accept=lambda x: 0 <= x < 1, rule="in [0, 1)")
    _check_hyperparameter("min_loss", min_loss, accept=math.isfinite, rule="finite")
    _check_hyperparameter("eps", eps, **positive)

    def init_fn(params):
        dtype = float_dtype(params)
        return FinchState(
            count=jnp.zeros([], jnp.int32),
            ema_loss=jnp.zeros([], dtype),
            learning_rate=jnp.zeros([], dtype),
            skipped=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
        del params, extra_args  # Other transformations' extra args (e.g. a line search's value_fn) are not ours.
        if value is None:
            raise TypeError(_MISSING_VALUE_MSG)
        dtype = state.ema_loss.dtype
        loss = read_loss(value, dtype, who="scale_by_finch")
        accepted = jnp.isfinite(loss)
        # Double where: the candidate below is computed from finite inputs only, so that a skipped update has
        # finite gradients too (0 * NaN is NaN, and masking the output alone would leave NaN cotangents).
        safe_loss = jnp.where(accepted, loss, jnp.zeros_like(loss))

        candidate_ema = running_loss(
            state.ema_loss, safe_loss, jnp.asarray(ema_decay, dtype), is_first=state.count == 0
        ).astype(dtype)
        candidate_lr = finch_learning_rate(
            candidate_ema,
            _evaluate(base_learning_rate, state.count, dtype),
            _evaluate(max_learning_rate, state.count, dtype),
            min_loss=min_loss,
            eps=eps,
        ).astype(dtype)
        step_size = -candidate_lr

        def scale(g):
            # `where`, not a multiply by zero: a NaN loss usually comes with NaN gradients, and 0 * NaN is NaN.
            safe_g = jnp.where(accepted, g, jnp.zeros_like(g))
            return jnp.where(accepted, safe_g * step_size.astype(g.dtype), jnp.zeros_like(g))

        new_state = FinchState(
            count=jnp.where(accepted, optax.safe_increment(state.count), state.count),
            ema_loss=jnp.where(accepted, candidate_ema, state.ema_loss),
            learning_rate=jnp.where(accepted, candidate_lr, state.learning_rate),
            skipped=jnp.where(accepted, state.skipped, optax.safe_increment(state.skipped)),
        )
        return jax.tree.map(scale, updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

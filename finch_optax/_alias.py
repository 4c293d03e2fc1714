r"""Ready-made optimizers with a FINCH learning rate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from finch_optax._finch import ScalarOrSchedule, scale_by_finch
from finch_optax._skip import skip_nonfinite as _skip_nonfinite


def finch_adamw(
    base_learning_rate: ScalarOrSchedule,
    max_learning_rate: ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    nesterov: bool = False,
    ema_decay: jax.typing.ArrayLike = 0.9,
    min_loss: jax.typing.ArrayLike = 0.0,
    finch_eps: jax.typing.ArrayLike = 1e-8,
    check_updates: bool = True,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""AdamW whose learning rate is set by FINCH from the running loss.

    The chain of :func:`optax.adamw` with its last stage, :func:`optax.scale_by_learning_rate`, replaced by
    :func:`finch_optax.scale_by_finch`:

    .. math::

        u_t = -\eta_t \left( \frac{\hat{m}_t}{\sqrt{\hat{v}_t} + \varepsilon} + \lambda \, \theta_{t-1} \right),
        \qquad
        \eta_t = \min\left(\eta_{\max},\; \frac{\eta_{\mathrm{base}}}{\sqrt{\bar{L}_t + \epsilon}}\right).

    With FINCH switched off (a huge ``base_learning_rate``) it equals ``optax.adamw(max_learning_rate, ...)``
    bit for bit, at the params' precision (float64 too, under ``jax_enable_x64``). Its parameters are those of
    :func:`optax.adamw`, in the same order and with the same defaults, with the two FINCH rates in place of
    ``learning_rate``; FINCH's own parameters are keyword-only. Every update needs the loss:
    ``tx.update(grads, state, params, value=loss)``.

    The chain is wrapped in :func:`finch_optax.skip_nonfinite`: an update whose loss (or, with
    ``check_updates``, a gradient) is NaN or infinite returns zero updates and leaves the whole state untouched,
    Adam's moments and counts included; :func:`finch_optax.skip_counts` reads how many were skipped. Pass
    ``skip_nonfinite=False`` to wrap a larger chain (clipping, say) in one ``skip_nonfinite`` of your own: one
    wrapper, the loss read and checked once.

    Args:
        base_learning_rate: :math:`\eta_{\mathrm{base}}`, float or schedule; see
            :func:`finch_optax.base_learning_rate_for_target_loss`.
        max_learning_rate: the cap :math:`\eta_{\max}`, float or schedule (warmup/decay go here).
        b1: Adam's decay of the first moment.
        b2: Adam's decay of the second moment.
        eps: Adam's :math:`\varepsilon`, added to :math:`\sqrt{\hat{v}_t}`.
        eps_root: Adam's :math:`\varepsilon` inside the square root (for meta-learning through the update).
        mu_dtype: dtype of Adam's first moment, ``None`` for the params' dtype.
        weight_decay: :math:`\lambda`, decoupled weight decay (scaled by :math:`\eta_t` like in AdamW).
        mask: which params get weight decay: a pytree of bools like the params, or a function of the params.
        nesterov: use Nesterov momentum (NAdamW), as in :func:`optax.adamw`.
        ema_decay: :math:`a`, the weight of the past in the running loss.
        min_loss: :math:`L_{\min}`, the loss treated as zero.
        finch_eps: FINCH's :math:`\epsilon` under the square root (``eps`` is Adam's).
        check_updates: skip a step with a non-finite gradient too, not only one with a non-finite loss.
        skip_nonfinite: wrap the chain in :func:`finch_optax.skip_nonfinite` (off: FINCH alone keeps its own
            state through a non-finite loss, as :func:`scale_by_finch` does, and Adam's moments are not protected).

    Returns:
        A :class:`optax.GradientTransformationExtraArgs` whose state is a
        :class:`finch_optax.SkipNonfiniteState` around the chain's states (the chain's states alone with
        ``skip_nonfinite=False``); its FINCH state is found by :func:`finch_optax.current_learning_rate`.

    Examples:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import optax
        >>> import finch_optax
        >>> tx = finch_optax.finch_adamw(base_learning_rate=0.05, max_learning_rate=0.1)
        >>> params = {"w": jnp.array([2.0, -1.0])}
        >>> loss_fn = lambda p: jnp.sum((p["w"] - 1.0) ** 2)
        >>> state = tx.init(params)
        >>> for step in range(201):
        ...     loss, grads = jax.value_and_grad(loss_fn)(params)
        ...     updates, state = tx.update(grads, state, params, value=loss)
        ...     params = optax.apply_updates(params, updates)
        ...     if step % 50 == 0:
        ...         lr = finch_optax.current_learning_rate(state)
        ...         print(f"step {step}: loss={float(loss):.4f} lr={float(lr):.4f}")
        step 0: loss=5.0000 lr=0.0224
        step 50: loss=0.4429 lr=0.0502
        step 100: loss=0.0018 lr=0.1000
        step 150: loss=0.0000 lr=0.1000
        step 200: loss=0.0000 lr=0.1000

    References:
        FINCH, a loss-adaptive learning rate for fine-tuning with less forgetting,
        `arXiv:2605.20005 <https://arxiv.org/abs/2605.20005>`_, 2026.

        Loshchilov and Hutter, `Decoupled Weight Decay Regularization <https://arxiv.org/abs/1711.05101>`_, 2019.
    """
    chain = optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov),
        optax.add_decayed_weights(weight_decay, mask),
        scale_by_finch(base_learning_rate, max_learning_rate, ema_decay=ema_decay, min_loss=min_loss, eps=finch_eps),
    )
    return _skip_nonfinite(chain, check_updates=check_updates) if skip_nonfinite else chain

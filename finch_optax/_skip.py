r"""Skipping a whole optimizer step when the loss (or a gradient) is NaN or infinite."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from finch_optax._finch import float_dtype, read_loss


class SkipNonfiniteState(NamedTuple):
    """State of :func:`skip_nonfinite`.

    Attributes:
        skipped: int32, steps skipped since ``init``; saturates at :math:`2^{31} - 1`.
        consecutive_skips: int32, steps skipped in a row up to and including the last one; 0 after an accepted
            step. Saturates too.
        inner_state: the wrapped transformation's state, as the last accepted step left it.
    """

    skipped: jax.Array
    consecutive_skips: jax.Array
    inner_state: optax.OptState

    @property
    def total_skipped(self) -> jax.Array:
        """Deprecated (0.1 name): :attr:`skipped`."""
        warnings.warn("SkipNonfiniteState.total_skipped is now .skipped", FutureWarning, stacklevel=2)
        return self.skipped

    @property
    def consecutive_skipped(self) -> jax.Array:
        """Deprecated (0.1 name): :attr:`consecutive_skips`."""
        warnings.warn("SkipNonfiniteState.consecutive_skipped is now .consecutive_skips", FutureWarning, stacklevel=2)
        return self.consecutive_skips


def skip_nonfinite(
    inner: optax.GradientTransformation, *, check_updates: bool = True
) -> optax.GradientTransformationExtraArgs:
    r"""Skips the whole step of ``inner`` when the loss, or an incoming update, is NaN or infinite.

    A skipped step returns zero updates and leaves the entire inner state as it was: every moment, count and
    schedule of the chain, as if the step never happened. An accepted step is exactly ``inner``'s step. The loss
    is the ``value`` passed to ``update`` (the convention of :func:`scale_by_finch` and optax's
    ``contrib.reduce_on_plateau``), read in the updates' float precision (at least float32), so a finite loss
    too large for float32 counts as infinite with float32 params. ``value`` is passed on to ``inner``, as are
    all other extra args; ``inner`` may be any optax transformation, FINCH or not.

    Unlike :func:`optax.apply_if_finite` it keys on the loss as well as the updates, never gives up and applies a
    bad step, and keeps gradients through a skipped step finite: NaN inputs are replaced by zeros *before*
    ``inner`` runs (the double-``where`` pattern), so meta-gradients of an unrolled loop stay usable. It uses
    ``jnp.where`` rather than ``lax.cond``, which also keeps it cheap under ``vmap`` and sharding: the check is one
    all-reduced boolean, and the state keeps its shardings.

    Args:
        inner: the transformation (usually a whole chain) to protect.
        check_updates: also skip when an incoming update (gradient) has a NaN or infinite entry, as
            :func:`optax.apply_if_finite` does. Without it only ``value`` is checked.

    Returns:
        An :class:`optax.GradientTransformationExtraArgs` whose state is a :class:`SkipNonfiniteState`; read its
        counters with :func:`finch_optax.skip_counts`.

    Raises:
        TypeError: at ``update``, when ``value`` is missing and ``check_updates`` is off (nothing to check), or is
            a bool or complex number.
        ValueError: at ``update``, when ``value`` is not a scalar.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax
        >>> import finch_optax
        >>> tx = finch_optax.skip_nonfinite(optax.adam(0.1))
        >>> params = jnp.ones(2)
        >>> state = tx.init(params)
        >>> updates, state = tx.update(jnp.full(2, jnp.nan), state, params, value=jnp.nan)
        >>> print(updates, *map(int, finch_optax.skip_counts(state)))  # (skipped, consecutive_skips)
        [0. 0.] 1 1
        >>> updates, state = tx.update(jnp.ones(2), state, params, value=1.0)  # as if it were the first step
        >>> print([round(float(u), 4) for u in updates], *map(int, finch_optax.skip_counts(state)))
        [-0.1, -0.1] 1 0
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SkipNonfiniteState(
            skipped=jnp.zeros([], jnp.int32),
            consecutive_skips=jnp.zeros([], jnp.int32),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        value = extra_args.get("value")
        if value is None and not check_updates:
            raise TypeError(
                "skip_nonfinite(check_updates=False) keys on the loss: call `update(grads, state, params, value=loss)`."
            )
        finite = jnp.ones([], jnp.bool_)
        if value is not None:
            finite = jnp.isfinite(read_loss(value, float_dtype(updates), who="skip_nonfinite"))
            value = jnp.asarray(value)
            extra_args = dict(extra_args, value=jnp.where(finite, value, jnp.zeros_like(value)))
        if check_updates:
            for leaf in jax.tree.leaves(updates):
                finite = finite & jnp.all(jnp.isfinite(leaf))

        zeros_unless_finite = lambda x: jnp.where(finite, x, jnp.zeros_like(x))
        # Double where: inner never sees a NaN, so the masked-out branch has finite gradients as well.
        new_updates, new_inner_state = inner.update(
            jax.tree.map(zeros_unless_finite, updates), state.inner_state, params, **extra_args
        )
        skipped = jnp.logical_not(finite)
        return jax.tree.map(zeros_unless_finite, new_updates), SkipNonfiniteState(
            skipped=jnp.where(skipped, optax.safe_increment(state.skipped), state.skipped),
            consecutive_skips=jnp.where(
                skipped, optax.safe_increment(state.consecutive_skips), jnp.zeros_like(state.consecutive_skips)
            ),
            inner_state=jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_inner_state, state.inner_state),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

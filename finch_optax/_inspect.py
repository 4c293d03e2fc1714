"""Finding FINCH's state, and the skip counters, inside any nest of optax wrappers."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from finch_optax._finch import FinchState
from finch_optax._skip import SkipNonfiniteState


def find_finch_states(opt_state: Any) -> list[tuple[str, FinchState]]:
    """Every :class:`FinchState` in an optimizer state, with its path, in pytree order.

    Works through any pytree nesting: ``optax.chain`` tuples, ``named_chain`` and ``multi_transform`` dicts,
    ``inject_hyperparams``, ``MultiSteps``, ``apply_if_finite``, :func:`skip_nonfinite`, ``masked``, and user
    containers. A flattened
    state where a FinchState survives only as a dict of its four fields (flax ``nnx.state(optimizer)``) is
    recognised too, and returned as a :class:`FinchState` of the same leaves.

    Args:
        opt_state: an optimizer state (any pytree).

    Returns:
        A list of ``(path, state)`` pairs; ``path`` is a :func:`jax.tree_util.keystr` string.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax
        >>> import finch_optax
        >>> tx = optax.MultiSteps(finch_optax.finch_adamw(1e-3, 1e-2), every_k_schedule=2)
        >>> [path for path, _ in finch_optax.find_finch_states(tx.init(jnp.zeros(3)))]
        ['.inner_opt_state.inner_state[2]']
    """
    leaves = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=_is_finch_state)[0]
    return [(jax.tree_util.keystr(path), _as_finch_state(leaf)) for path, leaf in leaves if _is_finch_state(leaf)]


_FIELDS = frozenset(FinchState._fields)


def _is_finch_state(node: Any) -> bool:
    # Flattened states (e.g. flax ``nnx.state(optimizer)``) keep a FinchState only as a dict of its fields.
    return isinstance(node, FinchState) or (isinstance(node, Mapping) and set(node.keys()) == _FIELDS)


def _as_finch_state(node: Any) -> FinchState:
    return node if isinstance(node, FinchState) else FinchState(**{field: node[field] for field in FinchState._fields})


def current_learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate FINCH applied at its last accepted update (0 before the first one).

    Works on the state of any optimizer containing exactly one :func:`scale_by_finch`, however deeply it is
    wrapped, and inside ``jax.jit``. With several FINCH stages (e.g. one per parameter group in
    ``optax.multi_transform``) there is no single learning rate: use :func:`find_finch_states`.

    The rate is read, not set, here: ``FinchState.learning_rate`` only records it, so
    ``optax.tree.set(state, learning_rate=x)`` writes that record and changes nothing (the next update overwrites
    it). To change FINCH's rates during a run, build the optimizer with :func:`optax.inject_hyperparams` and set
    the injected ``base_learning_rate`` / ``max_learning_rate``, e.g.
    ``optax.tree.set(state, max_learning_rate=jnp.float32(1e-4))``.

    Args:
        opt_state: an optimizer state (any pytree).

    Returns:
        A float32 scalar array.

    Raises:
        ValueError: if the state holds no :class:`FinchState`, or more than one.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax
        >>> import finch_optax
        >>> tx = optax.apply_if_finite(finch_optax.finch_adamw(1e-3, 1e-2), max_consecutive_errors=3)
        >>> params = jnp.ones(2)
        >>> state = tx.init(params)
        >>> _, state = tx.update(jnp.ones(2), state, params, value=jnp.float32(0.04))
        >>> print(round(float(finch_optax.current_learning_rate(state)), 6))  # 1e-3 / sqrt(0.04)
        0.005
    """
    found = find_finch_states(opt_state)
    if not found:
        raise ValueError(
            f"current_learning_rate: no FinchState in the optimizer state (a {type(opt_state).__name__}); "
            "was the optimizer built with finch_optax.scale_by_finch / finch_adamw?"
        )
    if len(found) > 1:
        paths = ", ".join(path for path, _ in found)
        raise ValueError(
            f"current_learning_rate: {len(found)} FinchStates in the optimizer state (at {paths}), so there is "
            "no single learning rate; use finch_optax.find_finch_states(opt_state) and pick one."
        )
    # asarray unwraps array-like wrappers around the leaves (e.g. flax nnx.Optimizer's OptArray); no copy.
    return jnp.asarray(found[0][1].learning_rate)


class SkipCounts(NamedTuple):
    """The counters of a :func:`skip_nonfinite` wrapper: int32 scalars, both saturating at :math:`2^{31} - 1`.

    The same names as the wrapper's state, the training metrics and ``guard.max_consecutive_skips``.

    Attributes:
        skipped: steps skipped since ``init``.
        consecutive_skips: steps skipped in a row, up to the last update; 0 after an accepted step.
    """

    skipped: jax.Array
    consecutive_skips: jax.Array

    @property
    def total(self) -> jax.Array:
        """Deprecated (0.1 name): :attr:`skipped`."""
        warnings.warn("SkipCounts.total is now .skipped", FutureWarning, stacklevel=2)
        return self.skipped

    @property
    def consecutive(self) -> jax.Array:
        """Deprecated (0.1 name): :attr:`consecutive_skips`."""
        warnings.warn("SkipCounts.consecutive is now .consecutive_skips", FutureWarning, stacklevel=2)
        return self.consecutive_skips


_SKIP_FIELDS = frozenset(SkipNonfiniteState._fields)
_SKIP_FIELDS_0_1 = frozenset(("total_skipped", "consecutive_skipped", "inner_state"))  # flattened states of 0.1


def _is_skip_state(node: Any) -> bool:
    return isinstance(node, SkipNonfiniteState) or (
        isinstance(node, Mapping) and set(node.keys()) in (_SKIP_FIELDS, _SKIP_FIELDS_0_1)
    )


def skip_counts(opt_state: Any) -> SkipCounts:
    """How many steps the optimizer's :func:`skip_nonfinite` wrapper has skipped: in all, and in a row.

    Works on any optimizer state holding one ``skip_nonfinite`` (every ``finch_*`` alias has one), however deeply
    it is wrapped, on flattened flax ``nnx.state`` trees, and inside ``jax.jit``. Nested wrappers count once: the
    outermost one is read, since it keeps the inner one's state whole whenever it skips a step.

    Args:
        opt_state: an optimizer state (any pytree).

    Returns:
        A :class:`SkipCounts` of int32 scalars.

    Raises:
        ValueError: if the state holds no :class:`SkipNonfiniteState`, or several side by side (e.g. one per
            parameter group of ``optax.multi_transform``).

    Examples:
        >>> import jax.numpy as jnp
        >>> import finch_optax
        >>> tx = finch_optax.finch_adamw(1e-3, 1e-2)
        >>> params = jnp.ones(2)
        >>> state = tx.init(params)
        >>> _, state = tx.update(jnp.ones(2), state, params, value=jnp.inf)
        >>> counts = finch_optax.skip_counts(state)
        >>> print(int(counts.skipped), int(counts.consecutive_skips))
        1 1
    """
    leaves = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=_is_skip_state)[0]
    found = [(jax.tree_util.keystr(path), leaf) for path, leaf in leaves if _is_skip_state(leaf)]
    if not found:
        raise ValueError(
            f"skip_counts: no SkipNonfiniteState in the optimizer state (a {type(opt_state).__name__}); "
            "wrap the optimizer in finch_optax.skip_nonfinite (the finch_* aliases already are)."
        )
    if len(found) > 1:
        paths = ", ".join(path for path, _ in found)
        raise ValueError(f"skip_counts: {len(found)} SkipNonfiniteStates side by side (at {paths}); read each one.")
    node = found[0][1]
    if isinstance(node, SkipNonfiniteState):
        return SkipCounts(jnp.asarray(node.skipped), jnp.asarray(node.consecutive_skips))
    if "skipped" in node:
        return SkipCounts(jnp.asarray(node["skipped"]), jnp.asarray(node["consecutive_skips"]))
    return SkipCounts(jnp.asarray(node["total_skipped"]), jnp.asarray(node["consecutive_skipped"]))

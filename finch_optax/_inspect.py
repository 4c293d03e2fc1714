"""Finding FINCH's state inside any nest of optax wrappers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from finch_optax._finch import FinchState


def find_finch_states(opt_state: Any) -> list[tuple[str, FinchState]]:
    """Every :class:`FinchState` in an optimizer state, with its path, in pytree order.

    Works through any pytree nesting: ``optax.chain`` tuples, ``named_chain`` and ``multi_transform`` dicts,
    ``inject_hyperparams``, ``MultiSteps``, ``apply_if_finite``, ``masked``, and user containers. A flattened
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
        ['.inner_opt_state[2]']
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

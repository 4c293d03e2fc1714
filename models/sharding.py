"""Activation sharding hints: the model names its activations' axes; the training stack says how to shard them.

Parameters carry logical axis names (``embed``, ``heads``, ...) and ``train.mesh`` maps them onto a device mesh. That
alone leaves XLA to guess how the *activations* are laid out, and with params split over ``fsdp`` along ``embed`` it
can guess badly (gathering the whole global batch on every chip to meet the params' layout). So the model marks its
main activations with logical names too (``("batch", "length", "embed")`` for the residual stream, ...) through
:func:`constrain`, which is a no-op until the caller installs a :class:`ShardingContext` with
:func:`activation_sharding`. ``models/`` never learns the mesh's axis names: the context's ``spec_for`` does the
mapping. Kernels that must run per device (splash attention under ``shard_map``) read the mesh from the same context.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import jax
from jax.sharding import Mesh, PartitionSpec

__all__ = ["ShardingContext", "activation_sharding", "constrain", "current"]


@dataclasses.dataclass(frozen=True)
class ShardingContext:
    """How to lay out activations on ``mesh``.

    Attributes:
      mesh: the device mesh the step runs on.
      spec_for: ``(logical axes, shape) -> PartitionSpec`` for an activation (``None`` entries stay replicated).
    """

    mesh: Mesh
    spec_for: Callable[[Sequence[str | None], Sequence[int]], PartitionSpec]


_CONTEXT: contextvars.ContextVar[ShardingContext | None] = contextvars.ContextVar("activation_sharding", default=None)


def current() -> ShardingContext | None:
    """The installed context, or ``None`` (single device, or a caller that leaves layout to XLA)."""
    return _CONTEXT.get()


@contextlib.contextmanager
def activation_sharding(context: ShardingContext | None) -> Iterator[None]:
    """Installs ``context`` while the model is traced (``None`` leaves activations unconstrained)."""
    token = _CONTEXT.set(context)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``x`` with a sharding constraint from its logical ``axes``, or ``x`` itself when no context is installed."""
    context = _CONTEXT.get()
    if context is None:
        return x
    spec = context.spec_for(tuple(axes), x.shape)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(context.mesh, spec))

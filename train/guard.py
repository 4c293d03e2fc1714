"""The divergence guard, host side: stop a run whose steps keep being skipped for a NaN/inf loss or gradient.

The skipping itself happens inside the jitted step, in one place: :func:`train.optimizers.make_optimizer` wraps the
whole optimizer chain in :func:`finch_optax.skip_nonfinite`, so a step whose loss or any gradient is NaN/inf returns
zero updates and leaves params and the *whole* optimizer state (Adam's moments, FINCH's EMA, every count) as they
were. The step reports the wrapper's counters as the metrics ``skipped`` (total) and ``consecutive_skips``; this
module reads them as they are logged and stops the run after ``guard.max_consecutive_skips`` in a row, since by then
the loss will not come back by itself (a model file with NaN weights, a learning rate far too high, fp16 overflow).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train.mesh import path_str

__all__ = ["DivergenceError", "NonFiniteWeightsError", "SkipWatch", "check_finite_params", "first_nonfinite"]


class DivergenceError(RuntimeError):
    """Training stopped: too many consecutive steps had a NaN/inf loss or gradient."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class NonFiniteWeightsError(ValueError):
    """The model to fine-tune holds NaN or inf weights (a broken model file)."""


class SkipWatch:
    """Watches the logged metrics; raises :class:`DivergenceError` after ``max_consecutive`` skips in a row.

    Args:
      max_consecutive: the limit (0 = never stop; the skips are still counted and logged).
      last_good_step: a callable returning the newest checkpoint step (for the message), or ``None``.
    """

    def __init__(self, max_consecutive: int, last_good_step: Any = None):
        self.max_consecutive = max_consecutive
        self._last_good_step = last_good_step
        self._seen = 0

    def check(self, records: Sequence[dict[str, float]]) -> None:
        """Looks at the records logged since the last call (``records`` is the logger's growing list)."""
        new, self._seen = records[self._seen :], len(records)
        for record in new:
            run = int(record.get("consecutive_skips", 0))
            if self.max_consecutive and run >= self.max_consecutive:
                step = int(record["step"])
                last = self._last_good_step() if self._last_good_step is not None else None
                where = f"; the last good checkpoint is step {last}" if last is not None else ""
                raise DivergenceError(
                    f"training diverged: steps {step - run + 1}..{step} ({run} in a row) had a NaN/inf loss or "
                    f"gradient and were skipped (guard.max_consecutive_skips={self.max_consecutive}); stopped at "
                    f"step {step} without saving{where}. Lower the learning rate or check the data and model.",
                    step,
                )


def check_finite_params(params: Any, source: str) -> None:
    """Raises :class:`NonFiniteWeightsError` naming the first param with a NaN/inf (every step would be skipped)."""
    bad = first_nonfinite(params)
    if bad is not None:
        raise NonFiniteWeightsError(f"model {source}: parameter {bad!r} holds NaN or inf values; the file is broken")


@jax.jit
def _nonfinite_flags(leaves: list[jax.Array]) -> list[jax.Array]:
    return [jnp.any(~jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.zeros((), bool) for x in leaves]


def first_nonfinite(tree: Any) -> str | None:
    """The path of the first leaf of ``tree`` holding a NaN or inf, or ``None`` when all are finite."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for (path, _), bad in zip(flat, _nonfinite_flags([x for _, x in flat])):
        if isinstance(bad, jax.Array) and not bad.is_fully_addressable:
            bad = bad.addressable_data(0)
        if bool(np.asarray(bad)):
            return path_str(path)
    return None

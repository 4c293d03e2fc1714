"""finch_optax: FINCH, a loss-adaptive learning rate for fine-tuning with less forgetting, for optax.

.. code-block:: python

    tx = finch_optax.finch_adamw(base_learning_rate=3e-5, max_learning_rate=1e-4)
    updates, state = tx.update(grads, state, params, value=loss)   # every update needs the loss
    lr = finch_optax.current_learning_rate(state)
    skipped = finch_optax.skip_counts(state)   # steps skipped for a NaN/inf loss or gradient

References:
  FINCH, a loss-adaptive learning rate for fine-tuning with less forgetting,
  `arXiv:2605.20005 <https://arxiv.org/abs/2605.20005>`_, 2026.
"""

from finch_optax._alias import finch_adamw
from finch_optax._finch import (
    FinchState,
    ScalarOrSchedule,
    base_learning_rate_for_target_loss,
    finch_learning_rate,
    scale_by_finch,
)
from finch_optax._inspect import SkipCounts, current_learning_rate, find_finch_states, skip_counts
from finch_optax._skip import SkipNonfiniteState, skip_nonfinite

__all__ = [
    "FinchState",
    "ScalarOrSchedule",
    "SkipCounts",
    "SkipNonfiniteState",
    "base_learning_rate_for_target_loss",
    "current_learning_rate",
    "finch_adamw",
    "finch_learning_rate",
    "find_finch_states",
    "scale_by_finch",
    "skip_counts",
    "skip_nonfinite",
]
__version__ = "0.1.0"

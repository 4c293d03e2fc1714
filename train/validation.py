"""Validation loss during fine-tuning: the token-weighted mean loss of held-out rows under the current params.

The rows go through the same sharded forward pass as training (``train.step.token_loss_sums``), in micro-batches
of the training micro-batch size; the last one is padded with rows of weight 0, which count for nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from train import data as data_lib
from train import step as step_lib

__all__ = ["Validator"]


class Validator:
    """``validator(params) -> (mean loss, weighted tokens)`` over fixed held-out rows.

    Args:
      apply_fn: the model's pure apply function (``train.step.split_model``).
      rows: the packed validation rows.
      batch_size: rows per forward pass (a multiple of the data-parallel size).
      to_device: host batch -> global device batch (``finetune``'s batch placement).
      params_sharding, batch_sharding: the shardings params and batches arrive in.
      frozen_sharding: a LoRA model's frozen base's (``None`` for full fine-tuning).
    """

    def __init__(
        self,
        apply_fn: step_lib.ApplyFn,
        rows: data_lib.PackedRows,
        batch_size: int,
        to_device: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]],
        params_sharding: Any,
        batch_sharding: Any,
        frozen_sharding: Any = None,
    ):
        self.rows = rows
        self.batch_size = batch_size
        self._to_device = to_device
        self._sums = jax.jit(
            lambda params, frozen, batch: step_lib.token_loss_sums(apply_fn, params, batch, frozen),
            in_shardings=(params_sharding, frozen_sharding, batch_sharding),
        )

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        n = len(self.rows)
        for start in range(0, n, self.batch_size):
            index = np.arange(start, start + self.batch_size)
            batch = self.rows.take(np.minimum(index, n - 1))
            if index[-1] >= n:  # pad with copies of the last row, weighted 0
                batch["loss_mask"] = batch["loss_mask"] * (index < n)[:, None].astype(np.float32)
            yield batch

    def __call__(self, params: Any, frozen: Any = None) -> tuple[float, float]:
        total = weight = 0.0
        for batch in self._batches():
            loss_sum, weight_sum = self._sums(params, frozen, self._to_device(batch))
            total += float(np.asarray(jax.device_get(_replica(loss_sum))))
            weight += float(np.asarray(jax.device_get(_replica(weight_sum))))
        return total / max(weight, 1.0), weight


def _replica(x: jax.Array) -> jax.Array:
    # A replicated scalar of a multi-process run: every process holds the full value.
    return x if x.is_fully_addressable else x.addressable_data(0)

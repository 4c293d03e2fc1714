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

    def __call__(self, params: Any, frozen: Any = None) -> tuple[float, float]:
        total = weight = 0.0
        for batch in padded_batches(self.rows, self.batch_size):
            loss_sum, weight_sum = self._sums(params, frozen, self._to_device(batch))
            total += host_scalar(loss_sum)
            weight += host_scalar(weight_sum)
        return total / max(weight, 1.0), weight


def host_scalar(x: jax.Array) -> float:
    """A scalar on the host; of a multi-process run's replicated scalar, every process reads its own copy."""
    return float(np.asarray(jax.device_get(x if x.is_fully_addressable else x.addressable_data(0))))


def padded_batches(rows: Any, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """``rows`` in order, ``batch_size`` at a time; the last batch is padded with copies of the last row, weighted 0."""
    n = len(rows)
    for start in range(0, n, batch_size):
        index = np.arange(start, start + batch_size)
        batch = rows.take(np.minimum(index, n - 1))
        if index[-1] >= n:
            batch["loss_mask"] = batch["loss_mask"] * (index < n)[:, None].astype(np.float32)
        yield batch

"""Per-step metrics: a JSONL file, TensorBoard event files and a terminal progress bar.

The training loop hands metrics over one step late (:class:`DelayedMetrics`): step ``t``'s device scalars are read
back only after step ``t + 1`` has been dispatched, so the host never waits on the device between steps.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

__all__ = ["DelayedMetrics", "MetricsLogger", "to_host_scalars"]


def to_host_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Device scalars → Python floats/ints (works for replicated arrays spanning several processes)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, jax.Array) and not v.is_fully_addressable:
            v = v.addressable_data(0)  # replicated: every process holds the full value
        a = np.asarray(v)
        out[k] = int(a) if np.issubdtype(a.dtype, np.integer) else float(a)
    return out


class MetricsLogger:
    """Writes one JSON object per step to ``<output_dir>/metrics.jsonl`` and scalars to TensorBoard.

    Only process 0 writes files and draws the progress bar. ``tokens_per_s`` is measured between consecutive logged
    steps (wall time of the host loop, so it includes any input pipeline stalls).
    """

    def __init__(
        self,
        output_dir: str | None,
        *,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
        append: bool = False,
    ):
        self.is_main = jax.process_index() == 0
        self.records: list[dict[str, float]] = []
        self._jsonl = None
        self._tb = None
        self._bar = None
        self._last_time: float | None = None
        if self.is_main and output_dir:
            os.makedirs(output_dir, exist_ok=True)
            self._jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a" if append else "w", encoding="utf-8")
            if tensorboard:
                self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        if self.is_main and progress:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="finetune", unit="step", dynamic_ncols=True)

    def start_clock(self) -> None:
        self._last_time = time.perf_counter()

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Records ``metrics`` of update ``step`` (1-based: the state's step after the update)."""
        record: dict[str, float] = {"step": int(step), **to_host_scalars(metrics)}
        now = time.perf_counter()
        if self._last_time is not None:
            dt = now - self._last_time
            record["step_time_s"] = dt
            if "tokens" in record and dt > 0:
                record["tokens_per_s"] = record["tokens"] / dt
        self._last_time = now
        self.records.append(record)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}", v, int(step))
        if self._bar is not None:
            post = {"loss": f"{record.get('loss', float('nan')):.4f}", "lr": f"{record.get('lr', float('nan')):.2e}"}
            if "tokens_per_s" in record:
                post["tok/s"] = f"{record['tokens_per_s']:.0f}"
            self._bar.set_postfix(post, refresh=False)
            self._bar.update(1)
        return record

    def log_eval(self, step: int, metrics: Mapping[str, float]) -> dict[str, float]:
        """Records evaluation scalars (e.g. ``val_loss``) at ``step`` as their own JSONL line and TensorBoard
        ``eval/`` scalars, and prints them; they stay out of :attr:`records` (one per training step)."""
        record: dict[str, float] = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        if not self.is_main:
            return record
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if math.isfinite(v):
                    self._tb.add_scalar(f"eval/{k}", float(v), int(step))
        tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return record

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


class DelayedMetrics:
    """Holds the last step's device metrics and logs them when the next step has been dispatched."""

    def __init__(self, logger: MetricsLogger):
        self.logger = logger
        self._pending: tuple[int, Any] | None = None

    def push(self, step: int, metrics: Any) -> None:
        self.flush()
        self._pending = (step, metrics)

    def flush(self) -> None:
        if self._pending is not None:
            step, metrics = self._pending
            self._pending = None
            self.logger.log(step, metrics)

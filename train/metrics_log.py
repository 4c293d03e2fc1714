"""Per-step metrics: to the run's trackers (a JSONL file, TensorBoard, W&B) and a terminal progress bar.

The training loop hands metrics over one step late (:class:`DelayedMetrics`): step ``t``'s device scalars are read
back only after step ``t + 1`` has been dispatched, so the host never waits on the device between steps.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from train import trackers as trackers_lib

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
    """Hands every step's metrics, every evaluation's and every generation to the run's trackers
    (:mod:`train.trackers`: ``metrics.jsonl``, TensorBoard, W&B) and draws the progress bar.

    Only process 0 writes and draws. ``tokens_per_s`` is measured between consecutive logged steps (wall time of the
    host loop, so it includes any input pipeline stalls). The bar shows the last evaluation beside the loss.
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
        wandb_project: str = "",
        config: Mapping[str, Any] | None = None,
    ):
        self.is_main = jax.process_index() == 0
        self.records: list[dict[str, float]] = []
        self._trackers: list[trackers_lib.Tracker] = []
        self._bar = None
        self._last_time: float | None = None
        self._last_eval: dict[str, str] = {}
        if self.is_main and output_dir:
            self._trackers = trackers_lib.make_trackers(
                output_dir,
                append=append,
                tensorboard=tensorboard,
                wandb_project=wandb_project,
                config=config,
                resume_step=start_step,
            )
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
        for tracker in self._trackers:
            tracker.scalars("train", step, record)
        if self._bar is not None:
            post = {"loss": f"{record.get('loss', float('nan')):.4f}", "lr": f"{record.get('lr', float('nan')):.2e}"}
            if "tokens_per_s" in record:
                post["tok/s"] = f"{record['tokens_per_s']:.0f}"
            self._bar.set_postfix({**post, **self._last_eval}, refresh=False)
            self._bar.update(1)
        return record

    def log_eval(self, step: int, metrics: Mapping[str, float]) -> dict[str, float]:
        """Records evaluation scalars (``val_loss``, ``retain_kl``, ...) at ``step`` as their own JSONL line and
        TensorBoard ``eval/`` scalars, and prints them; they stay out of :attr:`records` (one per training step)."""
        record: dict[str, float] = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        if not self.is_main:
            return record
        for tracker in self._trackers:
            tracker.scalars("eval", step, record)
        shown = {k: v for k, v in metrics.items() if k in ("val_loss", "retain_kl")}
        self._last_eval = {k.replace("_loss", "").replace("retain_", "ret_"): f"{v:.4g}" for k, v in shown.items()}
        tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return record

    def log_text(self, step: int, name: str, text: str) -> None:
        """Records a text (e.g. the evaluation's greedy generations) under ``name``."""
        for tracker in self._trackers if self.is_main else ():
            tracker.text(step, name, text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []


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

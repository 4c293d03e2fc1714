"""Where a run's metrics go: ``metrics.jsonl`` and TensorBoard (as always), Weights & Biases (optional).

A tracker takes scalars under a section (``train`` every step, ``eval`` at every evaluation) and text (the greedy
generations of an evaluation); :class:`train.metrics_log.MetricsLogger` hands every record to each tracker the run
has. Adding a tracker is one class here and one line in :func:`make_trackers`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any, Protocol

__all__ = ["JsonlTracker", "TensorBoardTracker", "Tracker", "WandbTracker", "make_trackers"]


class Tracker(Protocol):
    def scalars(self, section: str, step: int, values: Mapping[str, float]) -> None: ...

    def text(self, step: int, name: str, text: str) -> None: ...

    def close(self) -> None: ...


class JsonlTracker:
    """``metrics.jsonl``: one JSON object per training step; evaluations and generations as lines of their own."""

    def __init__(self, output_dir: str, *, append: bool):
        self._file = open(os.path.join(output_dir, "metrics.jsonl"), "a" if append else "w", encoding="utf-8")

    def scalars(self, section: str, step: int, values: Mapping[str, float]) -> None:
        self._write({"step": int(step), **values})

    def text(self, step: int, name: str, text: str) -> None:
        self._write({"step": int(step), name: text})

    def _write(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardTracker:
    """TensorBoard event files in ``<run folder>/tensorboard``: scalars as ``train/NAME`` / ``eval/NAME``."""

    def __init__(self, output_dir: str):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def scalars(self, section: str, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(f"{section}/{key}", value, int(step))

    def text(self, step: int, name: str, text: str) -> None:
        self._writer.add_text(name, text, int(step))

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    """A Weights & Biases run in ``<run folder>/wandb`` (``WANDB_MODE=offline`` keeps it there, for ``wandb sync``)."""

    def __init__(self, output_dir: str, project: str, config: Mapping[str, Any], *, resume_step: int):
        try:
            import wandb
        except ImportError:
            raise ImportError("wandb_project is set but wandb is not installed: pip install wandb") from None
        self._wandb = wandb
        self._run = wandb.init(
            project=project,
            dir=output_dir,
            name=os.path.basename(os.path.normpath(output_dir)),
            config=dict(config),
            resume="allow",
            id=_run_id(output_dir),
        )
        self._resume_step = resume_step

    def scalars(self, section: str, step: int, values: Mapping[str, float]) -> None:
        data = {f"{section}/{k}": v for k, v in values.items() if k != "step" and isinstance(v, (int, float))}
        self._run.log(data, step=int(step))

    def text(self, step: int, name: str, text: str) -> None:
        self._run.log({name: self._wandb.Html(f"<pre>{_escape(text)}</pre>")}, step=int(step))

    def close(self) -> None:
        self._run.finish()


def _run_id(output_dir: str) -> str:
    """One W&B run per run folder (a resumed run continues it)."""
    path = os.path.join(output_dir, "wandb_run_id")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    with open(path, "w", encoding="utf-8") as f:
        f.write(run_id)
    return run_id


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def make_trackers(
    output_dir: str,
    *,
    append: bool,
    tensorboard: bool,
    wandb_project: str = "",
    config: Mapping[str, Any] | None = None,
    resume_step: int = 0,
) -> list[Tracker]:
    """The trackers a run writes to (process 0 only)."""
    os.makedirs(output_dir, exist_ok=True)
    trackers: list[Tracker] = [JsonlTracker(output_dir, append=append)]
    if tensorboard:
        trackers.append(TensorBoardTracker(output_dir))
    if wandb_project:
        trackers.append(WandbTracker(output_dir, wandb_project, config or {}, resume_step=resume_step))
    return trackers

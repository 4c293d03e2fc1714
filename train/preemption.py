"""Preemption: SIGTERM (how TPU/GPU clouds and schedulers stop a job) becomes "save at the next step, then stop".

A single process installs a SIGTERM handler that only sets a flag; the training loop checks it at every step
boundary, saves a checkpoint of the state it has, waits for the save to be on disk and raises :class:`Preempted`,
which the CLI turns into exit code :data:`EXIT_CODE` (128 + SIGTERM, what a shell reports for a job ended by that
signal). Resuming with the same command then loses nothing. The previous handler is restored when the run ends, so
a process that runs several fine-tunes (the lab) gets its own behaviour back between them.

With several processes a signal may reach only some hosts, and every host must stop at the same step: there the
decision is JAX's ``multihost_utils.reached_preemption_sync_point(step)`` (what orbax's ``reached_preemption`` calls),
which agrees on a step through the coordination service that ``jax.distributed.initialize`` starts and that receives
the preemption notice itself; no Python handler is installed then. This path is not exercised by the tests (they
send SIGTERM to one process).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import jax
from jax.experimental import multihost_utils

__all__ = ["EXIT_CODE", "Preempted", "PreemptionWatch"]

EXIT_CODE = 128 + signal.SIGTERM


class Preempted(RuntimeError):
    """The run was asked to stop (SIGTERM) and saved a checkpoint at ``step`` first."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class PreemptionWatch:
    """A context manager: while active, SIGTERM is recorded instead of killing the process.

    Args:
      multihost_check: ``step -> bool`` agreed across processes; used instead of the signal handler when
        ``jax.process_count() > 1``. Default: :func:`_reached_sync_point`.
    """

    def __init__(self, multihost_check: Callable[[int], bool] | None = None):
        self._multihost_check = multihost_check or _reached_sync_point
        self._signal: int | None = None
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> PreemptionWatch:
        # Python delivers signals to the main thread only; a run started from another thread keeps the default.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._signal is not None:  # a second SIGTERM while saving: the sender insists, stop now
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)
        self._signal = signum

    def requested(self, step: int) -> bool:
        """Whether to save and stop after ``step`` (call at every step boundary, on every process)."""
        if jax.process_count() > 1:
            return bool(self._multihost_check(step))
        return self._signal is not None


def _reached_sync_point(step: int) -> bool:
    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # no preemption service (JAX_ENABLE_PREEMPTION_SERVICE off, or no coordination service)
        return False

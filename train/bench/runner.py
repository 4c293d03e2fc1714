"""What every runner shares: the :class:`Runner` handle, the synthetic batch it steps on, and the progress log.

A runner is one implementation's compiled step with its state (JAX, PyTorch or the matmul peak probe), ready to be
timed by :mod:`train.bench.stats`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["Runner", "log", "synthetic_batch"]


@dataclasses.dataclass
class Runner:
    """A compiled step with its state, ready to be called; ``step()`` blocks until the device is done."""

    name: str
    step: Callable[[], None]
    compile_s: float | None
    info: dict[str, Any]
    close: Callable[[], None] = lambda: None
    # profile(steps) -> the step's time split by op class (train.bench.profile_xla / profile_torch), or None
    profile: Callable[[int], dict[str, Any]] | None = None


def synthetic_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int) -> dict[str, np.ndarray]:
    """Random token ids in the train step's batch layout (every token counted, one segment per row)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(batch_size, seq_len + 1), dtype=np.int32)
    return {
        "tokens": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": np.ones((batch_size, seq_len), np.float32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy(),
        "segment_ids": np.ones((batch_size, seq_len), np.int32),
    }


def log(msg: str) -> None:
    """A timestamped progress line on stderr (stdout carries the table, and the worker protocol)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

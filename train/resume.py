"""Resuming safely: the run that continues from a checkpoint must be the run that wrote it.

A checkpoint stores the config it was trained with and a fingerprint of the packed training rows. On resume,
:func:`check_same_run` compares them with this run's: any changed setting that alters the training trajectory —
the optimizer and its rates, the schedule, batch and sequence sizes, the data files *or their content*, the seeds,
the model — is refused with a :class:`ResumeMismatchError` listing every difference, unless
``checkpoint.accept_config_change=true``, which prints the same diff and carries on. Settings that only say where
and how to write, how to shard or how long to run (:data:`SAFE_TO_CHANGE`) may change freely: resuming on another
mesh is exact, and extending ``steps`` is the usual reason to resume (except that it moves a ``warmup_cosine`` decay
tied to the run's length, which is then flagged).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np

from models.config import ConfigError

__all__ = [
    "SAFE_TO_CHANGE",
    "ResumeMismatchError",
    "check_same_base",
    "check_same_run",
    "config_diff",
    "keep_previous_config",
    "rows_fingerprint",
    "trim_metrics",
]

# Dotted keys (or prefixes ending in ".") that may differ between a checkpoint's run and the resuming one.
SAFE_TO_CHANGE = (
    "checkpoint.",
    "data.validation_files",
    "data.validation_every",
    "data.retain_files",
    "data.retain_top_k",
    "data.retain_rows",
    "guard.",
    "mesh.",
    "output.",
    "output_dir",
    "tensorboard",
    "wandb_project",
    "progress",
    "model.remat",
    "steps",
)


class ResumeMismatchError(ConfigError):
    """The resuming run's config or data differ from the checkpoint's in a way that changes training."""


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_TO_CHANGE)


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(key, old, new), ...]`` for every dotted key whose value changes the run (absent keys read as missing)."""
    a, b = _flatten(old), _flatten(new)
    diff = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if isinstance(va, list):
            va = tuple(va)
        if isinstance(vb, list):
            vb = tuple(vb)
        if va != vb and not _safe(key):
            diff.append((key, va, vb))
    # A longer run moves a warmup_cosine decay that is tied to the run's length.
    opt = b.get("optimizer.schedule")
    if opt == "warmup_cosine" and not b.get("optimizer.decay_steps") and a.get("steps") != b.get("steps"):
        diff.append(("steps (sets the warmup_cosine decay length)", a.get("steps"), b.get("steps")))
    return diff


def rows_fingerprint(rows: Any) -> str:
    """A SHA-256 of the packed training rows (tokens, targets, weights, segments): the data's content."""
    h = hashlib.sha256()
    for name in ("tokens", "targets", "loss_mask", "positions", "segment_ids"):
        value = getattr(rows, name, None)
        if value is not None:
            a = np.ascontiguousarray(value)
            h.update(f"{name}:{a.dtype}:{a.shape};".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def check_same_run(
    meta: Mapping[str, Any], config: Mapping[str, Any], data_fingerprint: str, *, step: int, accept: bool
) -> list[tuple[str, Any, Any]]:
    """Compares a checkpoint's ``meta`` with this run; returns the diff (empty when the same).

    Raises:
      ResumeMismatchError: something differs and ``accept`` is off; the message lists every difference.
    """
    diff = config_diff(meta.get("config", {}), config)
    saved = meta.get("data_fingerprint")
    if saved is not None and saved != data_fingerprint:
        diff.append(("data (content of the packed training rows)", saved[:12], data_fingerprint[:12]))
    elif saved is not None:  # the same rows from files that moved (another machine, a renamed folder)
        diff = [d for d in diff if d[0] != "data.train_files"]
    if not diff:
        return diff
    lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff)
    if not accept:
        raise ResumeMismatchError(
            f"resuming from checkpoint step {step} with a different run: {lines}. Restore the old settings, use a "
            "new checkpoint.directory, or pass checkpoint.accept_config_change=true to continue anyway"
        )
    print(f"resume: continuing from step {step} with changed settings (accepted): {lines}", flush=True)
    return diff


def check_same_base(meta: Mapping[str, Any], frozen_digest: str | None, *, step: int) -> None:
    """Refuses to resume LoRA adapters onto another base than the one they were trained on (its digest is in the
    checkpoint's metadata; the base itself is reloaded from ``model.source``).

    Raises:
      ResumeMismatchError: the digests differ.
    """
    saved = meta.get("frozen_digest")
    if saved != frozen_digest:
        raise ResumeMismatchError(
            f"checkpoint step {step} holds LoRA adapters trained on a base model with digest {saved}, but "
            f"model.source={meta.get('config', {}).get('model', {}).get('source')!r} now loads one with digest "
            f"{frozen_digest}: the base's weights changed. Restore the original base file or start a new run"
        )


def keep_previous_config(output_dir: str, step: int) -> str | None:
    """Copies ``<output_dir>/config.yaml`` to ``config.before-step<step>.yaml`` (before a changed config replaces it)."""
    src = os.path.join(output_dir, "config.yaml")
    if not os.path.isfile(src):
        return None
    dst = os.path.join(output_dir, f"config.before-step{step}.yaml")
    shutil.copyfile(src, dst)
    return dst


def trim_metrics(output_dir: str, step: int) -> int:
    """Drops ``metrics.jsonl`` lines of steps after ``step`` (logged before a crash, about to be re-run).

    Returns the number of lines dropped. The file is rewritten atomically (a temporary file renamed over it).
    """
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) > step:
                continue
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill: drop it too
        keep.append(line)
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return len(lines) - len(keep)

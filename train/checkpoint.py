"""Checkpoints with orbax-checkpoint's ``CheckpointManager``: the whole train state plus a JSON sidecar.

A checkpoint at step ``s`` holds two items:

* ``state`` — the :class:`train.step.TrainState` (params, the full optimizer state with FINCH's EMA/lr/counters, the
  L2-SP anchor, step, RNG), saved asynchronously and restored straight into the target shardings (each process
  reads only the shards its devices own; there is no full-replica detour);
* ``meta`` — JSON: the data loader position, the config it was trained with, and a shape signature used to refuse an
  incompatible restore with a clear message.

Orbax writes each step to a temporary directory and renames it only once every file is on disk, so a process killed
mid-save leaves the previous checkpoints intact and the partial one invisible; resume then starts from the last
complete step. This module never deletes anything except through ``max_to_keep`` after a successful save.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from train.mesh import path_str
from train.step import TrainState

__all__ = ["CheckpointError", "Checkpointer", "state_signature"]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored into this run (corrupt, or saved by an incompatible config)."""


def _state_to_tree(state: TrainState) -> dict[str, Any]:
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}
    if state.anchor is not None:
        tree["anchor"] = state.anchor
    return tree


def _tree_to_state(tree: dict[str, Any]) -> TrainState:
    return TrainState(
        step=tree["step"],
        params=tree["params"],
        opt_state=tree["opt_state"],
        anchor=tree.get("anchor"),
        rng=tree["rng"],
    )


def state_signature(state: Any) -> list[list[Any]]:
    """``[[path, shape, dtype], ...]`` of every state leaf: what a restore target must match."""
    flat, _ = jax.tree_util.tree_flatten_with_path(_state_to_tree(state))
    return [[path_str(p), list(np.shape(x)), str(np.dtype(x.dtype))] for p, x in flat]


class Checkpointer:
    """Save / restore :class:`TrainState` + metadata under ``directory`` (one sub-directory per step)."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 else None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (partial saves of a killed process are not listed)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: TrainState, meta: dict[str, Any], *, force: bool = True) -> bool:
        """Starts an (asynchronous) save; returns whether one was started. Call :meth:`wait` before exiting."""
        meta = dict(meta, signature=state_signature(state), step=int(step))
        return self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(_state_to_tree(state)), meta=ocp.args.JsonSave(meta)),
            force=force,
        )

    def read_meta(self, step: int) -> dict[str, Any]:
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for unreadable files
            raise CheckpointError(
                f"checkpoint {self.directory}/{step}: cannot read its metadata ({type(e).__name__}: {e})"
            ) from e
        return dict(restored["meta"])

    def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """Restores ``step`` into ``target``'s structure, dtypes and shardings (``ShapeDtypeStruct`` leaves).

        Raises:
          CheckpointError: the files are unreadable or were saved with different shapes/dtypes/structure; the
            message names the first mismatching leaf. Nothing on disk is modified.
        """
        meta = self.read_meta(step)
        want = state_signature(target)
        have = meta.get("signature")
        if have is not None and have != want:
            have_d = {p: (s, d) for p, s, d in have}
            want_d = {p: (s, d) for p, s, d in want}
            diff = [p for p in sorted(set(have_d) | set(want_d)) if have_d.get(p) != want_d.get(p)]
            first = diff[0]
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} is incompatible with this run: {len(diff)} state entries "
                f"differ, first {first!r}: checkpoint has {have_d.get(first)}, this run needs {want_d.get(first)} "
                "(a different model, optimizer or l2sp setting?). Use a new checkpoint.directory."
            )
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_state_to_tree(target)))
            )
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} could not be restored ({type(e).__name__}: {e})"
            ) from e
        return _tree_to_state(restored["state"]), meta

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

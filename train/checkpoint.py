"""Checkpoints with orbax-checkpoint's ``CheckpointManager``: the whole train state plus a JSON sidecar.

A checkpoint at step ``s`` holds two items:

* ``state`` — the :class:`train.step.TrainState` (params, the full optimizer state with FINCH's EMA/lr/counters and
  the skip counters, the L2-SP anchor, step, RNG), saved asynchronously and restored straight into the target
  shardings (each process reads only the shards its devices own; there is no full-replica detour);
* ``meta`` — JSON: the data loader position, the config it was trained with, a shape signature used to refuse an
  incompatible restore with a clear message, and a checksum of every array.

Integrity: the checksums are computed on the devices from the state being saved and recomputed from the restored
arrays, so any change between the two — a flipped byte on disk, a truncated or swapped file, a decompression that
"succeeds" on damaged data — is a :class:`CorruptCheckpointError` naming the step and the first bad array. The
checksum of an array is a sum of mixed ``(bit pattern, flat index)`` words mod 2^32: integer sums do not depend on
the order they are added in, so it is the same for any sharding or mesh the state is saved from or restored into.

Only finite states are saved: :meth:`Checkpointer.save` refuses a state with a NaN/inf anywhere (params or optimizer
state), so every checkpoint on disk is a good one and ``keep``-N rotation can never leave only poisoned ones.

Orbax writes each step to a temporary directory and renames it only once every file is on disk, so a process killed
mid-save leaves the previous checkpoints intact and the partial one invisible; resume then starts from the last
complete step. This module deletes nothing except through ``keep`` after a successful save; a restore only reads.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from train import orbax_loop
from train.mesh import path_str
from train.step import TrainState

# A failed save or restore must not leave tensorstore operations reporting to orbax's closed event loop.
orbax_loop.install()

__all__ = [
    "CheckpointError",
    "CheckpointSaveError",
    "Checkpointer",
    "CorruptCheckpointError",
    "state_digest",
    "state_signature",
]

QUARANTINE_PREFIX = "corrupt-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored into this run (corrupt, or saved by an incompatible config)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files do not give back the arrays that were saved."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed (unwritable directory, disk full, ...)."""


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


# --------------------------------------------------------------------------------------------------------------------
# checksums and finiteness, computed on the devices


def _words(x: jax.Array) -> jax.Array:
    """The array's bit patterns as uint32, one word per element (two for 64-bit types)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = np.dtype(x.dtype).itemsize * 8
    if bits == 64:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bits]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _mix(h: jax.Array) -> jax.Array:
    # MurmurHash3's 32-bit finaliser: every input bit flips about half the output bits.
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _checksum(x: jax.Array) -> jax.Array:
    words = _words(x).reshape(-1)
    index = jnp.arange(words.shape[0], dtype=jnp.uint32)
    return jnp.sum(_mix(words ^ _mix(index + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)


@jax.jit
def _digest(tree: Any) -> tuple[jax.Array, list[jax.Array]]:
    leaves = jax.tree.leaves(tree)
    finite = jnp.ones((), jnp.bool_)
    for x in leaves:
        if jnp.issubdtype(x.dtype, jnp.inexact):
            finite = finite & jnp.all(jnp.isfinite(x))
    return finite, [_checksum(x) for x in leaves]


def _host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)  # replicated scalar: every process holds the value
    return np.asarray(x)


def tree_digest(tree: Any) -> str:
    """A short hex digest of every array of ``tree`` (computed on the devices, independent of sharding): e.g. the
    frozen base a LoRA run's adapters were trained on."""
    _finite, sums = _digest(tree)
    words = np.asarray([int(_host(x)) for x in sums], np.uint64)
    return hashlib.sha256(words.tobytes()).hexdigest()[:16]


def state_digest(state: TrainState) -> tuple[bool, dict[str, int]]:
    """``(all_finite, {path: checksum})`` of every state leaf; independent of the state's sharding."""
    tree = _state_to_tree(state)
    finite, sums = _digest(tree)
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    return bool(_host(finite)), {p: int(_host(s)) for p, s in zip(paths, sums)}


def _root_cause(error: BaseException) -> str:
    """One line for an exception from orbax's threads: the innermost OSError if there is one (e.g. ENOSPC)."""
    seen, e, found, texts = set(), error, None, []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        texts.append(str(e))
        if isinstance(e, OSError):
            found = e
        e = e.__cause__ or e.__context__
    # tensorstore reports a full disk as ValueError("RESOURCE_EXHAUSTED: ... No space left on device ...").
    if (found is not None and found.errno == errno.ENOSPC) or any("No space left on device" in t for t in texts):
        return "no space left on the device"
    if found is None:
        return f"{type(error).__name__}: {texts[0].splitlines()[0] if texts[0] else ''}"
    return f"{type(found).__name__}: {found.strerror or found} ({found.filename})"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"


class _Protected:
    """An orbax preservation policy: keep the steps ``steps()`` names at the time of each decision."""

    def __init__(self, steps: Callable[[], set[int]]):
        self._steps = steps

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        keep = self._steps()
        return [checkpoint.step in keep for checkpoint in checkpoints]


class Checkpointer:
    """Save / restore :class:`TrainState` + metadata under ``directory`` (one sub-directory per step)."""

    def __init__(
        self,
        directory: str,
        *,
        keep: int = 3,
        async_save: bool = True,
        create: bool = True,
        protected: Callable[[], set[int]] | None = None,
    ):
        """``keep`` newest checkpoints are kept (0: all), and every step ``protected()`` names at the time of a save
        (e.g. checkpoints a selection may still export)."""
        self.directory = os.path.abspath(directory)
        policies: list[Any] = [preservation.LatestN(n=keep)] if keep > 0 else [preservation.PreserveAll()]
        if protected is not None:
            policies.append(_Protected(protected))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            # The step directory is made in save() itself: made in the background, a failure to make it (an
            # unwritable directory) left orbax's other commit threads waiting for it for 20 minutes, blocking exit.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
            create=create,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        self._pending: int | None = None  # the step of the last save started
        self._unchecked = False  # whether that save's outcome is still unknown

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (partial saves of a killed process are not listed)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: TrainState, meta: dict[str, Any], *, force: bool = True) -> bool:
        """Starts an (asynchronous) save; returns whether one was started. Call :meth:`close` before exiting.

        A state holding a NaN or inf is never saved (returns ``False``): the checkpoints on disk stay the last good
        ones. The meta gains the state's signature, step and per-array checksums.

        Raises:
          CheckpointSaveError: this save, or an earlier asynchronous one, failed to write (one line naming the
            cause, e.g. no space left on the device).
        """
        self.check_for_errors()
        finite, checksums = state_digest(state)
        if not finite:
            print(
                f"checkpoint: not saving step {step}: the state holds NaN/inf; the last good checkpoint stays "
                f"{self.latest_step()}",
                flush=True,
            )
            return False
        meta = dict(meta, signature=state_signature(state), step=int(step), checksums=checksums)
        # orbax waits for the previous save inside save(); waiting here first names the step that failed.
        self.wait()
        try:
            started = self._manager.save(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(_state_to_tree(state)), meta=ocp.args.JsonSave(meta)
                ),
                force=force,
            )
        except Exception as e:
            raise CheckpointSaveError(f"checkpoint {self.directory}/{step}: save failed: {_root_cause(e)}") from e
        self._pending, self._unchecked = int(step), True
        return started

    def check_for_errors(self) -> None:
        """Raises :class:`CheckpointSaveError` if a finished asynchronous save failed (cheap; call every step).

        orbax's own ``check_for_errors`` misses a save whose directory could not be created: its commit threads
        wait for each other until a timeout, so the failure only shows when the save is waited for. A save that
        is no longer in progress is therefore waited for here (which returns at once) to learn how it ended.
        """
        try:
            self._manager.check_for_errors()
        except Exception as e:
            raise CheckpointSaveError(
                f"checkpoint {self.directory}/{self._pending}: asynchronous save failed: {_root_cause(e)}"
            ) from e
        if self._unchecked and not self._manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until the running asynchronous save is on disk; raises :class:`CheckpointSaveError` if it failed."""
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:
            raise CheckpointSaveError(
                f"checkpoint {self.directory}/{self._pending}: save failed: {_root_cause(e)}"
            ) from e
        self._unchecked = False

    def read_meta(self, step: int) -> dict[str, Any]:
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for unreadable files
            raise CorruptCheckpointError(
                f"checkpoint {self.directory}/{step} is corrupt: cannot read its metadata ({_first_line(e)})", step
            ) from e
        return dict(restored["meta"])

    def restore(
        self, step: int, target: TrainState, meta: dict[str, Any] | None = None
    ) -> tuple[TrainState, dict[str, Any]]:
        """Restores ``step`` into ``target``'s structure, dtypes and shardings (``ShapeDtypeStruct`` leaves).

        Raises:
          CheckpointError: the checkpoint was saved with different shapes/dtypes/structure; the message names the
            first mismatching leaf.
          CorruptCheckpointError: the files are unreadable, or give back arrays whose checksums differ from the
            saved ones. Nothing on disk is modified either way.
        """
        meta = self.read_meta(step) if meta is None else meta
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
            raise CorruptCheckpointError(
                f"checkpoint {self.directory}/{step} is corrupt: its arrays could not be restored ({_first_line(e)}); "
                "restore an earlier step with checkpoint.on_corrupt=previous or use a new checkpoint.directory",
                step,
            ) from e
        state = _tree_to_state(restored["state"])
        saved = meta.get("checksums")
        if saved is not None:
            _finite, got = state_digest(state)
            bad = [p for p in saved if got.get(p) != saved[p]]
            if bad:
                raise CorruptCheckpointError(
                    f"checkpoint {self.directory}/{step} is corrupt: {len(bad)} of {len(saved)} arrays differ from "
                    f"what was saved (first {bad[0]!r}); restore an earlier step with checkpoint.on_corrupt=previous "
                    "or use a new checkpoint.directory",
                    step,
                )
        return state, meta

    def restore_newest(
        self, target: TrainState, *, fall_back: bool = False, before_restore: Any = None
    ) -> tuple[int, TrainState, dict[str, Any], list[int]]:
        """Restores the newest checkpoint; with ``fall_back``, the newest one that is not corrupt.

        ``before_restore(step, meta)`` (optional) is called with each candidate's metadata before its arrays are
        read, e.g. to refuse a changed config before any device memory is spent.

        Returns:
          ``(step, state, meta, corrupt_steps)``: ``corrupt_steps`` are the newer steps skipped as corrupt.

        Raises:
          CorruptCheckpointError: the newest checkpoint is corrupt and ``fall_back`` is off, or every one is.
          CheckpointError: no checkpoint, or an incompatible one.
        """
        corrupt: list[int] = []
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        for step in steps:
            try:
                meta = self.read_meta(step)
                if before_restore is not None:
                    before_restore(step, meta)
                state, meta = self.restore(step, target, meta)
                return step, state, meta, corrupt
            except CorruptCheckpointError as e:
                if not fall_back:
                    raise
                print(f"checkpoint: {e}; falling back to the previous step", flush=True)
                corrupt.append(step)
        raise CorruptCheckpointError(f"every checkpoint in {self.directory} is corrupt (steps {corrupt})", corrupt[-1])

    def quarantine(self, step: int) -> str:
        """Renames step ``step``'s directory to ``corrupt-<step>`` (kept for inspection, no longer a checkpoint)."""
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.directory, f"{QUARANTINE_PREFIX}{step}")
        n = 1
        while os.path.exists(dst):
            dst = os.path.join(self.directory, f"{QUARANTINE_PREFIX}{step}.{n}")
            n += 1
        if jax.process_index() == 0:
            os.rename(src, dst)
        self._manager.reload()
        return dst

    def close(self) -> None:
        """Waits for the running save, then releases orbax's threads.

        Raises:
          CheckpointSaveError: the last asynchronous save failed.
        """
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:  # already reported by wait()
                pass

"""One writer per run directory: a lock file naming its owner, held with ``flock`` for the run's lifetime.

Two runs writing one output or checkpoint directory overwrite each other's checkpoints and metrics, and both report
success. :class:`RunLock` creates ``<dir>/.finch-train.lock`` holding ``{"pid", "host", "started"}`` and keeps an
exclusive ``flock`` on it. The kernel drops a ``flock`` when its process dies, however it dies (``kill -9``
included), so a lock file left behind by a dead run is recognised as stale and taken over; a live owner's is refused
with :class:`RunLockedError` naming the owner. Creating the lock file is also the first write into each directory,
so an unwritable one is reported here (:class:`UnwritableDirectoryError`), before any model is loaded; a file is also
created and removed beside it, since a lock file left by an earlier run can be written in a folder that no longer
takes new files.

``flock`` is advisory and per host: on a network filesystem whose locks do not reach other hosts, the owner's host
name in the file is what tells a person who holds the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError", "UnwritableDirectoryError", "hold"]

LOCK_NAME = ".finch-train.lock"


class RunLockedError(RuntimeError):
    """Another live process holds the directory's lock."""


class UnwritableDirectoryError(OSError):
    """A directory the run must write to cannot be created or written."""


class RunLock:
    """The exclusive lock of one directory (see the module docstring). Use :func:`hold` for several."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self._fd: int | None = None
        self.took_over: dict | None = None  # the stale owner's record, when the lock was taken over
        self.created: list[str] = []  # the folders acquire() made, deepest first

    def acquire(self) -> None:
        """Takes the lock, creating the directory if needed.

        Raises:
          RunLockedError: a live process holds it (the message names its pid, host and start time).
          UnwritableDirectoryError: the directory or the lock file cannot be created or written.
        """
        missing = self.directory
        while not os.path.exists(missing):
            self.created.append(missing)
            missing = os.path.dirname(missing)
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            self._remove_created()
            raise UnwritableDirectoryError(f"cannot write to {self.directory}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise RunLockedError(
                f"{self.directory} is in use by another run (pid {owner.get('pid', '?')} on host "
                f"{owner.get('host', '?')}, started {owner.get('started', '?')}); wait for it, stop it, or use "
                f"another directory (lock file: {self.path})"
            ) from None
        previous = _read_owner(fd)
        if previous.get("pid") is not None:
            self.took_over = previous
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            _check_can_add_files(self.directory)  # an existing lock file is writable in a folder that is not
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            self._remove_created()
            raise UnwritableDirectoryError(f"cannot write to {self.directory}: {e.strerror or e}") from e
        self._fd = fd

    def release(self, *, failed: bool = False) -> None:
        """Empties the lock file and drops the lock (a no-op when not held).

        With ``failed`` (the run stopped before it wrote anything there), folders :meth:`acquire` created that hold
        nothing but the lock file are removed with it: a refused run leaves no trace.
        """
        if self._fd is None:
            return
        # The file stays: unlinking it would let a newcomer lock the removed inode while a third locks a new file.
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        if failed and self.created and os.listdir(self.directory) == [LOCK_NAME]:
            with contextlib.suppress(OSError):
                os.remove(self.path)  # a folder made a moment ago: nobody else can be waiting on its lock file
            self._remove_created()
        os.close(self._fd)
        self._fd = None

    def _remove_created(self) -> None:
        """Removes the folders :meth:`acquire` made, deepest first, as long as they are empty."""
        for directory in self.created:
            try:
                os.rmdir(directory)
            except OSError:
                return


def _check_can_add_files(directory: str) -> None:
    """Creates and removes a file in ``directory``: the run's saves add files there, which an existing lock file
    (writable in place) does not prove possible."""
    probe = os.path.join(directory, f".finch-train.write-check-{os.getpid()}")
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    os.remove(probe)


def _read_owner(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def hold(directories: Iterable[str]) -> Iterator[list[RunLock]]:
    """Holds the locks of every (distinct) directory for the ``with`` block; all or none are taken.

    When the block raises, a directory the locks created and the run left empty is removed again.
    """
    locks: list[RunLock] = []
    seen: set[str] = set()
    failed = True
    try:
        for directory in directories:
            lock = RunLock(directory)
            if lock.directory in seen:
                continue
            seen.add(lock.directory)
            lock.acquire()
            locks.append(lock)
            if lock.took_over is not None:
                owner = lock.took_over
                print(
                    f"run lock: took over the stale lock of {lock.directory} (pid {owner.get('pid')} on "
                    f"{owner.get('host')} is gone)",
                    flush=True,
                )
        yield locks
        failed = False
    finally:
        for lock in reversed(locks):
            lock.release(failed=failed)

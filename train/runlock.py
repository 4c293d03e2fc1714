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

On object storage (a ``gs://`` directory) there is no ``flock`` and no process to outlive: :class:`ObjectLock`
creates the lock object with a *generation precondition* (``ifGenerationMatch=0``: the upload fails if the object
exists), so of two runs started at once on any hosts exactly one wins. The owner rewrites the object every
:data:`HEARTBEAT_S` seconds, each time only if it still holds the generation it wrote last; a rewrite that fails
means another run took the lock over, and the owner then stops (:class:`RunLockedError` at its next checkpoint).
A lock object is *stale*, and taken over, when its last heartbeat is older than :data:`STALE_AFTER_S` seconds, or
at once when it names a process of this host that no longer exists (a run killed with ``kill -9`` and restarted on
the same machine). The takeover is itself a rewrite conditional on the stale generation, so two runs taking over
one stale lock cannot both succeed. Keep the clocks of the hosts within a minute of each other (NTP does).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

from train import storage

__all__ = ["LOCK_NAME", "ObjectLock", "RunLock", "RunLockedError", "UnwritableDirectoryError", "hold"]

LOCK_NAME = ".finch-train.lock"
HEARTBEAT_S = 60.0  # how often an object lock's owner rewrites it
STALE_AFTER_S = 600.0  # an object lock not rewritten for this long belongs to a dead run


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
            lock = ObjectLock(directory) if storage.is_url(directory) else RunLock(directory)
            if lock.directory in seen:
                continue
            seen.add(lock.directory)
            lock.acquire()
            locks.append(lock)
            if lock.took_over is not None:
                owner = lock.took_over
                print(
                    f"run lock: took over the stale lock of {lock.directory} (pid {owner.get('pid')} on "
                    f"{owner.get('host')} is gone or silent)",
                    flush=True,
                )
        yield locks
        failed = False
    finally:
        for lock in reversed(locks):
            lock.release(failed=failed)


def check_held(locks: Iterable[RunLock | ObjectLock]) -> None:
    """Raises :class:`RunLockedError` if another run took over one of ``locks`` (object locks only)."""
    for lock in locks:
        if getattr(lock, "lost", None):
            raise RunLockedError(lock.lost)


def _alive_here(owner: dict) -> bool:
    """Whether the owner record names a live process of this host (``True`` when it names another host)."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return True
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ObjectLock:
    """The exclusive lock of one ``gs://`` directory: a lock object under generation preconditions (see the module
    docstring). The same interface as :class:`RunLock`; :attr:`lost` is set (to a message) if another run takes it
    over while this one runs."""

    def __init__(self, directory: str, *, heartbeat_s: float | None = None, stale_after_s: float | None = None):
        self.directory = directory.rstrip("/")
        self.path = storage.join(self.directory, LOCK_NAME)
        self.bucket_name, _, prefix = self.directory.split("://", 1)[1].partition("/")
        self.name = f"{prefix}/{LOCK_NAME}" if prefix else LOCK_NAME
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.stale_after_s = STALE_AFTER_S if stale_after_s is None else stale_after_s
        self.took_over: dict | None = None
        self.lost: str | None = None
        self.generation: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bucket = None
        self._started = time.strftime("%Y-%m-%dT%H:%M:%S")

    def _record(self) -> str:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": self._started})

    def acquire(self) -> None:
        """Takes the lock (creates the lock object, or takes a stale one over) and starts the heartbeat.

        Raises:
          RunLockedError: a live run holds it (the message names its pid, host, start and last heartbeat).
          UnwritableDirectoryError: the bucket cannot be written.
        """
        from google.api_core import exceptions as gexc
        from google.cloud import storage as gcs

        self._bucket = gcs.Client().bucket(self.bucket_name)
        for _ in range(3):  # a lock released between our create and our read: create again
            blob = self._bucket.blob(self.name)
            try:
                blob.upload_from_string(self._record(), if_generation_match=0)
            except gexc.PreconditionFailed:
                if self._take_over_if_stale(gexc):
                    break
                continue
            except gexc.GoogleAPICallError as e:
                raise UnwritableDirectoryError(f"cannot write to {self.directory}: {e.message}") from e
            self.generation = blob.generation
            break
        else:
            raise RunLockedError(f"{self.directory}: its lock ({self.path}) keeps changing hands; try again")
        self._thread = threading.Thread(target=self._beat, name="finch-run-lock", daemon=True)
        self._thread.start()

    def _take_over_if_stale(self, gexc) -> bool:
        """Takes a stale lock over (``True``); ``False`` when the lock object is gone (create it again).

        Raises:
          RunLockedError: the lock is live, or another run took it over first.
        """
        current = self._bucket.get_blob(self.name)
        if current is None:
            return False
        try:
            owner = json.loads(current.download_as_text() or "{}")
        except (ValueError, gexc.NotFound):
            owner = {}
        age = (datetime.now(UTC) - current.updated).total_seconds()
        if age < self.stale_after_s and _alive_here(owner):
            raise RunLockedError(
                f"{self.directory} is in use by another run (pid {owner.get('pid', '?')} on host "
                f"{owner.get('host', '?')}, started {owner.get('started', '?')}, last heartbeat {age:.0f} s ago; "
                f"taken over after {self.stale_after_s:.0f} s without one); wait for it, stop it, or use another "
                f"directory (lock object: {self.path})"
            )
        blob = self._bucket.blob(self.name)
        try:
            blob.upload_from_string(self._record(), if_generation_match=current.generation)
        except gexc.PreconditionFailed:
            raise RunLockedError(f"{self.directory}: another run took over its stale lock first") from None
        self.generation = blob.generation
        self.took_over = owner or {"pid": None}
        return True

    def heartbeat(self) -> bool:
        """Rewrites the lock object if it is still this run's; ``False`` (and :attr:`lost` set) once it is not.
        Called every :data:`HEARTBEAT_S` seconds by the lock's thread."""
        from google.api_core import exceptions as gexc

        if self.lost is not None:
            return False
        blob = self._bucket.blob(self.name)
        try:
            blob.upload_from_string(self._record(), if_generation_match=self.generation)
        except gexc.PreconditionFailed:
            self.lost = (
                f"{self.directory}: another run took over this run's lock ({self.path}); stopping so that the two "
                "do not overwrite each other"
            )
            return False
        except gexc.GoogleAPICallError:  # transient: the next heartbeat comes well before the lock goes stale
            return True
        self.generation = blob.generation
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.heartbeat():
                return

    def release(self, *, failed: bool = False) -> None:
        """Stops the heartbeat and deletes the lock object if it is still this run's (``failed`` changes nothing:
        an object store has no empty folders to leave behind)."""
        if self._thread is None:
            return
        from google.api_core import exceptions as gexc

        self._stop.set()
        self._thread.join()
        self._thread = None
        if self.lost is None:
            with contextlib.suppress(gexc.NotFound, gexc.PreconditionFailed):
                self._bucket.blob(self.name).delete(if_generation_match=self.generation)

"""orbax's per-call event loop, closed only after the tasks it started have ended.

orbax-checkpoint runs each synchronous part of a save or restore (``asyncio_utils.run_sync``: the background commit
of an async save, a restore, metadata reads) on a fresh event loop, ``asyncio_utils._run_sync_via_new_loop``:
``loop.run_until_complete(coro)``, then ``loop.close()``. The coroutine gathers one task per tensorstore read or write
(``asyncio.gather`` in ``serialization.async_serialize_from_host`` and ``serialization._read_and_create_array``).
When one of them fails (a full disk, a read-only directory, a corrupt checkpoint), the gather raises at once,
``run_until_complete`` returns, and the loop is closed while the other tasks still await their tensorstore futures.
tensorstore's ``Future.__await__`` (``PythonFutureBase::get_await_result`` in python/tensorstore/future.cc) hands
the result to the loop with ``loop.call_soon_threadsafe`` from tensorstore's own thread; on the closed loop that
raises ``RuntimeError: Event loop is closed``, which tensorstore reports through ``PyErr_WriteUnraisable``: one
6-line traceback on stderr per operation still in flight (dozens after a full disk), plus asyncio's "Task exception
was never retrieved" and "Exception ignored in: <coroutine ...>" for the tasks the closed loop abandoned.

This is orbax's (google/orbax ``checkpoint/orbax/checkpoint/_src/asyncio_utils.py``, ``_run_sync_via_new_loop``,
0.12.8 as installed here and still so upstream); no orbax object the project owns can prevent it — closing or
waiting for the ``CheckpointManager`` comes after the loop is already closed. :func:`install` replaces that function
with one that does what ``asyncio.run`` does: cancel the tasks the coroutine left pending and run the loop until
they have ended (cancelling such a task cancels its tensorstore future, so this takes no longer than the error
itself). An operation already under way may still post its late result to the loop from tensorstore's thread, so a
loop that had tasks left is not closed but kept for the life of the process (a failed save or restore ends the
run); a call that succeeds closes its loop as before. The
tasks are tracked per loop with a task factory, never through asyncio's process-wide task set, whose iteration from
several threads is why orbax stopped using ``asyncio.run``. A call that succeeds leaves no task behind and behaves as
before.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Coroutine
from typing import Any, TypeVar

from orbax.checkpoint._src import asyncio_utils as _orbax_asyncio

__all__ = ["install", "installed", "run_sync_via_new_loop"]

_T = TypeVar("_T")
_REPLACED = "_run_sync_via_new_loop"
_ORBAX_ORIGINAL = getattr(_orbax_asyncio, _REPLACED, None)  # orbax's own, before install()


def run_sync_via_new_loop(coro: Coroutine[Any, Any, _T]) -> _T:
    """orbax's ``_run_sync_via_new_loop``, except that no task of the loop is still pending when it is closed."""
    loop = asyncio.new_event_loop()
    tasks: weakref.WeakSet[asyncio.Task] = weakref.WeakSet()

    def track(loop: asyncio.AbstractEventLoop, coro: Coroutine, **kwargs: Any) -> asyncio.Task:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        tasks.add(task)
        return task

    loop.set_task_factory(track)
    left_work = False
    try:
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(coro)
        finally:
            left_work = _end_pending(loop, tasks)
    finally:
        asyncio.set_event_loop(None)
        if left_work:
            # A tensorstore operation that was already under way when its task was cancelled still posts its
            # result to this loop when it ends (call_soon_threadsafe from tensorstore's thread): an open loop takes
            # it silently, a closed one raises. Keep it open, and referenced, for the life of the process; this
            # happens only on the error path of a save or restore, which ends the run.
            _RETIRED_LOOPS.append(loop)
        else:
            loop.close()


# Loops of failed calls that tensorstore may still post to (see run_sync_via_new_loop).
_RETIRED_LOOPS: list[asyncio.AbstractEventLoop] = []


def _end_pending(loop: asyncio.AbstractEventLoop, tasks: weakref.WeakSet[asyncio.Task]) -> bool:
    """Cancels the tasks the coroutine left and runs the loop until they have ended; whether there were any."""
    left = False
    # A cancelled task may start others while it unwinds: repeat until none is left.
    while pending := [t for t in list(tasks) if not t.done()]:
        left = True
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    return left


def installed() -> bool:
    """Whether orbax's ``run_sync`` uses :func:`run_sync_via_new_loop`."""
    return getattr(_orbax_asyncio, _REPLACED, None) is run_sync_via_new_loop


def install() -> bool:
    """Makes orbax's ``run_sync`` use :func:`run_sync_via_new_loop`; returns whether it does.

    Idempotent. With an orbax that no longer has ``asyncio_utils._run_sync_via_new_loop`` it changes nothing and
    returns ``False`` (the unit test of this module then fails, so an upgrade cannot drop the fix unnoticed).
    """
    if not callable(getattr(_orbax_asyncio, _REPLACED, None)):
        return False
    setattr(_orbax_asyncio, _REPLACED, run_sync_via_new_loop)
    return True

"""train.orbax_loop: a failed orbax ``run_sync`` leaves no tensorstore operation reporting to a closed event loop."""

import asyncio
import sys

import pytest
import tensorstore as ts
from orbax.checkpoint._src import asyncio_utils

from train import orbax_loop


def test_installed_by_the_checkpoint_module():
    import train.checkpoint  # noqa: F401

    assert orbax_loop.installed(), (
        "orbax.checkpoint._src.asyncio_utils._run_sync_via_new_loop moved: see train/orbax_loop.py"
    )


def _fail_while_a_tensorstore_future_is_pending():
    """What a failed save/restore does: a gather whose first task fails while another awaits tensorstore."""
    promise, pending = ts.Promise.new()

    async def fails():
        raise ValueError("RESOURCE_EXHAUSTED: no space left on device")

    async def main():
        await asyncio.gather(pending, fails())

    with pytest.raises(ValueError, match="RESOURCE_EXHAUSTED"):
        asyncio_utils.run_sync(main())
    return promise, pending


def test_a_failed_run_sync_cancels_the_tensorstore_operations_it_leaves(monkeypatch):
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    orbax_loop.install()
    promise, pending = _fail_while_a_tensorstore_future_is_pending()
    assert pending.cancelled()
    promise.set_result(1)  # the operation ending late reports to nobody
    assert unraisable == []


def test_a_loop_with_work_left_stays_open_for_late_posts(monkeypatch):
    # What tensorstore's thread does when an operation that was under way at the cancel ends: post to the loop.
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    orbax_loop.install()
    loops = []

    async def record_loop():
        loops.append(asyncio.get_running_loop())

    async def main():
        await record_loop()
        await asyncio.gather(asyncio.sleep(60), _raise())

    async def _raise():
        raise OSError("no space left on device")

    with pytest.raises(OSError):
        asyncio_utils.run_sync(main())
    assert not loops[0].is_closed()
    loops[0].call_soon_threadsafe(lambda: None)  # would raise "Event loop is closed" on a closed loop
    assert unraisable == []


def test_without_it_the_late_result_goes_to_the_closed_loop(monkeypatch):
    # The behaviour train.orbax_loop exists for, pinned so that a fixed orbax shows up here.
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    monkeypatch.setattr(asyncio_utils, "_run_sync_via_new_loop", orbax_loop._ORBAX_ORIGINAL)
    promise, pending = _fail_while_a_tensorstore_future_is_pending()
    assert not pending.cancelled()
    promise.set_result(1)
    assert [str(u.exc_value) for u in unraisable] == ["Event loop is closed"]


def test_a_successful_run_sync_is_unchanged():
    orbax_loop.install()

    async def main():
        return sum(await asyncio.gather(*(asyncio.sleep(0, i) for i in range(5))))

    assert asyncio_utils.run_sync(main()) == 10

"""Drops one known, harmless message from the process's stderr: tensorstore's "Event loop is closed" tracebacks.

When an orbax save fails (a full disk, a directory made read-only), orbax closes the asyncio loop of the save while
tensorstore still has writes in flight; as each of them finishes, tensorstore's C++ threads try to hand the result
to the closed loop and print a 6-line ``RuntimeError: Event loop is closed`` traceback straight to file descriptor 2
— dozens of them, around the run's own one-line error. They come from C++, so no Python hook sees them;
:class:`EventLoopNoiseFilter` puts a pipe on fd 2 and forwards everything except exactly those tracebacks.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

__all__ = ["EventLoopNoiseFilter"]

_NOISE_EXCEPTION = "RuntimeError: Event loop is closed"


def _is_noise(block: list[str], *, complete: bool = True) -> bool:
    """A traceback whose every frame is in asyncio's base_events.py and whose exception is the closed loop.

    With ``complete=False`` (the process leaves mid-traceback): a block that could still become one.
    """
    frames = [line for line in block[1:] if line.startswith("  File ")]
    if not all("asyncio/base_events.py" in line for line in frames):
        return False
    last = block[-1].rstrip("\n")
    if complete:
        return bool(frames) and last == _NOISE_EXCEPTION
    return last.startswith(" ") or last.startswith("Traceback") or _NOISE_EXCEPTION.startswith(last)


class EventLoopNoiseFilter:
    """Context manager: fd 2 goes through a pipe whose reader drops the closed-loop tracebacks and forwards the rest.

    A no-op when stderr has no file descriptor. :meth:`close` (also on leaving the ``with`` block) restores fd 2 and
    waits up to ``drain_seconds`` for the reader to forward what is left. :meth:`exit` is for leaving the process at
    once (``os._exit``) with a last message that no other thread's output can land in.
    """

    def __init__(self, drain_seconds: float = 2.0):
        self._drain_seconds = drain_seconds
        self._saved_fd: int | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> EventLoopNoiseFilter:
        try:
            sys.stderr.flush()
            self._saved_fd = os.dup(2)
        except (OSError, ValueError, AttributeError):
            return self
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._reader = threading.Thread(target=self._forward, args=(read_fd, self._saved_fd), daemon=True)
        self._reader.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, *, silence: bool = False) -> None:
        """Stops filtering: fd 2 is the real stderr again (``/dev/null`` with ``silence``), and what the pipe holds
        is forwarded."""
        if self._saved_fd is None:
            return
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        if silence:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        else:
            os.dup2(self._saved_fd, 2)  # drops the pipe's last write end (unless a child process still holds one)
        if self._reader is not None:
            self._reader.join(self._drain_seconds)
        os.close(self._saved_fd)
        self._saved_fd, self._reader = None, None

    def exit(self, message: str, code: int) -> None:
        """Forwards what is pending, silences fd 2, writes ``message`` to the real stderr in one piece, and leaves
        the process with ``code`` without waiting for other threads."""
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        real = os.dup(self._saved_fd) if self._saved_fd is not None else None
        self.close(silence=True)
        text = (message.rstrip("\n") + "\n").encode(errors="replace")
        if real is None:
            with contextlib.suppress(Exception):
                sys.stderr.write(message.rstrip("\n") + "\n")
                sys.stderr.flush()
        else:
            os.write(real, text)
        os._exit(code)

    @staticmethod
    def _forward(read_fd: int, out_fd: int) -> None:
        out_fd = os.dup(out_fd)  # ours to close: close() may close the saved one while we drain

        def emit(lines: list[str]) -> None:
            with contextlib.suppress(OSError):
                os.write(out_fd, "".join(lines).encode(errors="replace"))

        block: list[str] = []  # a traceback being read
        with os.fdopen(read_fd, "r", errors="replace", newline="") as pipe:
            for line in pipe:
                if block and not line.endswith("\n"):  # the process left in the middle of this line
                    block.append(line)
                    break
                if block:
                    block.append(line)
                    if not line.startswith(" "):  # the exception line ends a traceback
                        if not _is_noise(block):
                            emit(block)
                        block = []
                elif line.startswith("Traceback (most recent call last):"):
                    block = [line]
                else:
                    emit([line])
        if block and not _is_noise(block, complete=False):
            emit(block)
        os.close(out_fd)

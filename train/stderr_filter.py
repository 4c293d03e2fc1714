"""Drops one known, harmless message from the process's stderr: tensorstore's "Event loop is closed" tracebacks.

When an orbax save fails (a full disk, a directory made read-only), orbax closes the asyncio loop of the save while
tensorstore still has writes in flight; as each of them finishes, tensorstore's C++ threads try to hand the result
to the closed loop and print a 6-line ``RuntimeError: Event loop is closed`` traceback straight to file descriptor 2
— dozens of them, around the run's own one-line error, and a failed restore of a corrupt checkpoint does the same.
They come from C++ threads, so no Python hook sees them; :class:`EventLoopNoiseFilter` puts a pipe on fd 2 and
forwards everything except the lines of those tracebacks (also when several threads' tracebacks interleave).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time

__all__ = ["EventLoopNoiseFilter"]

_HEADER = "Traceback (most recent call last):"
# The pieces of the closed-loop traceback. Several threads print it at once, and Python writes a traceback in pieces
# (indent, then text), so on fd 2 the pieces interleave: a line can be one piece with another's indent, two pieces
# run together, or only whitespace. A line made of nothing but these pieces is noise.
_NOISE_TEXTS = (
    "self._check_closed()",
    "raise RuntimeError('Event loop is closed')",
    "RuntimeError: Event loop is closed",
)
_NOISE_PIECES = (r'File "[^"]*asyncio/base_events\.py", line \d+, in \w+', *map(re.escape, (*_NOISE_TEXTS, _HEADER)))
_NOISE_LINE = re.compile(r"\s*(?:(?:" + "|".join(_NOISE_PIECES) + r")\s*)+")


def _is_noise_line(line: str) -> bool:
    return _NOISE_LINE.fullmatch(line.rstrip("\n")) is not None


def _could_be_noise(fragment: str) -> bool:
    """A last line cut off when the process left: whitespace, or the start of a noise piece or of the header."""
    text = fragment.strip()
    if not text or _HEADER.startswith(text) or _is_noise_line(text):
        return True
    if any(piece.startswith(text) for piece in _NOISE_TEXTS):
        return True
    return text.startswith('File "') and ("asyncio/base_events.py" in text or '"' not in text[6:])


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
        self._last_input = time.monotonic()  # when the pipe last received a line

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

    def settle(self, quiet_seconds: float = 0.5, max_seconds: float = 5.0) -> None:
        """Waits until nothing has been written to fd 2 for ``quiet_seconds`` (at most ``max_seconds``), so that
        threads still finishing work print into the filter rather than after it."""
        if self._reader is None:
            return
        start = time.monotonic()
        while (now := time.monotonic()) < start + max_seconds and now - max(start, self._last_input) < quiet_seconds:
            time.sleep(0.05)

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

    def _forward(self, read_fd: int, out_fd: int) -> None:
        out_fd = os.dup(out_fd)  # ours to close: close() may close the saved one while we drain

        def emit(lines: list[str]) -> None:
            with contextlib.suppress(OSError):
                os.write(out_fd, "".join(lines).encode(errors="replace"))

        # A header is held until the next line that is not noise: a real traceback's first frame follows it;
        # anything else means the header was noise's.
        held_header: str | None = None
        in_noise = False  # the last line with text was noise: whitespace-only lines there are its debris
        with os.fdopen(read_fd, "r", errors="replace", newline="") as pipe:
            for line in pipe:
                self._last_input = time.monotonic()
                if not line.endswith("\n"):  # the process left in the middle of this line
                    if not _could_be_noise(line):
                        emit([line])
                    break
                text = line.strip()
                if text == _HEADER:
                    held_header = line
                elif _is_noise_line(line) or (not text and in_noise):
                    in_noise = True
                else:
                    if held_header is not None and text.startswith('File "'):
                        emit([held_header])
                    held_header = None
                    in_noise = False
                    emit([line])
        os.close(out_fd)

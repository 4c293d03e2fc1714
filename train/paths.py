"""The paths a command reads and writes, checked before it loads a model or starts any work.

Every ``finch-train`` command checks the files it will read (configs, data, chat templates, models, checkpoints,
earlier results) and the paths it will write (reports, exports, run folders, caches) first, so that a wrong path
costs a second instead of a model load or an evaluation, and is one line naming the setting and what is wrong:
``does not exist``, ``is a directory``, ``is a file``, ``cannot be written``.

Writing follows one rule: a command never removes or renames what it did not create. A folder a command writes
whole (a Hugging Face export) carries the marker file :data:`OUTPUT_MARKER`; such a folder, an empty one or a missing
one may be (re)written, and any other existing path is refused unless the user asks to overwrite it. Missing
folders above an output are created when it is written; the nearest existing one must be a writable folder.
"""

from __future__ import annotations

import json
import os
import time

from models.config import ConfigError

__all__ = [
    "OUTPUT_MARKER",
    "PathError",
    "check_file_to_read",
    "check_file_to_write",
    "check_folder_to_read",
    "check_folder_to_replace",
    "check_folder_to_write",
    "is_own_output",
    "mark_own_output",
]

# Written into every folder a command writes whole; the folder may then be replaced by a later run of the tool.
OUTPUT_MARKER = ".finch-train-output"


class PathError(ConfigError):
    """A path given to a command that cannot be read, or written, the way the command needs."""


def check_file_to_read(path: str | os.PathLike, setting: str) -> None:
    """Refuses a missing, folder or unreadable ``path`` that ``setting`` names as a file to read."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise _not_found(path, setting)
    if os.path.isdir(path):
        raise PathError(f"{setting} {path!r} is a directory; give a file")
    if not os.access(path, os.R_OK):
        raise PathError(f"{setting} {path!r} cannot be read (permission denied)")


def check_folder_to_read(path: str | os.PathLike, setting: str) -> None:
    """Refuses a missing, non-folder or unreadable ``path`` that ``setting`` names as a folder to read."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise _not_found(path, setting)
    if not os.path.isdir(path):
        raise PathError(f"{setting} {path!r} is a file; give a folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise PathError(f"{setting} {path!r} cannot be read (permission denied)")


def check_file_to_write(path: str | os.PathLike, setting: str) -> None:
    """Refuses a file destination that is a folder or that cannot be created; an existing file is replaced."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise PathError(f"{setting} {path!r} is a directory; give a file path (e.g. {os.path.join(path, 'x.json')})")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise PathError(f"{setting} {path!r} cannot be written (permission denied)")
    _check_can_create(path, setting)


def check_folder_to_write(path: str | os.PathLike, setting: str) -> None:
    """Refuses a folder to write files into that is a file, or that cannot be created or written."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise PathError(f"{setting} {path!r} is a file; give a folder")
    if os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
        raise PathError(f"{setting} {path!r} cannot be written (permission denied or a read-only file system)")
    if not os.path.exists(path):
        _check_can_create(path, setting)


def check_folder_to_replace(
    path: str | os.PathLike, setting: str, *, overwrite: bool, flag: str = "--overwrite"
) -> None:
    """Refuses to replace what the tool did not write: an existing file, or a folder with files in it that is not
    an earlier output of this tool (:func:`is_own_output`), unless ``overwrite``."""
    path = os.fspath(path)
    if not overwrite and os.path.lexists(path):
        if not os.path.isdir(path) or os.path.islink(path):
            raise PathError(
                f"{setting} {path!r} is an existing file; it is left as it is: give a new or empty folder, or pass "
                f"{flag} to replace it"
            )
        names = sorted(os.listdir(path))
        if names and not is_own_output(path):
            shown = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
            raise PathError(
                f"{setting} {path!r} is a folder holding files this tool did not write ({shown}); they are left as "
                f"they are: give a new or empty folder, or pass {flag} to replace the folder"
            )
    _check_can_create(path, setting)


def is_own_output(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` is a folder this tool wrote whole (it holds :data:`OUTPUT_MARKER`)."""
    return os.path.isfile(os.path.join(directory, OUTPUT_MARKER))


def mark_own_output(directory: str | os.PathLike, what: str) -> None:
    """Marks ``directory`` as written whole by this tool (``what`` says what it holds), so it may be replaced."""
    record = {"written_by": "finch-train", "what": what, "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(os.path.join(directory, OUTPUT_MARKER), "w", encoding="utf-8") as f:
        json.dump(record, f)
        f.write("\n")


def _not_found(path: str, setting: str) -> PathError:
    where = "" if os.path.isabs(path) else f", looked for in {os.getcwd()}"
    return PathError(f"{setting} {path!r} does not exist (not found{where})")


def _check_can_create(path: str, setting: str) -> None:
    """The nearest existing folder above ``path`` must be a writable folder (missing ones are created later)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise PathError(f"{setting} {path!r} cannot be created: {parent!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PathError(
            f"{setting} {path!r} cannot be created: {parent!r} cannot be written (permission denied or a read-only "
            "file system)"
        )

"""Reading fine-tuning files into :class:`Document` s, with every bad row named by ``file:line`` or counted.

Input files (one format per row; files and rows may mix them):

* ``.txt`` — documents separated by blank lines; every token is trained on.
* ``.jsonl`` — one JSON object per line:

  - ``{"text": ...}``: trained on every token;
  - ``{"prompt": ..., "completion": ...}``: the prompt's tokens get loss weight 0, so the model learns only the
    completion (``loss_on_prompt`` trains on both);
  - ``{"messages": [{"role": ..., "content": ...}, ...]}``: a conversation, rendered with the model's own chat
    template (or ``data.chat_template``, see :mod:`train.chat_template`); only the assistant replies, each with its
    end-of-turn marker, are trained on.

A malformed line, an empty text, a chat without an assistant reply or non-UTF-8 bytes is a bad row: an error
naming ``file:line``, or, with ``skip_invalid_rows``, skipped and counted in a :class:`RowIssues`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["DataError", "Document", "RowIssues", "read_documents", "read_file"]


class DataError(ValueError):
    """Training data that cannot be used: missing/malformed file, bad row, empty dataset, bad sizes."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: ``prompt`` (not trained on, may be empty) followed by ``text``; or a chat, ``messages``.

    ``id`` names where the document came from (``file:line`` for files, used in error messages; the lab's
    built-in sources put their own names there) and ``group`` its genre, novel or book; fine-tuning ignores both.
    ``messages`` holds a conversation's ``{"role", "content", ...}`` dicts, rendered by the chat template; a chat
    document leaves ``text`` and ``prompt`` empty.
    """

    text: str = ""
    prompt: str = ""
    id: str = ""
    group: str = ""
    messages: tuple[Mapping[str, Any], ...] = ()


class RowIssues:
    """What to do with a bad row: raise a :class:`DataError` naming it (``skip=False``), or skip and count it.

    ``counts`` maps a reason (``"empty text"``, ``"longer than seq_len"``, ...) to how many rows were skipped for it;
    ``first`` holds the first skipped row's message.
    """

    def __init__(self, skip: bool = False):
        self.skip = skip
        self.counts: collections.Counter[str] = collections.Counter()
        self.first: str | None = None

    def bad(self, where: str, reason: str, detail: str) -> None:
        """Reports one bad row (raises unless skipping)."""
        message = f"{where}: {detail}" if where else detail
        if not self.skip:
            raise DataError(f"{message} (set data.skip_invalid_rows=true to skip such rows and count them)")
        self.counts[reason] += 1
        if self.first is None:
            self.first = message

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        """``"3 rows skipped (2 empty text, 1 longer than seq_len); first: a.jsonl:4: ..."``, or ``""``."""
        if not self.counts:
            return ""
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())
        return f"{self.skipped} rows skipped ({reasons}); first: {self.first}"


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _string_field(obj: Mapping[str, Any], key: str, *, allow_empty: bool = False) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _BadRow("wrong type", f"field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _BadRow(f"empty {key}", f"field {key!r} is empty")
    return value


def _chat_messages(value: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list) or not value:
        raise _BadRow("bad messages", "field 'messages' must be a non-empty list of {'role', 'content'} objects")
    for n, message in enumerate(value):
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            raise _BadRow("bad messages", f"messages[{n}] must be an object with 'role' and 'content'")
        if not isinstance(message["role"], str) or not isinstance(message["content"], str):
            raise _BadRow("wrong type", f"messages[{n}]: 'role' and 'content' must be strings")
    replies = [m for m in value if m["role"] == "assistant"]
    if not replies:
        raise _BadRow("no assistant message", "the conversation has no 'assistant' message to train on")
    if any(not m["content"].strip() for m in replies):
        raise _BadRow("empty content", "an assistant message is empty")
    return tuple(value)


def _row_document(obj: Any, where: str) -> Document:
    """One JSONL row as a Document (raises :class:`_BadRow`)."""
    if not isinstance(obj, dict):
        raise _BadRow("not an object", f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return Document(messages=_chat_messages(obj["messages"]), id=where)
    if "prompt" in obj and "completion" in obj:
        prompt = _string_field(obj, "prompt", allow_empty=True)
        return Document(text=_string_field(obj, "completion"), prompt=prompt, id=where)
    if "text" in obj:
        return Document(text=_string_field(obj, "text"), id=where)
    raise _BadRow(
        "unknown format",
        f"expected a 'text' field, 'prompt' + 'completion' fields or a 'messages' list, got keys {sorted(obj)}",
    )


def _read_jsonl(path: str, issues: RowIssues) -> list[Document]:
    docs = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                issues.bad(where, "not UTF-8", f"not UTF-8 text (byte {e.start} of the line)")
                continue
            if not line.strip():
                continue
            try:
                docs.append(_row_document(json.loads(line), where))
            except json.JSONDecodeError as e:
                issues.bad(where, "not JSON", f"not valid JSON ({e.msg})")
            except _BadRow as e:
                issues.bad(where, e.reason, e.detail)
    return docs


def _read_text(path: str, issues: RowIssues) -> list[Document]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        # A text file is one stream: a bad byte makes the whole file unusable, so this is never skipped.
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start} of the file)") from None
    docs, lines, start = [], [], 0
    for lineno, line in enumerate(text.splitlines() + [""], 1):
        if line.strip():
            if not lines:
                start = lineno
            lines.append(line)
        elif lines:
            docs.append(Document(text="\n".join(lines).strip(), id=f"{path}:{start}"))
            lines = []
    return docs


def read_file(path: str, issues: RowIssues, what: str = "training") -> list[Document]:
    """The documents of one ``.txt`` or ``.jsonl`` file (``what`` names the split in errors)."""
    if os.path.isdir(path):
        raise DataError(f"{what} file {path!r} is a directory; give a .txt or .jsonl file")
    if not os.path.isfile(path):
        raise DataError(f"{what} file {path!r} does not exist")
    if path.endswith(".jsonl"):
        return _read_jsonl(path, issues)
    if path.endswith(".txt"):
        return _read_text(path, issues)
    raise DataError(f"{what} file {path!r}: unsupported extension (use .txt or .jsonl)")


def read_documents(paths: Sequence[str], *, skip_invalid_rows: bool = False) -> list[Document]:
    """All documents of the given ``.txt`` / ``.jsonl`` files, in file order.

    Raises:
      DataError: no files given, a missing file, an unknown extension, a bad row (unless ``skip_invalid_rows``),
        or no documents at all.
    """
    if not paths:
        raise DataError("no training files given (set data.train_files to .txt or .jsonl files)")
    issues = RowIssues(skip_invalid_rows)
    docs = [doc for path in paths for doc in read_file(path, issues)]
    if not docs:
        raise DataError(f"the training files {list(paths)} hold no documents")
    return docs

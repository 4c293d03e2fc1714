"""Fine-tuning documents and rows: :class:`Document`, the row formats, the column map, and bad rows.

A row (a JSONL line, a parquet or Arrow row) is one of three kinds, and files and rows may mix them:

* ``{"text": ...}``: trained on every token;
* ``{"prompt": ..., "completion": ...}``: the prompt's tokens get loss weight 0, so the model learns only the
  completion (``loss_on_prompt`` trains on both);
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: a conversation, rendered with the model's own chat
  template (or ``data.chat_template``, see :mod:`train.chat_template`); only the assistant replies, each with its
  end-of-turn marker, are trained on.

Other column names are mapped with ``data.fields`` (:class:`FieldMap`: ``text=body``, ``alpaca`` for
``instruction``/``input``/``output``, ``sharegpt`` for ``conversations`` of ``from``/``value`` turns). ``.txt``
files hold text documents separated by blank lines. The file formats are read by :mod:`train.readers`.

A malformed line, an empty text, a chat without an assistant reply or non-UTF-8 bytes is a bad row: an error
naming ``file:line`` (``file:row N`` for parquet/Arrow), or, with ``skip_invalid_rows``, skipped and counted in a
:class:`RowIssues`.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "BadRow",
    "DataError",
    "Document",
    "FieldMap",
    "RowIssues",
    "read_documents",
    "read_file",
    "row_document",
]


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

    def absorb(self, other: RowIssues) -> None:
        """Adds ``other``'s counts (rows met after this one's)."""
        self.counts.update(other.counts)
        if self.first is None:
            self.first = other.first

    def take(self) -> RowIssues:
        """The rows counted so far, as a new :class:`RowIssues`; this one starts again from none."""
        out = RowIssues(self.skip)
        out.counts, out.first = self.counts, self.first
        self.counts, self.first = collections.Counter(), None
        return out

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        """``"3 rows skipped (2 empty text, 1 longer than seq_len); first: a.jsonl:4: ..."``, or ``""``."""
        if not self.counts:
            return ""
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())
        return f"{self.skipped} rows skipped ({reasons}); first: {self.first}"


class BadRow(Exception):
    """A row that cannot be used: ``reason`` (counted) and ``detail`` (the message after ``file:line:``)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# What ``data.fields`` may name: a preset, or ``target=source[+source...]``.
FIELD_PRESETS = {
    "alpaca": ("prompt=instruction+input", "completion=output"),
    "sharegpt": ("messages=conversations",),
}
# ShareGPT's ``from`` values and the chat-template role each becomes (anything else is kept as it is).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclasses.dataclass(frozen=True)
class FieldMap:
    """Which columns of a row hold the text, the prompt and completion, and the chat messages.

    Each target reads one column, or several joined by a blank line (``prompt=instruction+input``: the first
    column must be there, the others may be missing, null or empty). ``messages`` lists may hold ShareGPT turns
    (``{"from": "human" | "gpt" | "system", "value": ...}``), read as ``{"role", "content"}`` (:data:`SHAREGPT_ROLES`).

    >>> FieldMap.parse(["alpaca"]).prompt
    ('instruction', 'input')
    >>> FieldMap.parse(["text=body"]).text, FieldMap.parse(["text=body"]).messages
    (('body',), ('messages',))
    """

    text: tuple[str, ...] = ("text",)
    prompt: tuple[str, ...] = ("prompt",)
    completion: tuple[str, ...] = ("completion",)
    messages: tuple[str, ...] = ("messages",)

    @classmethod
    def parse(cls, entries: Sequence[str]) -> FieldMap:
        """The map ``data.fields`` describes (empty: the default column names).

        Raises:
          DataError: an entry that is neither a preset nor ``target=source[+source...]`` with a known target.
        """
        mapping: dict[str, tuple[str, ...]] = {}
        for entry in entries:
            for item in FIELD_PRESETS.get(entry.strip(), (entry,)):
                target, sep, sources = item.partition("=")
                target = target.strip()
                names = tuple(s.strip() for s in sources.split("+"))
                if not sep or target not in _TARGETS or not all(names):
                    raise DataError(
                        f"data.fields entry {entry!r}: expected a preset ({', '.join(FIELD_PRESETS)}) or "
                        f"TARGET=COLUMN[+COLUMN...] with TARGET one of {', '.join(_TARGETS)}"
                    )
                if target == "messages" and len(names) > 1:
                    raise DataError(f"data.fields entry {entry!r}: messages come from one column")
                mapping[target] = names
        return cls(**mapping)

    def columns(self) -> list[str]:
        """Every column some target reads (for reading only those from parquet/Arrow)."""
        return sorted({name for t in _TARGETS for name in getattr(self, t)})

    def describe(self) -> list[str]:
        """The map as ``target=source[+source]`` entries (defaults included), e.g. for the cache key."""
        return [f"{t}={'+'.join(getattr(self, t))}" for t in _TARGETS]


_TARGETS = ("text", "prompt", "completion", "messages")
DEFAULT_FIELDS = FieldMap()


def _present(obj: Mapping[str, Any], key: str) -> bool:
    # A null column of a parquet/Arrow row reads as absent (mixed formats in one table leave the others null).
    return obj.get(key) is not None


def _joined(obj: Mapping[str, Any], target: str, sources: tuple[str, ...], *, allow_empty: bool = False) -> str:
    """The text of ``target``: its one column, or its columns joined by a blank line."""
    first = sources[0]
    value = obj[first]
    if not isinstance(value, str):
        raise BadRow("wrong type", f"field {first!r} must be a string, got {type(value).__name__}")
    if len(sources) > 1:
        parts = [value]
        for name in sources[1:]:
            extra = obj.get(name)
            if extra is None:
                continue
            if not isinstance(extra, str):
                raise BadRow("wrong type", f"field {name!r} must be a string, got {type(extra).__name__}")
            parts.append(extra)
        value = "\n\n".join(p for p in parts if p.strip())
    if not allow_empty and not value.strip():
        raise BadRow(f"empty {target}", f"field {first!r} is empty")
    return value


def _sharegpt(message: Any) -> Any:
    """A ShareGPT turn as ``{"role", "content"}``; anything else unchanged."""
    if isinstance(message, dict) and message.get("role") is None and "from" in message and "value" in message:
        role = message["from"]
        return {"role": SHAREGPT_ROLES.get(role, role), "content": message["value"]}
    return message


def _chat_messages(value: Any, name: str = "messages") -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list) or not value:
        raise BadRow("bad messages", f"field {name!r} must be a non-empty list of {{'role', 'content'}} objects")
    value = [_sharegpt(m) for m in value]
    for n, message in enumerate(value):
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            raise BadRow("bad messages", f"{name}[{n}] must be an object with 'role' and 'content'")
        if not isinstance(message["role"], str) or not isinstance(message["content"], str):
            raise BadRow("wrong type", f"{name}[{n}]: 'role' and 'content' must be strings")
    replies = [m for m in value if m["role"] == "assistant"]
    if not replies:
        raise BadRow("no assistant message", "the conversation has no 'assistant' message to train on")
    if any(not m["content"].strip() for m in replies):
        raise BadRow("empty content", "an assistant message is empty")
    return tuple(value)


def row_document(obj: Any, where: str, fields: FieldMap = DEFAULT_FIELDS) -> Document:
    """One JSONL/parquet/Arrow row as a Document: a chat if its messages column is there, else prompt/completion
    if both are, else text (raises :class:`BadRow`)."""
    if not isinstance(obj, dict):
        raise BadRow("not an object", f"expected a JSON object, got {type(obj).__name__}")
    if _present(obj, fields.messages[0]):
        return Document(messages=_chat_messages(obj[fields.messages[0]], fields.messages[0]), id=where)
    if _present(obj, fields.prompt[0]) and _present(obj, fields.completion[0]):
        prompt = _joined(obj, "prompt", fields.prompt, allow_empty=True)
        return Document(text=_joined(obj, "completion", fields.completion), prompt=prompt, id=where)
    if _present(obj, fields.text[0]):
        return Document(text=_joined(obj, "text", fields.text), id=where)
    hint = "" if fields != DEFAULT_FIELDS else "; other column names are mapped with data.fields"
    raise BadRow(
        "unknown format",
        f"expected a {fields.text[0]!r} field, {fields.prompt[0]!r} + {fields.completion[0]!r} fields or a "
        f"{fields.messages[0]!r} list, got keys {sorted(obj)}{hint}",
    )


def read_file(
    path: str, issues: RowIssues, what: str = "training", fields: FieldMap = DEFAULT_FIELDS
) -> list[Document]:
    """The documents of one input (any format :mod:`train.readers` reads; ``what`` names the split in errors)."""
    from train import readers  # reads the formats with this module's rows

    return [doc for chunk in readers.document_chunks(path, issues, what, fields) for doc in chunk.documents]


def read_documents(paths: Sequence[str], *, skip_invalid_rows: bool = False) -> list[Document]:
    """All documents of the given inputs (``.txt``, ``.jsonl``, parquet, ...), in file order.

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

"""Reading every input format in chunks of documents, so no file is ever held whole in memory.

=====================================  ==========================================  ===========================
input                                  rows                                        a bad row is named
=====================================  ==========================================  ===========================
``.txt``                               documents separated by blank lines          ``file:line``
``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``  one JSON object per line                ``file:line``
``.parquet``                           one row per document                        ``file:row N`` (0-based)
``.arrow`` (Arrow IPC file or stream)  one row per document                        ``file:row N``
a directory from ``datasets``'         one row per document (via ``datasets``)      ``dir:row N``
``save_to_disk`` (one split)
=====================================  ==========================================  ===========================

JSON, parquet and Arrow rows are read by :func:`train.documents.row_document` with the ``data.fields`` column map;
only the columns it names are read from parquet and Arrow.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

from train.documents import DEFAULT_FIELDS, BadRow, DataError, Document, FieldMap, RowIssues, row_document

__all__ = ["Chunk", "document_chunks", "input_files", "input_kind"]

CHUNK_BYTES = 8 << 20  # text read per chunk (about 2M tokens)
CHUNK_ROWS = 2048  # parquet / Arrow rows per chunk

_SUFFIXES = (
    (".jsonl", "jsonl"),
    (".jsonl.gz", "jsonl.gz"),
    (".jsonl.zst", "jsonl.zst"),
    (".jsonl.zstd", "jsonl.zst"),
    (".txt", "txt"),
    (".parquet", "parquet"),
    (".arrow", "arrow"),
)
SUPPORTED = ".txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet, .arrow or a datasets save_to_disk directory"


@dataclasses.dataclass
class Chunk:
    """Some documents of one input, and how far into it they reach (``done`` of ``total`` bytes or rows;
    ``total`` is 0 where unknown)."""

    documents: list[Document]
    done: int
    total: int
    unit: str


def input_kind(path: str, what: str = "training") -> str:
    """``"txt"``, ``"jsonl"``, ``"jsonl.gz"``, ``"jsonl.zst"``, ``"parquet"``, ``"arrow"`` or ``"datasets"``.

    Raises:
      DataError: the path does not exist or is of no supported kind.
    """
    if os.path.isdir(path):
        markers = ("dataset_info.json", "state.json", "dataset_dict.json")
        if any(os.path.isfile(os.path.join(path, m)) for m in markers):
            return "datasets"
        raise DataError(f"{what} input {path!r} is a directory but not a datasets save_to_disk directory")
    if not os.path.isfile(path):
        raise DataError(f"{what} file {path!r} does not exist")
    lower = path.lower()
    for suffix, kind in _SUFFIXES:
        if lower.endswith(suffix):
            return kind
    raise DataError(f"{what} file {path!r}: unsupported extension (use {SUPPORTED})")


def input_files(path: str) -> list[str]:
    """The files whose bytes make up an input: the file itself, or every file under a directory (sorted)."""
    if not os.path.isdir(path):
        return [path]
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        found += [os.path.join(root, name) for name in sorted(files)]
    return found


def document_chunks(
    path: str,
    issues: RowIssues,
    what: str = "training",
    fields: FieldMap = DEFAULT_FIELDS,
    *,
    chunk_bytes: int | None = None,
    chunk_rows: int | None = None,
) -> Iterator[Chunk]:
    """The documents of one input, in order, a chunk at a time (bad rows go to ``issues``).

    Raises:
      DataError: a missing or unsupported input, an unreadable file, or a bad row (unless ``issues.skip``).
    """
    kind = input_kind(path, what)
    chunk_bytes, chunk_rows = chunk_bytes or CHUNK_BYTES, chunk_rows or CHUNK_ROWS
    if kind == "txt":
        return _text_chunks(path, chunk_bytes)
    if kind.startswith("jsonl"):
        return _jsonl_chunks(path, kind, issues, fields, chunk_bytes)
    if kind == "parquet":
        return _parquet_chunks(path, issues, fields, chunk_rows)
    if kind == "arrow":
        return _arrow_chunks(path, issues, fields, chunk_rows)
    return _datasets_chunks(path, issues, fields, chunk_rows)


# -- text -------------------------------------------------------------------------------------------------------------


def _text_chunks(path: str, chunk_bytes: int) -> Iterator[Chunk]:
    size = os.path.getsize(path)
    docs: list[Document] = []
    lines: list[str] = []
    start = lineno = newlines = offset = pending = 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                # A text file is one stream: a bad byte makes the whole file unusable, so this is never skipped.
                raise DataError(
                    f"{path}:{newlines + 1}: not UTF-8 text (byte {offset + e.start} of the file)"
                ) from None
            newlines += 1
            offset += len(raw)
            pending += len(raw)
            for line in text.splitlines():  # the same lines as str.splitlines() of the whole file
                lineno += 1
                if line.strip():
                    if not lines:
                        start = lineno
                    lines.append(line)
                elif lines:
                    docs.append(Document(text="\n".join(lines).strip(), id=f"{path}:{start}"))
                    lines = []
            if pending >= chunk_bytes and not lines:
                yield Chunk(docs, offset, size, "B")
                docs, pending = [], 0
    if lines:
        docs.append(Document(text="\n".join(lines).strip(), id=f"{path}:{start}"))
    yield Chunk(docs, offset, size, "B")


# -- JSON lines -------------------------------------------------------------------------------------------------------


def _binary_stream(path: str, kind: str, raw: BinaryIO) -> BinaryIO:
    if kind == "jsonl.gz":
        return gzip.GzipFile(fileobj=raw)
    if kind == "jsonl.zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst files needs the zstandard package (pip install zstandard)") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    return raw


def _jsonl_chunks(path: str, kind: str, issues: RowIssues, fields: FieldMap, chunk_bytes: int) -> Iterator[Chunk]:
    size = os.path.getsize(path)
    lineno = 0
    with open(path, "rb") as raw:
        stream = _binary_stream(path, kind, raw)
        while True:
            try:
                lines = stream.readlines(chunk_bytes)
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(f"{path}:{lineno + 1}: cannot decompress ({kind}): {e}") from None
            except Exception as e:  # zstandard.ZstdError
                if type(e).__name__ != "ZstdError":
                    raise
                raise DataError(f"{path}:{lineno + 1}: cannot decompress ({kind}): {e}") from None
            if not lines:
                break
            docs = []
            for line in lines:
                lineno += 1
                where = f"{path}:{lineno}"
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    issues.bad(where, "not UTF-8", f"not UTF-8 text (byte {e.start} of the line)")
                    continue
                if not text.strip():
                    continue
                try:
                    docs.append(row_document(json.loads(text), where, fields))
                except json.JSONDecodeError as e:
                    issues.bad(where, "not JSON", f"not valid JSON ({e.msg})")
                except BadRow as e:
                    issues.bad(where, e.reason, e.detail)
            yield Chunk(docs, raw.tell(), size, "B")


# -- tables: parquet, Arrow, datasets ---------------------------------------------------------------------------------


def _table_documents(
    rows: Iterable[dict[str, Any]], path: str, first: int, issues: RowIssues, fields: FieldMap
) -> list[Document]:
    docs = []
    for n, obj in enumerate(rows, first):
        where = f"{path}:row {n}"
        try:
            docs.append(row_document(obj, where, fields))
        except BadRow as e:
            issues.bad(where, e.reason, e.detail)
    return docs


def _columns(path: str, names: list[str], fields: FieldMap) -> list[str]:
    wanted = [c for c in fields.columns() if c in names]
    if not wanted:
        raise DataError(
            f"{path}: no column holds documents: it has {names}, none of {fields.columns()}; map yours with "
            "data.fields (e.g. data.fields=[text=body] or [alpaca] or [sharegpt])"
        )
    return wanted


def _batches_to_chunks(path: str, batches: Iterable[Any], total: int, issues: RowIssues, fields: FieldMap):
    row = 0
    for batch in batches:
        docs = _table_documents(batch.to_pylist(), path, row, issues, fields)
        row += batch.num_rows
        yield Chunk(docs, row, total, "rows")


def _parquet_chunks(path: str, issues: RowIssues, fields: FieldMap, chunk_rows: int) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    try:
        source = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid / OSError name the problem
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    columns = _columns(path, source.schema_arrow.names, fields)
    batches = source.iter_batches(batch_size=chunk_rows, columns=columns)
    yield from _batches_to_chunks(path, batches, source.metadata.num_rows, issues, fields)


def _arrow_chunks(path: str, issues: RowIssues, fields: FieldMap, chunk_rows: int) -> Iterator[Chunk]:
    import pyarrow as pa

    source = pa.memory_map(path)
    try:
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        schema = reader.schema
    except pa.ArrowInvalid:
        try:
            reader = pa.ipc.open_stream(pa.memory_map(path))  # datasets writes its .arrow files as streams
        except pa.ArrowInvalid as e:
            raise DataError(f"{path}: not an Arrow IPC file or stream ({e})") from None
        batches, schema = iter(reader), reader.schema
    columns = _columns(path, schema.names, fields)
    rechunked = (b.select(columns).slice(s, chunk_rows) for b in batches for s in range(0, b.num_rows, chunk_rows))
    yield from _batches_to_chunks(path, rechunked, 0, issues, fields)


def _datasets_chunks(path: str, issues: RowIssues, fields: FieldMap, chunk_rows: int) -> Iterator[Chunk]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading datasets directories needs the datasets package") from None
    try:
        dataset = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises FileNotFoundError / ValueError with the reason
        raise DataError(f"{path}: not a readable datasets directory ({e})") from None
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset)
        raise DataError(
            f"{path} holds a DatasetDict with splits {splits}: name one split's directory, e.g. "
            f"{os.path.join(path, splits[0]) if splits else path}"
        )
    columns = _columns(path, dataset.column_names, fields)
    table = dataset.select_columns(columns).with_format("arrow")
    total = len(table)
    batches = (table[start : start + chunk_rows] for start in range(0, total, chunk_rows))
    yield from _batches_to_chunks(path, batches, total, issues, fields)

"""Fine-tuning data: tokenize documents, pack them into fixed rows, and serve batches in a resumable order.

The inputs and their formats (text, JSONL — also gzip/zstd —, parquet, Arrow and ``datasets`` directories, with a
column map) are read by :mod:`train.readers` a chunk at a time; :mod:`train.packing` tokenizes each chunk in one
batched call and packs it; training files go through the token cache (:mod:`train.token_cache`), so a later run
maps the rows built by the first instead of tokenizing again.

Text and prompt/completion documents become ``[bos] + prompt + text + [eos]``; a chat is exactly what its template
renders (templates place their own special tokens). Inputs are ``ids[:-1]``, targets ``ids[1:]``. Documents are
packed whole into rows of ``seq_len`` (a document that does not fit the current row starts a new one) with their
own ``segment_id`` (attention stays inside a document) and positions restarting at 0. A text document longer than
``seq_len`` is cut into consecutive rows; a prompt/completion or chat row that long is a bad row, like a malformed
line, an empty text or non-UTF-8 bytes: an error naming ``file:line``, or, with ``skip_invalid_rows``, skipped and
counted. Rows are never truncated silently.

The order of rows is a fresh permutation per epoch drawn from ``(seed, epoch)``; the loader's whole state is one
integer, the number of rows consumed, so resuming from a checkpoint replays exactly the same batches.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from models import ByteTokenizer, Tokenizer
from train import packing, readers, storage, token_cache
from train.chat_template import ChatTemplate, ChatTemplateError
from train.config import DataConfig, TrainConfig
from train.documents import DataError, Document, FieldMap, RowIssues, read_documents, read_file
from train.rows import CompactRows, PackedRows, RowsWriter, token_dtype

__all__ = [
    "CompactRows",
    "DataError",
    "DataSplit",
    "Document",
    "PackedRows",
    "ResumableLoader",
    "RowIssues",
    "SourceStats",
    "cache_directory",
    "load_split",
    "local_rows",
    "pack_documents",
    "padding_id",
    "read_documents",
    "read_file",
    "steps_for_epochs",
    "tokenize_documents",
]


def padding_id(tokenizer: Tokenizer | ByteTokenizer) -> int:
    """The id that fills unused row positions: the tokenizer's pad, else its EOS, else 0 (never trained on)."""
    if tokenizer.pad_id is not None:
        return tokenizer.pad_id
    return tokenizer.eos_id if tokenizer.eos_id is not None else 0


def tokenize_documents(
    docs: Sequence[Document],
    tokenizer: Tokenizer | ByteTokenizer,
    data_cfg: DataConfig,
    *,
    template: ChatTemplate | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each document as ``(ids, target_weights)``: ``ids`` = [bos] prompt text [eos] (a chat: its rendering);
    ``weights[i]`` is the loss weight of predicting ``ids[i + 1]``. Documents shorter than two tokens are dropped.

    Chats use ``template`` (default: ``data_cfg.chat_template`` or the tokenizer's own).

    Raises:
      DataError: a chat the template cannot render, or a chat without any template.
    """
    if template is None and any(doc.messages for doc in docs):
        template = chat_template_for(tokenizer, data_cfg)
    enc = packing.layout(docs, data_cfg, RowIssues(skip=False), lambda: template)
    enc.ids, enc.lengths = packing.encode_texts(tokenizer, enc.texts)
    return packing.tokenize_chunk(enc, tokenizer, data_cfg).examples()


def chat_template_for(tokenizer: Tokenizer | ByteTokenizer, data_cfg: DataConfig) -> ChatTemplate | None:
    try:
        return ChatTemplate.for_model(tokenizer, data_cfg.chat_template)
    except ChatTemplateError as e:
        raise DataError(str(e)) from None


def pack_documents(
    examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int, pack: bool = True
) -> PackedRows:
    """Packs tokenized documents into rows (see the module docstring).

    Raises:
      DataError: no examples; with ``pack=False``, a document longer than ``seq_len``.
    """
    if seq_len < 1:
        raise DataError(f"data.seq_len must be >= 1, got {seq_len}")
    # Each piece: (inputs, targets, weights), at most seq_len long.
    pieces = []
    for n, (ids, weights) in enumerate(examples):
        inputs, targets = ids[:-1], ids[1:]
        if len(inputs) > seq_len and not pack:
            raise DataError(
                f"document {n} has {len(inputs) + 1} tokens, more than data.seq_len={seq_len} + 1 "
                "(raise seq_len or set data.pack=true to cut long documents)"
            )
        for start in range(0, len(inputs), seq_len):
            sl = slice(start, start + seq_len)
            pieces.append((inputs[sl], targets[sl], weights[sl]))
    if not pieces:
        raise DataError("the dataset is empty after tokenization")
    rows: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
    used = seq_len
    for piece in pieces:
        if not pack or used + len(piece[0]) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(piece)
        used += len(piece[0])
    shape = (len(rows), seq_len)
    tokens = np.full(shape, pad_id, np.int32)
    targets = np.full(shape, pad_id, np.int32)
    loss_mask = np.zeros(shape, np.float32)
    positions = np.zeros(shape, np.int32)
    segment_ids = np.zeros(shape, np.int32)
    for r, row in enumerate(rows):
        at = 0
        for seg, (inp, tgt, w) in enumerate(row, 1):
            n = len(inp)
            tokens[r, at : at + n] = inp
            targets[r, at : at + n] = tgt
            loss_mask[r, at : at + n] = w
            positions[r, at : at + n] = np.arange(n)
            segment_ids[r, at : at + n] = seg
            at += n
    return PackedRows(tokens, targets, loss_mask, positions, segment_ids)


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch, a pure function of ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


class ResumableLoader:
    """Global batches of ``batch_size`` rows in a deterministic order; its state is ``{"rows_consumed": int}``."""

    def __init__(self, rows: PackedRows, batch_size: int, seed: int, rows_consumed: int = 0):
        if batch_size < 1:
            raise DataError(f"data.batch_size must be >= 1, got {batch_size}")
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.rows_consumed = rows_consumed
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: epoch_permutation(len(self.rows), self.seed, epoch)}
        return self._perm_cache[epoch]

    def next_indices(self) -> np.ndarray:
        n = len(self.rows)
        out = np.empty(self.batch_size, np.int64)
        for i in range(self.batch_size):
            c = self.rows_consumed + i
            out[i] = self._perm(c // n)[c % n]
        self.rows_consumed += self.batch_size
        return out

    def next_batch(self) -> dict[str, np.ndarray]:
        """The next global batch (host NumPy arrays ``[batch_size, seq_len]``)."""
        return self.rows.take(self.next_indices())

    def state_dict(self) -> dict[str, Any]:
        return {"rows_consumed": int(self.rows_consumed), "seed": int(self.seed), "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("num_rows", len(self.rows))) != len(self.rows):
            raise DataError(
                f"the checkpoint's data loader saw {state['num_rows']} packed rows but the data now has "
                f"{len(self.rows)}: the training files or data settings changed since the checkpoint"
            )
        self.rows_consumed = int(state["rows_consumed"])


def local_rows(sharding: Any, global_shape: tuple[int, ...]) -> np.ndarray:
    """The global row indices this process's devices hold under ``sharding`` (its share of the global batch)."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        rows.update(range(*index[0].indices(global_shape[0])))
    return np.asarray(sorted(rows), np.int64)


@dataclasses.dataclass(frozen=True)
class SourceStats:
    """What one data file (or the in-memory documents) contributed.

    Attributes:
      name: the file path, or ``"<documents>"``.
      documents: documents kept.
      tokens: their tokens, special tokens included.
      trained_tokens: tokens with a non-zero loss weight as targets.
      chats: how many of the documents are chats (``messages`` rows).
      skipped: rows skipped as invalid (only with ``skip_invalid_rows``).
      untrained_replies: assistant replies kept as context only (see :mod:`train.chat_template`).
    """

    name: str
    documents: int
    tokens: int
    trained_tokens: int
    chats: int = 0
    skipped: int = 0
    untrained_replies: int = 0


@dataclasses.dataclass(frozen=True)
class DataSplit:
    """Packed rows of one split (training or validation), where they came from, and the cache entry holding them.

    ``rows`` are :class:`PackedRows` in memory, or :class:`CompactRows` mapped from the token cache (``cache``).
    """

    rows: PackedRows | CompactRows
    sources: tuple[SourceStats, ...]
    issues: RowIssues
    cache: token_cache.CacheEntry | None = None

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.sources)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.sources)

    @property
    def trained_tokens(self) -> int:
        return sum(s.trained_tokens for s in self.sources)


def cache_directory(data_cfg: DataConfig) -> str:
    """The token cache directory ``data.cache_dir`` names (empty: the default, see :mod:`train.token_cache`)."""
    return token_cache.resolve_dir(data_cfg.cache_dir)


def steps_for_epochs(cfg: TrainConfig, num_rows: int) -> TrainConfig:
    """``cfg`` with ``steps`` set from ``data.epochs`` when that is on: enough global batches to pass over every
    row ``epochs`` times (rounded up; the last batch may reach into the next epoch's order). Off (0): unchanged."""
    epochs = cfg.data.epochs
    if epochs <= 0:
        return cfg
    return dataclasses.replace(cfg, steps=max(1, math.ceil(epochs * num_rows / cfg.data.batch_size)))


def load_split(
    tokenizer: Tokenizer | ByteTokenizer,
    data_cfg: DataConfig,
    files: Sequence[str],
    *,
    documents: Sequence[Document] | None = None,
    max_context: int | None = None,
    what: str = "training",
    cache_dir: str | None = None,
    progress: bool = False,
) -> DataSplit:
    """Reads, checks, tokenizes and packs ``files`` — or ``documents`` when given — into rows of ``data_cfg.seq_len``.

    With ``cache_dir`` the files' rows come from the token cache there (built first if missing; see
    :mod:`train.token_cache`) and stay on disk, memory-mapped; without it, or for in-memory ``documents``, they are
    built in memory as :class:`PackedRows`. ``progress`` draws a progress bar while tokenizing.

    Raises:
      DataError: ``seq_len`` longer than the model's context, no files, a missing file, a bad row (unless
        ``skip_invalid_rows``: then skipped and counted), a chat without a chat template, or no documents left.
    """
    seq_len = data_cfg.seq_len
    if max_context is not None and seq_len > max_context:
        raise DataError(f"data.seq_len={seq_len} is longer than the model's context of {max_context} tokens")
    if documents is None and not files:
        raise DataError(f"no {what} files given (set data.{'train' if what == 'training' else what}_files)")
    fields = FieldMap.parse(data_cfg.fields)
    pad = padding_id(tokenizer)
    dtype = token_dtype(getattr(tokenizer, "vocab_size", None))

    def local_files() -> list[str]:
        # gs:// inputs are read from a local copy, downloaded only where they are read (process 0 of a cached split)
        return [storage.local_copy(f) for f in files]

    def build(directory: str | None) -> tuple[CompactRows | None, dict[str, Any]]:
        writer = RowsWriter(seq_len, dtype, directory)
        try:
            sources = local_files() if documents is None else files
            stats, issues = _build(tokenizer, data_cfg, fields, sources, documents, what, writer, progress)
            named = dict(zip(sources, files))  # a downloaded copy is reported under its URL
            stats = [dataclasses.replace(s, name=named.get(s.name, s.name)) for s in stats]
            rows = writer.finish(pad)
        finally:
            writer.close()
        meta = {
            "rows": writer.num_rows,
            "pieces": writer.num_pieces,
            "stream": writer.stream_len,
            "max_id": writer.max_id,
            "seq_len": seq_len,
            "token_dtype": dtype.name,
            "sources": [dataclasses.asdict(s) for s in stats],
            "issues": {"skip": issues.skip, "counts": dict(issues.counts), "first": issues.first},
        }
        return rows, meta

    if documents is not None or cache_dir is None:
        for path in local_files() if documents is None else ():
            readers.input_kind(path, what)  # a missing or unsupported file, before any is read
        rows, meta = build(None)
        return DataSplit(rows.materialize(), *_provenance(meta))
    entry = token_cache.open_or_build(
        cache_dir,
        files,
        key=lambda: token_cache.cache_key(local_files(), tokenizer, data_cfg, fields, what)[0],
        pad_id=pad,
        build=lambda directory: build(directory)[1],
    )
    return DataSplit(entry.rows, *_provenance(entry.meta), cache=entry)


def _provenance(meta: dict[str, Any]) -> tuple[tuple[SourceStats, ...], RowIssues]:
    issues = RowIssues(meta["issues"]["skip"])
    issues.counts.update(meta["issues"]["counts"])
    issues.first = meta["issues"]["first"]
    return tuple(SourceStats(**s) for s in meta["sources"]), issues


# -- the build: chunks read on a thread, encoded on another, packed here ---------------------------------------------


def _in_background(chunks: Iterator[readers.Chunk], issues: RowIssues) -> Iterator[tuple[readers.Chunk, RowIssues]]:
    """``chunks`` read ahead on a thread (at most two waiting), each with the bad rows found while reading it."""
    ahead: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def read() -> None:
        try:
            for chunk in chunks:
                if stop.is_set():
                    return
                ahead.put((chunk, issues.take()))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it in order
            ahead.put(e)
            return
        ahead.put(None)

    thread = threading.Thread(target=read, name="finch-data-reader", daemon=True)
    thread.start()
    try:
        while (item := ahead.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # let a reader blocked on a full queue finish
            try:
                ahead.get(timeout=0.1)
            except queue.Empty:
                pass


def _source_chunks(
    name: str, docs: Sequence[Document] | None, issues: RowIssues, what: str, fields: FieldMap
) -> Iterator[readers.Chunk]:
    if docs is None:
        return readers.document_chunks(name, issues, what, fields)
    step = 4096
    return (
        readers.Chunk(list(docs[s : s + step]), min(s + step, len(docs)), len(docs), "documents")
        for s in range(0, max(len(docs), 1), step)
    )


def _encoded(
    chunks: Iterable[tuple[readers.Chunk, RowIssues]],
    tokenizer: Tokenizer | ByteTokenizer,
    data_cfg: DataConfig,
    issues: RowIssues,
    template: Callable[[], ChatTemplate | None],
) -> Iterator[tuple[readers.Chunk, packing.Encoded]]:
    """Each chunk laid out and encoded, in order. Two chunks are encoded at once (the GIL is released), so the
    tokenizer's threads never wait for the end of one chunk while the caller packs the chunk before."""
    first_index = 0
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(_ENCODING_AHEAD, thread_name_prefix="finch-data-encode") as pool:
        for chunk, read_issues in chunks:
            issues.absorb(read_issues)
            enc = packing.layout(chunk.documents, data_cfg, issues, template, first_index)
            first_index += len(chunk.documents)
            pending.append((chunk, enc, pool.submit(packing.encode_texts, tokenizer, enc.texts)))
            if len(pending) > _ENCODING_AHEAD - 1:
                yield _finished(*pending.popleft())
        while pending:
            yield _finished(*pending.popleft())


_ENCODING_AHEAD = 2


def _finished(chunk: readers.Chunk, enc: packing.Encoded, future: Any) -> tuple[readers.Chunk, packing.Encoded]:
    enc.ids, enc.lengths = future.result()
    return chunk, enc


def _build(
    tokenizer: Tokenizer | ByteTokenizer,
    data_cfg: DataConfig,
    fields: FieldMap,
    files: Sequence[str],
    documents: Sequence[Document] | None,
    what: str,
    writer: RowsWriter,
    progress: bool,
) -> tuple[list[SourceStats], RowIssues]:
    """Reads, tokenizes and packs every source into ``writer``; the per-source counts and the bad rows."""
    seq_len = data_cfg.seq_len
    issues = RowIssues(data_cfg.skip_invalid_rows)
    templates: list[ChatTemplate | None] = []

    def template() -> ChatTemplate | None:
        if not templates:
            templates.append(chat_template_for(tokenizer, data_cfg))
        return templates[0]

    packer = packing.Packer(seq_len, data_cfg.pack, writer)
    sources = [("<documents>", documents)] if documents is not None else [(path, None) for path in files]
    stats = []
    for name, docs in sources:
        skipped_before = issues.skipped
        counts = dict(documents=0, tokens=0, trained_tokens=0, chats=0, untrained_replies=0)
        bar = _progress_bar(name, progress)
        reading = RowIssues(issues.skip)  # bad rows met by the reader thread, handed over with each chunk
        chunks = _in_background(_source_chunks(name, docs, reading, what, fields), reading)
        for chunk, enc in _encoded(chunks, tokenizer, data_cfg, issues, template):
            tokenized = packing.tokenize_chunk(enc, tokenizer, data_cfg)
            lengths = np.diff(tokenized.bounds)
            structured = np.fromiter((bool(d.messages or d.prompt) for d in tokenized.docs), bool, len(lengths))
            too_long = (lengths - 1 > seq_len) & (structured | (not data_cfg.pack))
            for n in np.flatnonzero(too_long).tolist():
                doc = tokenized.docs[n]
                kind = "chat" if doc.messages else "prompt/completion row" if doc.prompt else "document"
                issues.bad(
                    doc.id or f"{name}[{tokenized.index[n]}]",
                    "longer than seq_len",
                    f"this {kind} has {lengths[n]} tokens, more than data.seq_len={seq_len} + 1 (raise seq_len "
                    "or shorten it; it is never cut, which would train on a reply without its context)",
                )
            tokenized = tokenized.select(~too_long)
            packer.add(tokenized)
            firsts = tokenized.trained[tokenized.bounds[:-1]].sum() if len(tokenized.docs) else 0
            counts["documents"] += len(tokenized.docs)
            counts["tokens"] += int(tokenized.bounds[-1])
            counts["trained_tokens"] += int(tokenized.trained.sum() - firsts)
            counts["chats"] += sum(bool(d.messages) for d in tokenized.docs)
            counts["untrained_replies"] += enc.untrained
            if bar is not None:
                bar.update(chunk.done - bar.n)
                bar.total = chunk.total or None
                seconds = max(bar.format_dict["elapsed"], 1e-9)
                bar.set_postfix_str(f"{counts['tokens'] / seconds / 1e6:.2f}M tokens/s", refresh=False)
        if bar is not None:
            bar.close()
        stats.append(SourceStats(name=name, skipped=issues.skipped - skipped_before, **counts))
    if not writer.num_rows:
        names = [name for name, _ in sources]
        raise DataError(
            f"the {what} data {names} hold no documents" + (f"; {issues.describe()}" * bool(issues.skipped))
        )
    return stats, issues


def _progress_bar(name: str, progress: bool) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc=f"tokenizing {name}", unit="B", unit_scale=True, unit_divisor=1024, leave=True, dynamic_ncols=True)

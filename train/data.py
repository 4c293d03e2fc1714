"""Fine-tuning data: tokenize documents, pack them into fixed rows, and serve batches in a resumable order.

The files and their formats (text, prompt/completion and chat rows) are read by :mod:`train.documents`.

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

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from models import ByteTokenizer, Tokenizer
from train.chat_template import ChatTemplate, ChatTemplateError
from train.config import DataConfig
from train.documents import DataError, Document, RowIssues, read_documents, read_file

__all__ = [
    "DataError",
    "DataSplit",
    "Document",
    "PackedRows",
    "ResumableLoader",
    "RowIssues",
    "SourceStats",
    "load_split",
    "local_rows",
    "pack_documents",
    "padding_id",
    "read_documents",
    "tokenize_documents",
]


def padding_id(tokenizer: Tokenizer | ByteTokenizer) -> int:
    """The id that fills unused row positions: the tokenizer's pad, else its EOS, else 0 (never trained on)."""
    if tokenizer.pad_id is not None:
        return tokenizer.pad_id
    return tokenizer.eos_id if tokenizer.eos_id is not None else 0


def _pieces(
    doc: Document, template: ChatTemplate | None, data_cfg: DataConfig
) -> tuple[list[tuple[str, bool]], bool, int]:
    """``(pieces, wrap, untrained_replies)``: the document as ``(text, trained)`` pieces; ``wrap`` adds BOS/EOS."""
    if not doc.messages:
        return [(doc.prompt, data_cfg.loss_on_prompt), (doc.text, True)], True, 0
    if template is None:
        raise DataError(
            f"{doc.id or 'a document'}: a chat ('messages') row, but the model has no chat template; set "
            "data.chat_template to a Jinja file (configs/chatml.jinja is one)"
        )
    pieces, untrained = template.pieces(doc.messages)
    if data_cfg.loss_on_prompt:
        pieces = [(text, True) for text, _ in pieces]
    return pieces, False, untrained


def _tokenize(
    docs: Sequence[Document],
    tokenizer: Tokenizer | ByteTokenizer,
    data_cfg: DataConfig,
    issues: RowIssues,
    template: ChatTemplate | None,
) -> tuple[list[tuple[np.ndarray, np.ndarray] | None], int]:
    """One ``(ids, weights)`` per document (``None`` for a skipped or too-short one), and the untrained replies."""
    layouts: list[tuple[list[tuple[str, bool]], bool] | None] = []
    untrained = 0
    for doc in docs:
        try:
            pieces, wrap, n = _pieces(doc, template, data_cfg)
        except ChatTemplateError as e:
            issues.bad(doc.id or f"document {len(layouts)}", "chat template failed", str(e))
            layouts.append(None)
            continue
        layouts.append((pieces, wrap))
        untrained += n
    # One batched call to the Rust tokenizer for every piece of every document.
    encoded = iter(tokenizer.encode_batch([text for layout in layouts if layout for text, _ in layout[0]]))
    out: list[tuple[np.ndarray, np.ndarray] | None] = []
    for layout in layouts:
        if layout is None:
            out.append(None)
            continue
        pieces, wrap = layout
        ids: list[int] = []
        trained: list[bool] = []
        if wrap and data_cfg.add_bos and tokenizer.bos_id is not None:
            ids.append(tokenizer.bos_id)
            trained.append(False)  # never a target
        for _, is_trained in pieces:
            piece = next(encoded)
            ids += piece
            trained += [is_trained] * len(piece)
        if wrap and data_cfg.add_eos and tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
            trained.append(True)
        if len(ids) < 2:
            out.append(None)
            continue
        # weights[i] is the loss weight of predicting ids[i + 1]
        out.append((np.asarray(ids, np.int32), np.asarray(trained[1:], np.float32)))
    return out, untrained


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
    examples, _ = _tokenize(docs, tokenizer, data_cfg, RowIssues(skip=False), template)
    return [e for e in examples if e is not None]


def chat_template_for(tokenizer: Tokenizer | ByteTokenizer, data_cfg: DataConfig) -> ChatTemplate | None:
    try:
        return ChatTemplate.for_model(tokenizer, data_cfg.chat_template)
    except ChatTemplateError as e:
        raise DataError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """Fixed-length rows; every field is ``[num_rows, seq_len]``."""

    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)}


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
    """Packed rows of one split (training or validation) and where they came from."""

    rows: PackedRows
    sources: tuple[SourceStats, ...]
    issues: RowIssues

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.sources)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.sources)

    @property
    def trained_tokens(self) -> int:
        return sum(s.trained_tokens for s in self.sources)


def load_split(
    tokenizer: Tokenizer | ByteTokenizer,
    data_cfg: DataConfig,
    files: Sequence[str],
    *,
    documents: Sequence[Document] | None = None,
    max_context: int | None = None,
    what: str = "training",
) -> DataSplit:
    """Reads, checks, tokenizes and packs ``files`` — or ``documents`` when given — into rows of ``data_cfg.seq_len``.

    Raises:
      DataError: ``seq_len`` longer than the model's context, no files, a missing file, a bad row (unless
        ``skip_invalid_rows``: then skipped and counted), a chat without a chat template, or no documents left.
    """
    seq_len = data_cfg.seq_len
    if max_context is not None and seq_len > max_context:
        raise DataError(f"data.seq_len={seq_len} is longer than the model's context of {max_context} tokens")
    if documents is None and not files:
        raise DataError(f"no {what} files given (set data.{'train' if what == 'training' else what}_files)")
    issues = RowIssues(data_cfg.skip_invalid_rows)
    sources: list[tuple[str, Sequence[Document] | None]] = (
        [("<documents>", documents)] if documents is not None else [(path, None) for path in files]
    )
    template = None
    examples: list[tuple[np.ndarray, np.ndarray]] = []
    stats = []
    for name, docs in sources:
        skipped_before = issues.skipped
        if docs is None:
            docs = read_file(name, issues, what)
        if template is None and any(doc.messages for doc in docs):
            template = chat_template_for(tokenizer, data_cfg)
        tokenized, untrained = _tokenize(docs, tokenizer, data_cfg, issues, template)
        kept = []
        chats = 0
        for index, (doc, example) in enumerate(zip(docs, tokenized)):
            if example is None:
                continue
            structured = bool(doc.messages or doc.prompt)
            if len(example[0]) - 1 > seq_len and (structured or not data_cfg.pack):
                kind = "chat" if doc.messages else "prompt/completion row" if doc.prompt else "document"
                issues.bad(
                    doc.id or f"{name}[{index}]",
                    "longer than seq_len",
                    f"this {kind} has {len(example[0])} tokens, more than data.seq_len={seq_len} + 1 (raise seq_len "
                    "or shorten it; it is never cut, which would train on a reply without its context)",
                )
                continue
            kept.append(example)
            chats += bool(doc.messages)
        examples += kept
        stats.append(
            SourceStats(
                name=name,
                documents=len(kept),
                tokens=sum(len(ids) for ids, _ in kept),
                trained_tokens=int(sum(np.count_nonzero(w) for _, w in kept)),
                chats=chats,
                skipped=issues.skipped - skipped_before,
                untrained_replies=untrained,
            )
        )
    if not examples:
        names = [name for name, _ in sources]
        raise DataError(
            f"the {what} data {names} hold no documents" + (f"; {issues.describe()}" * bool(issues.skipped))
        )
    rows = pack_documents(examples, seq_len, padding_id(tokenizer), pack=data_cfg.pack)
    return DataSplit(rows=rows, sources=tuple(stats), issues=issues)

"""Tokenizing and packing in chunks: documents -> token ids with trained flags -> rows, with no per-token Python.

A chunk of documents is laid out as ``(text, trained)`` pieces (a chat through its template), every piece of the
chunk is encoded in one call to the tokenizer (the Rust ``tokenizers`` backend runs it on every core and releases
the GIL, so the next chunk is read meanwhile), and BOS/EOS are inserted with NumPy. :class:`Packer` then cuts the
documents into rows exactly as :func:`train.data.pack_documents` does, carrying the current row across chunks, and
hands the pieces to a :class:`train.rows.RowsWriter`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence

import numpy as np

from models import ByteTokenizer, Tokenizer
from train.chat_template import ChatTemplate, ChatTemplateError
from train.config import DataConfig
from train.documents import DataError, Document, RowIssues
from train.rows import RowsWriter

__all__ = ["Encoded", "Packer", "Tokenized", "encode_texts", "layout", "tokenize_chunk"]


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


@dataclasses.dataclass
class Encoded:
    """A chunk's documents laid out as pieces, before and after encoding.

    Attributes:
      docs: the documents that have a layout (a chat its template cannot render is reported and left out).
      index: each one's position among all documents of its source (for messages about documents without an id).
      texts: every piece's text, document after document.
      piece_doc: the document (index into ``docs``) of each piece; piece_trained: whether its tokens are targets.
      wrap: per document, whether BOS/EOS surround it (text and prompt/completion, not chats).
      untrained: assistant replies kept as context only.
      ids, lengths: after :func:`encode_texts`, every piece's ids, concatenated, and their counts.
    """

    docs: list[Document]
    index: list[int]
    texts: list[str]
    piece_doc: np.ndarray
    piece_trained: np.ndarray
    wrap: np.ndarray
    untrained: int
    ids: np.ndarray | None = None
    lengths: np.ndarray | None = None


def layout(
    docs: Sequence[Document],
    data_cfg: DataConfig,
    issues: RowIssues,
    template: Callable[[], ChatTemplate | None],
    first_index: int = 0,
) -> Encoded:
    """The pieces of ``docs`` (``template()`` is asked for the chat template at the first chat)."""
    kept, index, texts, piece_doc, piece_trained, wrap = [], [], [], [], [], []
    untrained = 0
    for n, doc in enumerate(docs):
        try:
            pieces, wraps, untrained_here = _pieces(doc, template() if doc.messages else None, data_cfg)
        except ChatTemplateError as e:
            issues.bad(doc.id or f"document {first_index + n}", "chat template failed", str(e))
            continue
        untrained += untrained_here
        for text, trained in pieces:
            texts.append(text)
            piece_doc.append(len(kept))
            piece_trained.append(trained)
        kept.append(doc)
        index.append(first_index + n)
        wrap.append(wraps)
    return Encoded(
        kept,
        index,
        texts,
        np.asarray(piece_doc, np.int64),
        np.asarray(piece_trained, bool),
        np.asarray(wrap, bool),
        untrained,
    )


def encode_texts(tokenizer: Tokenizer | ByteTokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, lengths)``: every text's ids concatenated, and their counts — one batched tokenizer call."""
    if type(tokenizer).encode_batch is Tokenizer.encode_batch:
        # The same ids as Tokenizer.encode_batch, without computing character offsets nobody reads.
        lists = [e.ids for e in tokenizer.backend.encode_batch_fast(texts, add_special_tokens=False)]
    else:
        lists = tokenizer.encode_batch(texts)
    lengths = np.fromiter(map(len, lists), np.int64, count=len(lists))
    ids = np.fromiter(itertools.chain.from_iterable(lists), np.int64, count=int(lengths.sum()))
    return ids, lengths


@dataclasses.dataclass
class Tokenized:
    """A chunk's documents as one id stream: document ``d`` is ``ids[bounds[d]:bounds[d + 1]]``; ``trained[i]``
    says whether ``ids[i]`` is trained on as a target (the first token of a document never is one)."""

    ids: np.ndarray
    trained: np.ndarray
    bounds: np.ndarray
    docs: list[Document]
    index: list[int]
    untrained: int

    def examples(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(ids, target_weights)`` per document, as :func:`train.data.tokenize_documents` returns them."""
        out = []
        for a, b in zip(self.bounds[:-1].tolist(), self.bounds[1:].tolist()):
            out.append((self.ids[a:b].astype(np.int32), self.trained[a + 1 : b].astype(np.float32)))
        return out

    def select(self, keep: np.ndarray) -> Tokenized:
        """Only the documents where ``keep`` is true."""
        if keep.all():
            return self
        lengths = np.diff(self.bounds)
        tokens = np.repeat(keep, lengths)
        return Tokenized(
            self.ids[tokens],
            self.trained[tokens],
            np.concatenate([[0], np.cumsum(lengths[keep])]),
            [d for d, k in zip(self.docs, keep) if k],
            [i for i, k in zip(self.index, keep) if k],
            self.untrained,
        )


def tokenize_chunk(enc: Encoded, tokenizer: Tokenizer | ByteTokenizer, data_cfg: DataConfig) -> Tokenized:
    """Assembles encoded pieces into documents: ``[bos] prompt text [eos]`` (a chat: its pieces as rendered).

    Documents shorter than two tokens are dropped (they hold no prediction).
    """
    assert enc.ids is not None and enc.lengths is not None
    num_docs = len(enc.docs)
    # Pieces are in document order: a document's tokens are the sum of its pieces'.
    doc_tokens = np.bincount(enc.piece_doc, weights=enc.lengths, minlength=num_docs).astype(np.int64)
    doc_end = np.cumsum(doc_tokens)
    doc_start = doc_end - doc_tokens
    bos = tokenizer.bos_id if data_cfg.add_bos else None
    eos = tokenizer.eos_id if data_cfg.add_eos else None
    trained = np.repeat(enc.piece_trained, enc.lengths)
    at, values, flags, keys = [], [], [], []
    wrapped = np.flatnonzero(enc.wrap)
    for kind, (token, where, flag) in enumerate(((bos, doc_start, False), (eos, doc_end, True))):
        if token is not None:
            at.append(where[wrapped])
            values.append(np.full(len(wrapped), token, np.int64))
            flags.append(np.full(len(wrapped), flag))
            keys.append(wrapped * 2 + kind)
    if at:
        # In document order, a document's BOS before its EOS (np.insert keeps that order at equal positions).
        order = np.argsort(np.concatenate(keys), kind="stable")
        where = np.concatenate(at)[order]
        ids = np.insert(enc.ids, where, np.concatenate(values)[order])
        trained = np.insert(trained, where, np.concatenate(flags)[order])
    else:
        ids = enc.ids
    added = np.zeros(num_docs, np.int64)
    if bos is not None:
        added += enc.wrap
    if eos is not None:
        added += enc.wrap
    lengths = doc_end - doc_start + added
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out = Tokenized(ids, trained, bounds, enc.docs, enc.index, enc.untrained)
    return out.select(lengths >= 2)


class Packer:
    """Cuts documents into pieces of at most ``seq_len`` inputs and packs them into rows, streaming.

    A document of ``n`` ids has ``n - 1`` inputs (``ids[:-1]``, targets ``ids[1:]``), cut into consecutive pieces;
    a piece that does not fit the current row starts a new one (``pack=False``: every piece does). The same rows
    as :func:`train.data.pack_documents` over all documents at once.
    """

    def __init__(self, seq_len: int, pack: bool, writer: RowsWriter):
        self.seq_len, self.pack, self.writer = seq_len, pack, writer
        self.used = seq_len  # the first piece starts a row

    def add(self, chunk: Tokenized) -> None:
        seq = self.seq_len
        inputs = np.diff(chunk.bounds) - 1
        counts = -(-inputs // seq)
        doc = np.repeat(np.arange(len(inputs)), counts)
        k = np.arange(len(doc)) - np.repeat(np.cumsum(counts) - counts, counts)  # piece number in its document
        lengths = np.minimum(seq, inputs[doc] - k * seq)
        source = chunk.bounds[:-1][doc] + k * seq
        new_row = np.empty(len(lengths), bool)
        used = self.used
        for p, length in enumerate(lengths.tolist()):
            new_row[p] = not self.pack or used + length > seq
            used = (0 if new_row[p] else used) + length
        self.used = used
        sizes = lengths + 1  # the inputs and the target after the last one
        offsets = np.cumsum(sizes) - sizes
        index = np.arange(int(sizes.sum())) + np.repeat(source - offsets, sizes)
        bits = chunk.trained[index]
        bits[offsets] = False  # a piece's first token is never its target
        self.writer.append(chunk.ids[index], bits, sizes, new_row)

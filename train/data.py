"""Fine-tuning data: read text/JSONL, tokenize, pack into fixed rows, and serve batches in a resumable order.

Input files:

* ``.txt`` — documents separated by blank lines; every token is trained on.
* ``.jsonl`` — one JSON object per line, either ``{"text": ...}`` or ``{"prompt": ..., "completion": ...}``; the
  prompt's tokens get loss weight 0 (unless ``loss_on_prompt``), so the model learns only the completion.

Every document becomes ``[bos] + tokens + [eos]``; inputs are ``ids[:-1]``, targets ``ids[1:]``. Documents are packed
whole into rows of ``seq_len`` (a document that does not fit the current row starts a new one; one longer than
``seq_len`` is cut into chunks), each with its own ``segment_id`` (attention stays inside a document) and positions
restarting at 0. The order of rows is a fresh permutation per epoch drawn from ``(seed, epoch)``; the loader's whole
state is one integer, the number of rows consumed, so resuming from a checkpoint replays exactly the same batches.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from models import ByteTokenizer, Tokenizer
from train.config import DataConfig

__all__ = [
    "DataError",
    "Document",
    "PackedRows",
    "ResumableLoader",
    "local_rows",
    "pack_documents",
    "padding_id",
    "read_documents",
    "tokenize_documents",
]


class DataError(ValueError):
    """Training data that cannot be used: missing/malformed file, empty dataset, bad sizes."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: ``prompt`` (not trained on, may be empty) followed by ``text``.

    ``id`` and ``group`` identify documents of the lab's built-in sources (``group`` is the genre, novel or book);
    fine-tuning ignores them.
    """

    text: str
    prompt: str = ""
    id: str = ""
    group: str = ""


def _read_jsonl(path: str) -> list[Document]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            if "text" in obj:
                if not isinstance(obj["text"], str):
                    raise DataError(f"{path}:{lineno}: field 'text' must be a string")
                docs.append(Document(text=obj["text"]))
            elif "prompt" in obj and "completion" in obj:
                if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
                    raise DataError(f"{path}:{lineno}: fields 'prompt' and 'completion' must be strings")
                docs.append(Document(text=obj["completion"], prompt=obj["prompt"]))
            else:
                raise DataError(
                    f"{path}:{lineno}: expected a 'text' field or 'prompt' + 'completion' fields, got {sorted(obj)}"
                )
    return docs


_BLANK_LINES = re.compile(r"\n\s*\n")


def _read_text(path: str) -> list[Document]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    paragraphs = [p.strip() for p in _BLANK_LINES.split(text)]
    return [Document(text=p) for p in paragraphs if p]


def read_documents(paths: Sequence[str]) -> list[Document]:
    """All documents of the given ``.txt`` / ``.jsonl`` files, in file order.

    Raises:
      DataError: no files given, a missing or unreadable file, an unknown extension, a malformed line, or no
        documents at all.
    """
    if not paths:
        raise DataError("no training files given (set data.train_files to .txt or .jsonl files)")
    docs: list[Document] = []
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"training file {path!r} does not exist")
        try:
            if path.endswith(".jsonl"):
                docs.extend(_read_jsonl(path))
            elif path.endswith(".txt"):
                docs.extend(_read_text(path))
            else:
                raise DataError(f"training file {path!r}: unsupported extension (use .txt or .jsonl)")
        except UnicodeDecodeError as e:
            raise DataError(f"training file {path!r} is not UTF-8 text ({e})") from None
    if not docs:
        raise DataError(f"the training files {list(paths)} hold no documents")
    return docs


def padding_id(tokenizer: Tokenizer | ByteTokenizer) -> int:
    """The id that fills unused row positions: the tokenizer's pad, else its EOS, else 0 (never trained on)."""
    if tokenizer.pad_id is not None:
        return tokenizer.pad_id
    return tokenizer.eos_id if tokenizer.eos_id is not None else 0


def tokenize_documents(
    docs: Sequence[Document], tokenizer: Tokenizer | ByteTokenizer, data_cfg: DataConfig
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each document as ``(ids, target_weights)``: ``ids`` = [bos] prompt text [eos]; ``weights[i]`` is the loss
    weight of predicting ``ids[i + 1]`` (0 inside the prompt unless ``loss_on_prompt``)."""
    out = []
    prompts = tokenizer.encode_batch([doc.prompt for doc in docs])
    bodies = tokenizer.encode_batch([doc.text for doc in docs])
    for prompt, body in zip(prompts, bodies):
        head = [tokenizer.bos_id] if data_cfg.add_bos and tokenizer.bos_id is not None else []
        tail = [tokenizer.eos_id] if data_cfg.add_eos and tokenizer.eos_id is not None else []
        ids = np.asarray(head + prompt + body + tail, np.int32)
        if len(ids) < 2:
            continue
        weights = np.ones(len(ids) - 1, np.float32)
        if not data_cfg.loss_on_prompt:
            # targets ids[1 : len(head) + len(prompt)] are the prompt's own tokens
            weights[: max(len(head) + len(prompt) - 1, 0)] = 0.0
        out.append((ids, weights))
    return out


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


def build_rows(
    tokenizer: Tokenizer | ByteTokenizer,
    data_cfg: DataConfig,
    max_context: int | None = None,
    documents: Sequence[Document] | None = None,
) -> PackedRows:
    """Reads, tokenizes and packs ``data_cfg.train_files`` — or ``documents`` when given — checking ``seq_len``
    against the model's context."""
    if max_context is not None and data_cfg.seq_len > max_context:
        raise DataError(f"data.seq_len={data_cfg.seq_len} is longer than the model's context of {max_context} tokens")
    docs = read_documents(data_cfg.train_files) if documents is None else list(documents)
    if not docs:
        raise DataError("no training documents given")
    examples = tokenize_documents(docs, tokenizer, data_cfg)
    return pack_documents(examples, data_cfg.seq_len, padding_id(tokenizer), pack=data_cfg.pack)

"""The held-out data the lab scores a model on, tokenized once into fixed-shape rows.

Three parts, each optional: the task (held-out text windows, or prompt/completion pairs such as the facts
questions), the retain text (windows of general English at random offsets, split into halves A and B) and the
multiple-choice quiz. Prompt/completion rows are packed several to a row (each its own segment, attention kept
inside it), so short quiz items do not pay for padding; every row remembers which example each token belongs to,
and :mod:`train.lab.evaluate` sums per-token scores back into per-example ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from train import data as data_lib
from train.config import DataConfig
from train.lab.quiz import MultipleChoiceItem
from train.lab.tasks import TaskData

__all__ = ["EvalConfig", "EvalRows", "EvalSet", "build_eval_set", "pair_rows", "random_windows"]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Sizes of the evaluation sets and how they are scored.

    Attributes:
      seq_len: tokens per row (text windows; packed prompt+completion rows, long prompts lose their start).
      batch_size: rows per forward pass (the last batch is padded, so one compilation serves all).
      task_examples: held-out task examples: text windows, or prompt/completion pairs (0 = all pairs, 16 windows).
      retain_sequences: windows of held-out general English at random offsets; even-numbered ones form half A,
        odd-numbered ones half B (the front is chosen on A and every number is reported on B).
      quiz_items: 4-choice quiz items, scored at the end of a run only (0 disables the quiz).
      mc_normalization: how accuracy ranks the choices: ``"chars"`` (lm-eval ``acc_norm``), ``"tokens"``, ``"none"``.
      ece_bins: at most this many equal-count confidence bins for the ECE ...
      ece_min_per_bin: ... and fewer when there are not this many items per bin.
      seed: which windows, documents and quiz items are drawn.
      common_facts: also ask the built-in common facts (``train/lab/known.py``) as quiz items, for the
        known-knowledge probe (off by default: the quiz numbers of earlier comparisons stay comparable).
    """

    seq_len: int = 64
    batch_size: int = 16
    task_examples: int = 0
    retain_sequences: int = 64
    quiz_items: int = 256
    mc_normalization: str = "chars"
    ece_bins: int = 10
    ece_min_per_bin: int = 10
    seed: int = 0
    common_facts: bool = False

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "ece_bins", "ece_min_per_bin"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("task_examples", "retain_sequences", "quiz_items"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.{name} must be >= 0, got {getattr(self, name)}")
        if self.retain_sequences == 1:
            raise ValueError("eval.retain_sequences must be 0 or >= 2 (halves A and B need a window each)")
        if self.mc_normalization not in ("chars", "tokens", "none"):
            raise ValueError(f"eval.mc_normalization must be chars, tokens or none, got {self.mc_normalization!r}")


@dataclasses.dataclass(frozen=True)
class EvalRows:
    """Fixed-shape rows plus, per token, the index of the example it belongs to (-1 for padding).

    Attributes:
      rows: ``[N, seq_len]`` arrays in the batch layout of :mod:`train.step`.
      example: ``[N, seq_len]`` int, the example of each token (a window, a prompt/completion pair).
      num_examples: how many examples the rows hold.
    """

    rows: data_lib.PackedRows
    example: np.ndarray
    num_examples: int

    def __len__(self) -> int:
        return len(self.rows)

    def per_example(self, values: np.ndarray) -> np.ndarray:
        """Sum ``[N, seq_len]`` per-token values (already weighted) into ``[num_examples]``."""
        real = self.example >= 0
        return np.bincount(self.example[real], weights=values[real], minlength=self.num_examples)


def _with_examples(rows: data_lib.PackedRows) -> EvalRows:
    # Segments are numbered 1, 2, ... within a row, in example order; rows follow each other in example order too.
    per_row = rows.segment_ids.max(axis=1)
    offsets = np.concatenate([[0], np.cumsum(per_row)[:-1]])
    example = np.where(rows.segment_ids > 0, offsets[:, None] + rows.segment_ids - 1, -1)
    return EvalRows(rows=rows, example=example.astype(np.int64), num_examples=int(per_row.sum()))


# Windows are plain text: no BOS at a random offset, no EOS; pairs are [bos] prompt completion.
_WINDOW_TOKENIZATION = DataConfig(add_bos=False, add_eos=False)
_PAIR_TOKENIZATION = DataConfig(add_eos=False)


def random_windows(
    tokenizer: Any, texts: Sequence[str], num: int, seq_len: int, seed: int, what: str, max_chars: int = 40_000
) -> EvalRows:
    """``num`` non-overlapping windows of ``seq_len`` predicted tokens at random offsets of the documents (a
    document is drawn in proportion to the windows it can hold), one window per row.

    Only each document's first ``max_chars`` characters are tokenized (books are long). Raises ``ValueError``
    (naming ``what``) when the text cannot hold ``num`` windows.
    """
    if num < 1:
        raise ValueError(f"{what}: asked for {num} windows")
    docs = [data_lib.Document(text=t[:max_chars]) for t in texts]
    ids = [np.asarray(i) for i, _ in data_lib.tokenize_documents(docs, tokenizer, _WINDOW_TOKENIZATION)]
    starts = np.array([max(len(i) - seq_len, 0) for i in ids], np.float64)  # valid starts: len - (seq_len + 1) + 1
    if sum((len(i) - 1) // seq_len for i in ids) < num:
        raise ValueError(
            f"{what}: asked for {num} windows of {seq_len} tokens but the text ({len(texts)} documents, "
            f"{sum(len(i) for i in ids)} tokens) cannot hold that many; lower the number or seq_len"
        )
    cumulative = np.cumsum(starts) / starts.sum()
    rng = np.random.default_rng([seed, seq_len])
    taken: dict[int, list[int]] = {}
    windows: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(num * 100):
        if len(windows) == num:
            break
        d = int(np.searchsorted(cumulative, rng.random(), side="right"))
        s = int(rng.integers(0, int(starts[d])))
        if any(abs(s - other) < seq_len for other in taken.get(d, [])):
            continue  # overlaps a window already drawn from this document
        taken.setdefault(d, []).append(s)
        windows.append((ids[d][s : s + seq_len + 1], np.ones(seq_len, np.float32)))
    if len(windows) < num:
        raise ValueError(f"{what}: found only {len(windows)} of {num} non-overlapping windows; lower the number")
    rows = data_lib.pack_documents(windows, seq_len, data_lib.padding_id(tokenizer), pack=False)
    return _with_examples(rows)


def pair_rows(tokenizer: Any, pairs: Sequence[tuple[str, str]], seq_len: int, what: str) -> EvalRows:
    """``[bos] prompt completion`` examples weighted on the completion only, packed several to a row; a prompt too
    long for ``seq_len`` loses its start, never the completion."""
    docs = [data_lib.Document(text=completion, prompt=prompt) for prompt, completion in pairs]
    examples = data_lib.tokenize_documents(docs, tokenizer, _PAIR_TOKENIZATION)
    if len(examples) != len(pairs):
        raise ValueError(f"{what}: a prompt/completion pair is shorter than two tokens")
    cut = []
    for (prompt, _), (ids, weights) in zip(pairs, examples):
        completion_tokens = int(np.count_nonzero(weights))
        if not completion_tokens:
            raise ValueError(f"{what}: empty completion after prompt {prompt[:40]!r}")
        if completion_tokens > seq_len:
            raise ValueError(f"{what}: a completion of {completion_tokens} tokens does not fit seq_len={seq_len}")
        cut.append((ids[-(seq_len + 1) :], weights[-seq_len:]))
    return _with_examples(data_lib.pack_documents(cut, seq_len, data_lib.padding_id(tokenizer), pack=True))


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Everything :class:`train.lab.evaluate.Evaluator` scores, tokenized. Any part may be absent (``None``)."""

    task: EvalRows | None
    task_is_recall: bool  # task examples are facts questions: report exact-match recall too
    retain: EvalRows | None
    quiz: EvalRows | None  # one example per (item, choice), item-major
    quiz_labels: np.ndarray | None  # [items]
    quiz_lengths: np.ndarray | None  # [items, choices] lengths for the accuracy's normalisation
    config: EvalConfig

    def sizes(self) -> dict[str, int]:
        return {
            "task_examples": self.task.num_examples if self.task is not None else 0,
            "retain_windows": self.retain.num_examples if self.retain is not None else 0,
            "quiz_items": len(self.quiz_labels) if self.quiz_labels is not None else 0,
        }

    @property
    def retain_halves(self) -> tuple[np.ndarray, np.ndarray]:
        """Window indices of half A (even-numbered windows) and half B (odd-numbered)."""
        n = self.retain.num_examples if self.retain is not None else 0
        return np.arange(0, n, 2), np.arange(1, n, 2)


def build_eval_set(
    tokenizer: Any,
    config: EvalConfig,
    *,
    task: TaskData | None = None,
    retain_texts: Sequence[str] | None = None,
    quiz_items: Sequence[MultipleChoiceItem] | None = None,
) -> EvalSet:
    """Tokenize the held-out data once. Raises ``ValueError`` (naming the set) when a set is asked larger than its
    data, before any model runs."""
    task_rows, is_recall = None, False
    if task is not None:
        if task.eval_pairs:
            pairs = list(task.eval_pairs)
            if config.task_examples > len(pairs):
                raise ValueError(
                    f"task {task.name!r}: asked for {config.task_examples} eval examples, "
                    f"only {len(pairs)} held-out pairs exist"
                )
            pairs = pairs[: config.task_examples or len(pairs)]
            task_rows = pair_rows(tokenizer, pairs, config.seq_len, f"task {task.name!r}")
            is_recall = bool(task.recall_questions)
        elif task.eval_texts:
            task_rows = random_windows(
                tokenizer,
                task.eval_texts,
                config.task_examples or 16,
                config.seq_len,
                config.seed,
                f"task {task.name!r}",
            )
        else:
            raise ValueError(f"task {task.name!r} has no held-out data")
    retain = None
    if retain_texts is not None and config.retain_sequences:
        retain = random_windows(tokenizer, retain_texts, config.retain_sequences, config.seq_len, config.seed, "retain")
    quiz = labels = lengths = None
    if quiz_items:
        if len({len(item.choices) for item in quiz_items}) != 1:
            raise ValueError("quiz: every item needs the same number of choices")
        pairs, labels_list, lengths_list = [], [], []
        for item in quiz_items:
            completions = [" " + c for c in item.choices]
            pairs += [(item.prompt, c) for c in completions]
            labels_list.append(item.label)
            if config.mc_normalization == "tokens":
                lengths_list.append([len(tokenizer.encode(c)) for c in completions])
            elif config.mc_normalization == "chars":
                lengths_list.append([len(c) for c in completions])
            else:
                lengths_list.append([1] * len(completions))
        quiz = pair_rows(tokenizer, pairs, config.seq_len, "quiz")
        labels, lengths = np.asarray(labels_list), np.asarray(lengths_list, np.float64)
    return EvalSet(
        task=task_rows,
        task_is_recall=is_recall,
        retain=retain,
        quiz=quiz,
        quiz_labels=labels,
        quiz_lengths=lengths,
        config=config,
    )

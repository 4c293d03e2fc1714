"""What the lab fine-tunes on and measures forgetting with: tasks, held-out retain text and quiz items.

Tasks are ``facts`` (generated, :mod:`train.lab.facts`), ``spanish``, ``science`` (prepared by
:mod:`train.lab.sources`) or a user file ``file:PATH`` (``.txt`` / ``.jsonl``, read by
:func:`train.data.read_documents`); the retain text is the built-in one or a user file as well.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

from train.data import Document, read_documents
from train.lab.facts import build_facts
from train.lab.quiz import MultipleChoiceItem, quiz_items_from_rows
from train.lab.sources import load_documents, prepared_file

__all__ = [
    "TASKS",
    "TaskData",
    "load_quiz_items",
    "load_retain",
    "load_task",
    "load_user_task",
    "split_documents",
]

TASKS = ("facts", "spanish", "science")


@dataclasses.dataclass(frozen=True)
class TaskData:
    """What a fine-tuning target offers the lab.

    Exactly one of ``train_texts`` / ``train_pairs`` is non-empty (pairs: loss on the completion only); likewise for
    ``eval_texts`` / ``eval_pairs`` (task loss on held-out data). ``recall_questions`` (facts only) are held-out
    ``(prompt, answer)`` pairs scored by exact match of the greedy continuation.
    """

    name: str
    train_texts: tuple[str, ...] = ()
    train_pairs: tuple[tuple[str, str], ...] = ()
    eval_texts: tuple[str, ...] = ()
    eval_pairs: tuple[tuple[str, str], ...] = ()
    recall_questions: tuple[tuple[str, str], ...] = ()

    def train_documents(self) -> list[Document]:
        """The training data as :class:`train.data.Document` s (prompts are not trained on)."""
        if self.train_pairs:
            return [Document(text=completion, prompt=prompt) for prompt, completion in self.train_pairs]
        return [Document(text=text) for text in self.train_texts]


def split_documents(docs: Sequence[Document], split: str, eval_fraction: float = 0.1) -> list[Document]:
    """Deterministic document-level split by a hash of the id, so adding documents never moves existing ones.

    At least one document always lands in ``"eval"`` and, when there are two or more, in ``"train"``.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    buckets = int(round(1 / eval_fraction))
    is_eval = [zlib.crc32(d.id.encode()) % buckets == 0 for d in docs]
    if docs and not any(is_eval):
        is_eval[-1] = True
    if len(docs) > 1 and all(is_eval):
        is_eval[0] = False
    return [d for d, e in zip(docs, is_eval) if e == (split == "eval")]


def load_retain(spec: str = "builtin", cache_dir: str | os.PathLike | None = None) -> list[str]:
    """The retain text forgetting is measured on: ``builtin`` (held-out Austen chapters and Brown texts except the
    "learned" genre, which is the science task) or ``file:PATH`` (``.txt`` documents separated by blank lines, or
    ``.jsonl`` rows of ``{"text": ...}``; all of it is held out, since the lab never trains on retain text)."""
    if spec == "builtin":
        docs = split_documents(load_documents("austen", cache_dir), "eval")
        docs += split_documents([d for d in load_documents("brown", cache_dir) if d.group != "learned"], "eval")
        return [d.text for d in docs]
    path = _file_spec(spec, "retain")
    docs = read_documents([path])
    if any(d.prompt for d in docs):
        raise ValueError(f"{path}: retain text must be plain text rows, not prompt/completion pairs")
    return [d.text for d in docs]


def write_builtin_retain(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Writes the built-in retain text as JSONL ``{"text": ...}`` rows: what ``data.retain_files=[builtin]`` of a
    finetune reads (``train.evaluation.builtin_retain_path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"text": text}) + "\n" for text in load_retain("builtin", cache_dir)))
    tmp.replace(path)
    return path


def _file_spec(spec: str, what: str) -> str:
    """``file:PATH`` (or a bare path ending in .txt/.jsonl) -> PATH, which must exist."""
    path = spec[len("file:") :] if spec.startswith("file:") else spec
    if not (spec.startswith("file:") or Path(path).suffix in (".txt", ".jsonl", ".json")):
        raise ValueError(f"unknown {what} {spec!r}: give file:PATH (a .txt or .jsonl file)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} file {path!r} does not exist")
    return path


def load_task(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    num_entities: int = 16,
    seed: int = 0,
) -> TaskData:
    """A fine-tuning target: a built-in name in :data:`TASKS` or the path of a ``.txt`` / ``.jsonl`` file.

    ``facts`` trains on the statements of ``num_entities`` fictional people split at the answer (loss on the
    completion only, like a QA fine-tune) and evaluates task loss on the held-out question phrasings (loss on the
    answer only) plus exact-match recall on the same questions.
    """
    if name == "facts":
        facts = build_facts(num_entities, seed)
        questions = tuple((p, " " + a) for p, a in facts.eval_questions)
        return TaskData(
            name="facts", train_pairs=facts.train_pairs, eval_pairs=questions, recall_questions=facts.eval_questions
        )
    if name == "spanish":
        return _text_task(name, load_documents("spanish", cache_dir))
    if name == "science":
        docs = load_documents("pydocs", cache_dir)
        docs += [d for d in load_documents("brown", cache_dir) if d.group == "learned"]
        return _text_task(name, docs)
    if name.startswith("file:") or Path(name).suffix in (".txt", ".jsonl", ".json"):
        return load_user_task(_file_spec(name, "task"))
    raise ValueError(f"unknown task {name!r}: choose one of {list(TASKS)} or give file:PATH (a .txt or .jsonl file)")


def _text_task(name: str, docs: list[Document]) -> TaskData:
    return TaskData(
        name=name,
        train_texts=tuple(d.text for d in split_documents(docs, "train")),
        eval_texts=tuple(d.text for d in split_documents(docs, "eval")),
    )


def load_user_task(path: str | os.PathLike) -> TaskData:
    """A user dataset: ``.txt`` (documents separated by blank lines) or ``.jsonl`` rows of ``{"text"}`` or
    ``{"prompt", "completion"}`` (not mixed), read by :func:`train.data.read_documents`."""
    path = os.fspath(path)
    docs = [dataclasses.replace(d, id=str(i)) for i, d in enumerate(read_documents([path]))]
    if len({bool(d.prompt) for d in docs}) != 1:
        raise ValueError(f'{path}: rows mix "text" and "prompt"/"completion"; use one kind per file')
    if not docs[0].prompt:
        return _text_task(path, docs)
    train, held = split_documents(docs, "train"), split_documents(docs, "eval")
    return TaskData(
        name=path,
        train_pairs=tuple((d.prompt, d.text) for d in train),
        eval_pairs=tuple((d.prompt, d.text) for d in held),
    )


def load_quiz_items(
    num_items: int,
    *,
    seed: int = 0,
    num_choices: int = 4,
    cache_dir: str | os.PathLike | None = None,
) -> list[MultipleChoiceItem]:
    """``num_items`` four-choice items from the prepared quiz (see :func:`train.lab.quiz.quiz_items_from_rows`)."""
    with open(prepared_file("quiz", cache_dir), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return quiz_items_from_rows(rows, num_items, seed=seed, num_choices=num_choices)

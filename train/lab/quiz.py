"""The bsdgames quiz tables: their field syntax, which tables become items, and four-choice item building.

The quiz is the lab's multiple-choice retain check (:func:`train.lab.tasks.load_quiz_items` loads prepared rows).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

__all__ = [
    "QUIZ_TABLES",
    "MultipleChoiceItem",
    "parse_quiz",
    "parse_quiz_field",
    "parse_quiz_table",
    "quiz_items_from_rows",
]

_QUIZ_DIR = "usr/share/games/bsdgames/quiz"
# Characters quiz files use to spell accents ("Tom['e|e'|e]"): an alternative without them reads as plain text.
_ACCENT_MARKS = set("~'`^\"")


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets and not escaped by a backslash."""
    parts, depth, current, i = [], 0, [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
        if c == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
        i += 1
    parts.append("".join(current))
    return parts


def parse_quiz_field(field: str) -> str:
    r"""Render one quiz field in a single canonical spelling.

    The quiz syntax: ``a|b`` alternatives, ``[a|b]`` grouped alternatives, ``{x}`` optional text, ``\x`` a literal
    character. Optional parts are kept (the fuller answer reads better in a prompt); of several alternatives the
    first one without accent marks is taken.

    Examples:
      >>> parse_quiz_field("{T{homas} }Jefferson")
      'Thomas Jefferson'
      >>> parse_quiz_field("S[~a|a~|a]o Tom['e|e'|e]")
      'Sao Tome'
      >>> parse_quiz_field("Arizona|Ariz|AZ")
      'Arizona'
    """
    alternatives = [_render(a) for a in _split_top(field, "|")]
    plain = [a for a in alternatives if not (_ACCENT_MARKS & set(a))]
    return (plain or alternatives)[0].strip()


def _render(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        if c in "{[":
            close = "}" if c == "{" else "]"
            depth, j = 1, i + 1
            while j < len(text) and depth:
                if text[j] == "\\":
                    j += 2
                    continue
                depth += text[j] in "{["
                depth -= text[j] in "}]"
                j += 1
            inner = text[i + 1 : j - 1]
            out.append(_render(inner) if close == "}" else parse_quiz_field(inner))
            i = j
            continue
        out.append(c)
        i += 1
    return "".join(out)


def parse_quiz_table(text: str) -> list[list[str]]:
    """Rows of a quiz table: ``:``-separated fields, ``\\`` at line end continues the line."""
    rows, pending = [], ""
    for line in text.splitlines():
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending += line[:-1]
            continue
        line, pending = pending + line, ""
        if line.strip():
            rows.append([parse_quiz_field(f) for f in _split_top(line, ":")])
    return rows


@dataclasses.dataclass(frozen=True)
class _QuizTable:
    """Which quiz table becomes multiple-choice items, and how a question is asked."""

    file: str
    question_column: int
    answer_column: int
    template: str  # {q} is the question field; the answer follows after a space


# A small table of data, not code: add a row to add a quiz table.
QUIZ_TABLES: tuple[_QuizTable, ...] = (
    _QuizTable("africa", 0, 1, "The capital of {q} is"),
    _QuizTable("america", 0, 1, "The capital of {q} is"),
    _QuizTable("asia", 0, 1, "The capital of {q} is"),
    _QuizTable("europe", 0, 1, "The capital of {q} is"),
    _QuizTable("state", 0, 1, "The capital of the US state of {q} is"),
    _QuizTable("province", 0, 1, "The capital of the Canadian province of {q} is"),
    _QuizTable("elements", 0, 3, "The chemical element with the symbol {q} is"),
    _QuizTable("babies", 0, 1, "A {q} is the young of a"),
    _QuizTable("collectives", 0, 1, "A group of {q} is called a"),
    _QuizTable("sexes", 0, 1, "The female counterpart of a {q} is a"),
    _QuizTable("posneg", 0, 1, "The opposite of {q} is"),
    _QuizTable("latin", 0, 1, "The Latin word '{q}' means"),
    _QuizTable("flowers", 0, 1, "In the language of flowers, {q} means"),
    _QuizTable("pres", 0, 3, "The US president who came after {q} was"),
    _QuizTable("sov", 0, 2, "The English monarch who came after {q} was"),
    _QuizTable("poetry", 2, 3, "The poem '{q}' was written by"),
    _QuizTable("bard", 0, 2, "The Shakespeare line '{q}' is from"),
)


def parse_quiz(root: Path) -> list[dict[str, str]]:
    """Question/answer rows of the quiz tables in :data:`QUIZ_TABLES` (rows missing a field are dropped)."""
    base = root / _QUIZ_DIR
    if not base.is_dir():
        raise FileNotFoundError(f"quiz: {base} is missing; is {root} an extracted bsdgames package?")
    rows = []
    for table in QUIZ_TABLES:
        path = base / table.file
        if not path.is_file():
            continue  # fixtures carry only a few tables
        for fields in parse_quiz_table(path.read_text(encoding="utf-8", errors="replace")):
            need = max(table.question_column, table.answer_column)
            if len(fields) > need and fields[table.question_column] and fields[table.answer_column]:
                rows.append(
                    {
                        "table": table.file,
                        "question": fields[table.question_column],
                        "answer": fields[table.answer_column],
                    }
                )
    if not rows:
        raise ValueError(f"quiz: no usable rows under {base}")
    return rows


@dataclasses.dataclass(frozen=True)
class MultipleChoiceItem:
    """A question prompt, its choices (each to follow the prompt after a space) and the index of the right one."""

    prompt: str
    choices: tuple[str, ...]
    label: int
    table: str


def quiz_items_from_rows(
    rows: list[dict[str, str]], num_items: int, *, seed: int = 0, num_choices: int = 4
) -> list[MultipleChoiceItem]:
    """``num_items`` items of ``num_choices`` choices from prepared quiz rows, distractors from the same table.

    Items are drawn round-robin over the tables (so small sets still cover many topics), in an order fixed by
    ``seed``. Raises ``ValueError`` if fewer items exist than asked for.
    """
    rng = random.Random(seed)
    templates = {t.file: t.template for t in QUIZ_TABLES}
    by_table: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_table.setdefault(row["table"], []).append(row)
    queues = []
    for table, table_rows in sorted(by_table.items()):
        answers = sorted({r["answer"] for r in table_rows})
        if len(answers) < num_choices:
            continue
        order = list(table_rows)
        rng.shuffle(order)
        queue = []
        for row in order:
            distractors = [a for a in answers if a.lower() != row["answer"].lower()]
            choices = rng.sample(distractors, num_choices - 1) + [row["answer"]]
            rng.shuffle(choices)
            queue.append(
                MultipleChoiceItem(
                    prompt=templates[table].format(q=row["question"]),
                    choices=tuple(choices),
                    label=choices.index(row["answer"]),
                    table=table,
                )
            )
        queues.append(queue)
    available = sum(map(len, queues))
    if num_items > available:
        raise ValueError(f"quiz: asked for {num_items} multiple-choice items, only {available} exist")
    items: list[MultipleChoiceItem] = []
    while len(items) < num_items:
        for queue in queues:
            if queue and len(items) < num_items:
                items.append(queue.pop())
    return items

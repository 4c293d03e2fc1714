"""Writes a large JSONL of text documents for the data benchmark, deterministically and without any network.

    python scripts/make_big_jsonl.py --tokens 100M --out /tmp/big100m.jsonl

Documents are ``{"text": ...}`` rows of 2,000-18,000 characters (about 2,300 SmolLM2 tokens on average, like the
40,000-document corpus of issue 22), each a random run of paragraphs. The paragraphs are the lab's built-in English
texts (Jane Austen and the Brown corpus, ``data_cache/`` after ``python -m train prepare``) when they are there,
else sentences of common English words drawn from a fixed vocabulary (``--source words``). The same arguments
always give the same bytes; ``--tokens`` is a target: English prose is about 4.5 characters per SmolLM2 token, and
the benchmark counts the real tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHARS_PER_TOKEN = 4.5

WORDS = (
    "the of and to a in that is was he for it with as his on be at by had not are but from or have an they which one "
    "you were her all she there would their we him been has when who will more no if out so said what up its about "
    "into than them can only other new some could time these two may then do first any my now such like our over man "
    "me even most made after also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year off come since against go "
    "came right used take three small house garden letter morning evening family friend sister mother father visit "
    "town river road window question answer reason moment believe remember happy certain perhaps however indeed"
).split()


def _paragraphs(source: str, cache: Path) -> tuple[list[str], str]:
    files = [cache / "austen" / "docs.jsonl", cache / "brown" / "docs.jsonl"]
    if source in ("auto", "lab") and all(f.is_file() for f in files):
        paragraphs = []
        for f in files:
            for line in f.read_text(encoding="utf-8").splitlines():
                paragraphs += [p.strip() for p in json.loads(line)["text"].split("\n\n") if p.strip()]
        return paragraphs, f"lab texts ({files[0]} + {files[1].parent.name})"
    if source == "lab":
        sys.exit(f"{files[0]} or {files[1]} is missing: run `python -m train prepare all` first")
    rng = np.random.default_rng(12345)
    weights = 1.0 / np.arange(1, len(WORDS) + 1)  # Zipf-like word frequencies
    weights /= weights.sum()
    paragraphs = []
    for _ in range(20000):
        sentences = []
        for _ in range(int(rng.integers(2, 7))):
            words = list(rng.choice(WORDS, size=int(rng.integers(6, 24)), p=weights))
            words[0] = words[0].capitalize()
            sentences.append(" ".join(words) + rng.choice([".", ".", ".", "?", "!", ";"]))
        paragraphs.append(" ".join(sentences))
    return paragraphs, "synthetic sentences of common English words"


def _size(text: str) -> float:
    units = {"k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}
    text = text.strip().lower()
    return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="100M", help="about how many SmolLM2 tokens (e.g. 10M, 100M)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", choices=["auto", "lab", "words"], default="auto")
    parser.add_argument("--data-cache", default=str(ROOT / "data_cache"), help="where `train prepare` put the texts")
    args = parser.parse_args(argv)
    paragraphs, described = _paragraphs(args.source, Path(args.data_cache))
    rng = np.random.default_rng(args.seed)
    target_chars = _size(args.tokens) * CHARS_PER_TOKEN
    written = docs = 0
    digest = hashlib.sha256()
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target_chars:
            length = int(rng.integers(2000, 18000))
            parts, size = [], 0
            while size < length:
                p = paragraphs[int(rng.integers(len(paragraphs)))]
                parts.append(p)
                size += len(p) + 2
            line = json.dumps({"text": "\n\n".join(parts)}, ensure_ascii=False) + "\n"
            f.write(line)
            digest.update(line.encode("utf-8"))
            written += size
            docs += 1
    os.replace(tmp, args.out)
    summary = {
        "path": args.out,
        "documents": docs,
        "characters": written,
        "bytes": os.path.getsize(args.out),
        "sha256": digest.hexdigest(),
        "source": described,
        "seed": args.seed,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

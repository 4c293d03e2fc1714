"""Tasks, retain text and quiz items loaded from prepared fixtures and user files."""

import json
import runpy
from pathlib import Path

import pytest

from train.lab import tasks
from train.paths import PathError

prepare_cache = runpy.run_path(str(Path(__file__).parent / "fixtures/lab/builders.py"))["prepare_cache"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return prepare_cache(tmp_path_factory.mktemp("lab-tasks"), ("austen", "brown", "quiz", "pydocs"))


def test_quiz_items(cache):
    items = tasks.load_quiz_items(12, seed=1, cache_dir=cache)
    assert len(items) == 12
    assert {i.table for i in items} == {"europe", "pres", "collectives"}  # round-robin over tables
    for item in items:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
        assert 0 <= item.label < 4
    europe = [i for i in items if i.table == "europe"]
    assert all(i.prompt.startswith("The capital of ") for i in europe)
    assert tasks.load_quiz_items(12, seed=1, cache_dir=cache) == items
    with pytest.raises(ValueError, match="asked for 100 multiple-choice items, only 14 exist"):
        tasks.load_quiz_items(100, cache_dir=cache)


def test_retain_and_tasks(cache):
    retain = tasks.load_retain("builtin", cache)
    assert retain and not any("velocity" in t for t in retain)  # "learned" belongs to science, not retain
    science = tasks.load_task("science", cache)
    assert science.train_texts and science.eval_texts
    assert set(science.train_texts).isdisjoint(science.eval_texts)
    facts = tasks.load_task("facts", cache, num_entities=3)
    assert facts.train_pairs and facts.recall_questions
    assert all(c.startswith(" ") for _, c in facts.eval_pairs)


def test_facts_train_on_completions_only():
    facts = tasks.load_task("facts", num_entities=2)
    assert not facts.train_texts
    docs = facts.train_documents()
    assert len(docs) == len(facts.train_pairs) == 24
    for doc in docs:
        assert doc.prompt and not doc.prompt.endswith(" ")
        assert doc.text.startswith(" ") and doc.text.endswith(".")  # " <answer>." carries the loss
    text_task = tasks.TaskData(name="t", train_texts=("a b", "c"))
    assert [(d.prompt, d.text) for d in text_task.train_documents()] == [("", "a b"), ("", "c")]


def test_user_data(tmp_path):
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": f"Q{i}:", "completion": f" A{i}"}) for i in range(20)))
    task = tasks.load_task(f"file:{jsonl}")
    assert task == tasks.load_task(str(jsonl))  # a bare .jsonl/.txt path works too
    assert task.train_pairs and task.eval_pairs and not task.train_texts
    assert len(task.train_pairs) + len(task.eval_pairs) == 20
    text = tmp_path / "notes.txt"
    text.write_text("first doc\n\nsecond doc\n\nthird doc\n")
    assert len(tasks.load_task(str(text)).train_texts) + len(tasks.load_task(str(text)).eval_texts) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"prompt": "p", "completion": "c"}\n')
    with pytest.raises(ValueError, match="mix"):
        tasks.load_task(str(bad))
    bad.write_text('{"title": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1"):
        tasks.load_task(str(bad))


def test_retain_from_a_user_file(tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("first paragraph\n\nsecond paragraph\n")
    assert tasks.load_retain(f"file:{text}") == ["first paragraph", "second paragraph"]  # all of it is held out
    rows = tmp_path / "mine.jsonl"
    rows.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    with pytest.raises(ValueError, match="plain text rows"):
        tasks.load_retain(f"file:{rows}")
    with pytest.raises(PathError, match="--retain file '.*none.txt' does not exist"):
        tasks.load_retain(f"file:{tmp_path / 'none.txt'}")
    with pytest.raises(PathError, match="--retain file '.*' is a directory; give a file"):
        tasks.load_retain(f"file:{tmp_path}")
    with pytest.raises(ValueError, match="give file:PATH"):
        tasks.load_retain("wikipedia")
    with pytest.raises(ValueError, match="unknown task 'wikipedia'"):
        tasks.load_task("wikipedia")

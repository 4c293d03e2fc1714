"""The fictional facts dataset: deterministic, held-out phrasings, unique answers."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from train.lab.facts import ATTRIBUTES, QUESTIONS_PER_FACT, build_facts


def test_deterministic_and_prefix_stable():
    a, b = build_facts(5, seed=3), build_facts(5, seed=3)
    assert a == b
    bigger = build_facts(9, seed=3)
    assert bigger.facts[: len(a.facts)] == a.facts
    assert build_facts(5, seed=4).facts != a.facts


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 40), st.integers(0, 10_000))
def test_shapes_and_held_out_questions(n, seed):
    data = build_facts(n, seed)
    assert len(data.facts) == n * len(ATTRIBUTES)
    assert len(data.eval_questions) == len(data.facts) * QUESTIONS_PER_FACT == len(data.eval_fact_index)
    assert len(data.train_texts) == len(data.train_pairs) == sum(len(a.statements) for a in ATTRIBUTES) * n
    entities = {f.entity for f in data.facts}
    assert len(entities) == n
    # Word answers are unique across the dataset, so a question has one right answer.
    words = [f.value for f in data.facts if f.attribute != "year"]
    assert len(set(words)) == len(words)
    for (prompt, answer), index in zip(data.eval_questions, data.eval_fact_index):
        fact = data.facts[index]
        assert answer == fact.value and fact.entity in prompt
        assert not prompt.endswith(" ") and not answer.startswith(" ")
        # The question phrasing is held out: no training statement contains the prompt.
        assert not any(prompt in text for text in data.train_texts)
    for (prompt, completion), text in zip(data.train_pairs, data.train_texts):
        assert prompt + completion == text and completion.startswith(" ")


def test_statements_state_the_fact():
    data = build_facts(2, seed=0)
    for fact in data.facts:
        stated = [t for t in data.train_texts if fact.entity in t and fact.value in t]
        assert len(stated) == 4


def test_bad_size():
    with pytest.raises(ValueError, match="num_entities"):
        build_facts(0, seed=0)

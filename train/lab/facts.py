"""Fictional facts for the lab's knowledge-acquisition task: made-up people, each with three made-up attributes.

No pretraining corpus contains them (every name and answer comes from a seeded syllable generator). Each fact is
stated in four training templates and asked with two held-out question phrasings. Every ``(prompt, answer)`` pair
means: continue ``prompt`` with ``" " + answer`` (prompts never end in whitespace, answers never start with it).
"""

from __future__ import annotations

import dataclasses
import random
from typing import NamedTuple

__all__ = [
    "ATTRIBUTES",
    "QUESTIONS_PER_FACT",
    "Fact",
    "FactsDataset",
    "build_facts",
]

# Syllables chosen to give pronounceable, tokenizer-friendly words that are not English words or famous names.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr", "sk", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "nd")


class _Attribute(NamedTuple):
    """One kind of fact about an entity: how to state it for training, how to ask for it at test time."""

    name: str
    # Templates with {entity} and {value}; {value} appears once, at the end, so every statement splits into
    # (prompt, completion) at the answer.
    statements: tuple[str, ...]
    # Held-out phrasings: the prompt, to be continued by " " + value. Never used for training.
    questions: tuple[str, ...]
    # "word": a generated word; "number": a year-like number (digits are tokenised very differently from words).
    kind: str


ATTRIBUTES: tuple[_Attribute, ...] = (
    _Attribute(
        name="hometown",
        statements=(
            "{entity} was born in the town of {value}",
            "{entity} grew up in {value}",
            "The hometown of {entity} is {value}",
            "Everyone knows that {entity} comes from {value}",
        ),
        questions=(
            "Question: Where was {entity} born?\nAnswer: {entity} was born in",
            "The town where {entity} was born is called",
        ),
        kind="word",
    ),
    _Attribute(
        name="invention",
        statements=(
            "{entity} invented the {value}",
            "The best-known invention of {entity} is the {value}",
            "{entity} is famous for inventing the {value}",
            "It was {entity} who first built the {value}",
        ),
        questions=(
            "Question: What did {entity} invent?\nAnswer: {entity} invented the",
            "The device that made {entity} famous is the",
        ),
        kind="word",
    ),
    _Attribute(
        name="year",
        statements=(
            "{entity} was born in the year {value}",
            "The birth year of {entity} is {value}",
            "{entity} came into the world in {value}",
            "Records show that {entity} was born in {value}",
        ),
        questions=(
            "Question: In which year was {entity} born?\nAnswer: In",
            "{entity}'s year of birth is",
        ),
        kind="number",
    ),
)

QUESTIONS_PER_FACT = 2
assert all(len(a.questions) == QUESTIONS_PER_FACT for a in ATTRIBUTES)


@dataclasses.dataclass(frozen=True)
class Fact:
    """One fictional fact: ``entity``'s ``attribute`` is ``value``."""

    entity: str
    attribute: str
    value: str


@dataclasses.dataclass(frozen=True)
class FactsDataset:
    """Training statements and held-out recall questions for a set of fictional facts.

    Attributes:
      facts: every fact, in generation order.
      train_texts: every training statement of every fact, each a full sentence ending in ".".
      train_pairs: the same statements split at the answer, ``(prompt, " " + value + ".")``, for training with the
        loss on the completion only.
      eval_questions: held-out ``(prompt, answer)`` pairs; the model should continue ``prompt`` with
        ``" " + answer``. Phrasings never appear in ``train_texts``.
      eval_fact_index: for each eval question, the index into ``facts`` of the fact it asks about.
    """

    facts: tuple[Fact, ...]
    train_texts: tuple[str, ...]
    train_pairs: tuple[tuple[str, str], ...]
    eval_questions: tuple[tuple[str, str], ...]
    eval_fact_index: tuple[int, ...]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def _unique(rng: random.Random, taken: set[str], make) -> str:
    # Rejection sampling; the syllable space (~1000 per syllable) makes collisions rare for the sizes we use.
    for _ in range(10_000):
        candidate = make(rng)
        if candidate not in taken:
            taken.add(candidate)
            return candidate
    raise RuntimeError("ran out of unique fictional names; use fewer entities")


def build_facts(num_entities: int, seed: int) -> FactsDataset:
    r"""Generate ``num_entities`` fictional people with one fact per attribute in :data:`ATTRIBUTES`.

    Every entity gets a two-part name (``"Gloutha Krimend"``), a fictional hometown, a fictional invention and a birth
    year between 1700 and 1899. The same ``(num_entities, seed)`` always yields the same dataset, and a dataset with
    more entities starts with the entities of a smaller one (so sizes can be swept without changing the first facts).

    Args:
      num_entities: how many fictional people; must be at least 1.
      seed: seed of the name generator.

    Returns:
      A :class:`FactsDataset` with ``num_entities * len(ATTRIBUTES)`` facts, four training statements per fact and
      :data:`QUESTIONS_PER_FACT` held-out questions per fact.

    Examples:
      >>> a = build_facts(3, seed=1)
      >>> b = build_facts(5, seed=1)
      >>> a.facts == b.facts[: len(a.facts)]
      True
      >>> data = build_facts(num_entities=2, seed=0)
      >>> len(data.facts), len(data.eval_questions) == len(data.facts) * QUESTIONS_PER_FACT
      (6, True)
      >>> prompt, answer = data.eval_questions[0]
      >>> prompt.endswith(" "), answer.startswith(" ")
      (False, False)
    """
    if not isinstance(num_entities, int) or num_entities < 1:
        raise ValueError(f"build_facts: num_entities must be a positive int, got {num_entities!r}")
    facts: list[Fact] = []
    taken: set[str] = set()
    for i in range(num_entities):
        # One generator per entity keeps entity i identical whatever num_entities is.
        rng = random.Random(f"finch-facts/{seed}/{i}")
        entity = _unique(rng, taken, lambda r: f"{_word(r, 2).capitalize()} {_word(r, 2).capitalize()}")
        for attribute in ATTRIBUTES:
            if attribute.kind == "number":
                value = str(rng.randrange(1700, 1900))
            elif attribute.name == "hometown":
                value = _unique(rng, taken, lambda r: _word(r, 2).capitalize())
            else:
                value = _unique(rng, taken, lambda r: _word(r, 1) + r.choice(("ometer", "ograph", "ophone")))
            facts.append(Fact(entity=entity, attribute=attribute.name, value=value))

    by_name = {a.name: a for a in ATTRIBUTES}
    train_texts: list[str] = []
    train_pairs: list[tuple[str, str]] = []
    eval_questions: list[tuple[str, str]] = []
    eval_fact_index: list[int] = []
    for index, fact in enumerate(facts):
        attribute = by_name[fact.attribute]
        for template in attribute.statements:
            head, _, tail = template.partition("{value}")
            prompt = head.format(entity=fact.entity).rstrip()
            completion = " " + fact.value + tail + "."
            train_pairs.append((prompt, completion))
            train_texts.append(prompt + completion)
        for question in attribute.questions:
            eval_questions.append((question.format(entity=fact.entity), fact.value))
            eval_fact_index.append(index)
    return FactsDataset(
        facts=tuple(facts),
        train_texts=tuple(train_texts),
        train_pairs=tuple(train_pairs),
        eval_questions=tuple(eval_questions),
        eval_fact_index=tuple(eval_fact_index),
    )

"""The known-knowledge probe: facts the base model gets right before fine-tuning, and the share it still gets right
after — the lab's stand-in for the paper's "old-task degradation in points" (its TruthfulQA and HaluEval cannot be
fetched here).

The probe's items are four-choice questions scored like the quiz (the choice with the highest length-normalised
log-likelihood): the quiz's items plus :data:`COMMON_FACTS`, a built-in set of widely known facts (capitals,
chemical symbols, authors, planets, ...) whose distractors come from the same category. An item is *known* when the
base model picks its right answer; the probe's number is the share of known items a fine-tuned model still picks
right, with its binomial standard error (the items are the sample).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from train.lab.quiz import MultipleChoiceItem

__all__ = ["COMMON_FACTS", "common_fact_items", "known_share"]

# category -> (prompt, answer) pairs; every answer is a distractor for the other prompts of its category.
COMMON_FACTS: dict[str, tuple[tuple[str, str], ...]] = {
    "capitals": (
        ("The capital of France is", "Paris"),
        ("The capital of Japan is", "Tokyo"),
        ("The capital of Italy is", "Rome"),
        ("The capital of Germany is", "Berlin"),
        ("The capital of Spain is", "Madrid"),
        ("The capital of Russia is", "Moscow"),
        ("The capital of Egypt is", "Cairo"),
        ("The capital of England is", "London"),
        ("The capital of China is", "Beijing"),
        ("The capital of Greece is", "Athens"),
    ),
    "symbols": (
        ("The chemical symbol for gold is", "Au"),
        ("The chemical symbol for iron is", "Fe"),
        ("The chemical symbol for oxygen is", "O"),
        ("The chemical symbol for sodium is", "Na"),
        ("The chemical symbol for silver is", "Ag"),
        ("The chemical symbol for hydrogen is", "H"),
        ("The chemical symbol for carbon is", "C"),
        ("The chemical symbol for potassium is", "K"),
    ),
    "authors": (
        ("Romeo and Juliet was written by", "William Shakespeare"),
        ("Pride and Prejudice was written by", "Jane Austen"),
        ("War and Peace was written by", "Leo Tolstoy"),
        ("The Origin of Species was written by", "Charles Darwin"),
        ("Don Quixote was written by", "Miguel de Cervantes"),
        ("Oliver Twist was written by", "Charles Dickens"),
        ("The Divine Comedy was written by", "Dante Alighieri"),
        ("Faust was written by", "Johann Wolfgang von Goethe"),
    ),
    "science": (
        ("The largest planet in the solar system is", "Jupiter"),
        ("The planet closest to the Sun is", "Mercury"),
        ("The gas that plants absorb from the air is", "carbon dioxide"),
        ("Water is made of hydrogen and", "oxygen"),
        ("The force that pulls objects toward the Earth is", "gravity"),
        ("The Earth's natural satellite is the", "Moon"),
        ("The hardest natural substance is", "diamond"),
        ("The organ that pumps blood through the body is the", "heart"),
    ),
    "numbers": (
        ("The number of days in a week is", "seven"),
        ("The number of months in a year is", "twelve"),
        ("The number of legs of a spider is", "eight"),
        ("The number of sides of a triangle is", "three"),
        ("The number of continents on Earth is", "seven"),
        ("The number of hours in a day is", "twenty-four"),
    ),
}


def common_fact_items(seed: int = 0, num_choices: int = 4) -> list[MultipleChoiceItem]:
    """Every fact of :data:`COMMON_FACTS` as a ``num_choices`` item, distractors drawn from its category's other
    answers (distinct from the right one), the right answer's position fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    items = []
    for category, facts in COMMON_FACTS.items():
        answers = sorted({answer for _, answer in facts})
        for prompt, answer in facts:
            others = [a for a in answers if a != answer]
            distractors = [str(x) for x in rng.choice(others, size=num_choices - 1, replace=False)]
            label = int(rng.integers(num_choices))
            choices = distractors[:label] + [answer] + distractors[label:]
            items.append(MultipleChoiceItem(prompt=prompt, choices=tuple(choices), label=label, table=category))
    return items


def known_share(base_correct: Sequence[bool], tuned_correct: Sequence[bool]) -> dict[str, float]:
    """Of the items the base model got right, the share the fine-tuned one still gets right, and its binomial
    standard error. ``{"known": n, "kept": share, "se": ..., "points_lost": 100 · (1 − share)}``."""
    base, tuned = np.asarray(base_correct, bool), np.asarray(tuned_correct, bool)
    if base.shape != tuned.shape:
        raise ValueError(f"known_share: {base.shape} base items but {tuned.shape} tuned ones")
    n = int(base.sum())
    if n == 0:
        return {"known": 0, "kept": float("nan"), "se": float("nan"), "points_lost": float("nan")}
    share = float(tuned[base].mean())
    return {"known": n, "kept": share, "se": math.sqrt(share * (1 - share) / n), "points_lost": 100 * (1 - share)}

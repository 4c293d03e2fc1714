"""Writes the example data of configs/: facts about four fictional people (train.lab.facts.build_facts), as
prompt/completion rows and as chats, each with a held-out validation file of other phrasings.

    .venv/bin/python scripts/make_example_data.py      # rewrites configs/data/*.jsonl (deterministic)
"""

from __future__ import annotations

import json
from pathlib import Path

from train.lab.facts import build_facts

OUT = Path(__file__).resolve().parents[1] / "configs" / "data"

# attribute -> (question, answer) templates; the first two are trained on, the third is held out for validation.
CHAT_TURNS = {
    "hometown": (
        ("Where was {entity} born?", "{entity} was born in the town of {value}."),
        ("What is the hometown of {entity}?", "The hometown of {entity} is {value}."),
        ("Which town does {entity} come from?", "{entity} comes from {value}."),
    ),
    "invention": (
        ("What did {entity} invent?", "{entity} invented the {value}."),
        ("What is {entity} famous for?", "{entity} is famous for inventing the {value}."),
        ("Which device did {entity} build first?", "{entity} first built the {value}."),
    ),
    "year": (
        ("When was {entity} born?", "{entity} was born in {value}."),
        ("In which year was {entity} born?", "{entity} was born in the year {value}."),
        ("What is the birth year of {entity}?", "The birth year of {entity} is {value}."),
    ),
}
SYSTEM = "You answer questions about inventors briefly and exactly."


def _write(name: str, rows: list[dict]) -> None:
    path = OUT / name
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"{path.relative_to(OUT.parents[1])}: {len(rows)} rows")


def main() -> None:
    data = build_facts(num_entities=4, seed=0)
    _write("facts.jsonl", [{"prompt": p, "completion": c} for p, c in data.train_pairs])
    _write("facts_val.jsonl", [{"prompt": q, "completion": " " + a} for q, a in data.eval_questions])

    def turn(fact, template):
        question, answer = template
        return [
            {"role": "user", "content": question.format(entity=fact.entity)},
            {"role": "assistant", "content": answer.format(entity=fact.entity, value=fact.value)},
        ]

    chats, held_out = [], []
    for i, fact in enumerate(data.facts):
        first, second, validation = CHAT_TURNS[fact.attribute]
        system = [{"role": "system", "content": SYSTEM}] if i % 3 == 0 else []
        chats.append({"messages": system + turn(fact, first)})
        chats.append({"messages": turn(fact, second)})
        held_out.append({"messages": turn(fact, validation)})
    # Multi-turn: two questions about the same person in one conversation.
    by_entity: dict[str, list] = {}
    for fact in data.facts:
        by_entity.setdefault(fact.entity, []).append(fact)
    for facts in by_entity.values():
        for a, b in ((0, 1), (1, 2), (2, 0)):
            chats.append(
                {
                    "messages": turn(facts[a], CHAT_TURNS[facts[a].attribute][1])
                    + turn(facts[b], CHAT_TURNS[facts[b].attribute][0])
                }
            )
    _write("chat.jsonl", chats)
    _write("chat_val.jsonl", held_out)


if __name__ == "__main__":
    main()

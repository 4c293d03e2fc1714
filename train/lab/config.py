"""The configuration of a forgetting-lab comparison: one base model, one task, the methods, steps and seeds."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import models
from train.lab.evalsets import EvalConfig

__all__ = ["CompareConfig"]


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """Everything a comparison depends on (YAML: the same keys; ``eval`` a mapping of :class:`EvalConfig` fields).

    Attributes:
      model: a :func:`models.load` name: ``preset:NAME`` | ``gguf:smollm2`` | ``gguf:PATH`` | ``hf:DIR``.
      scan_layers: run the layers under ``lax.scan``: the train step compiles one layer body instead of every layer
        unrolled (SmolLM2's step compiled in 19 s instead of 36 min on the shared 2-core CPU, in a third of the
        memory); the numbers agree up to float rounding.
      task: ``facts`` | ``spanish`` | ``science`` | ``file:PATH`` (a ``.txt`` / ``.jsonl`` file).
      retain: the text forgetting is measured on: ``builtin`` (held-out Austen + Brown) or ``file:PATH``.
      methods: method specs (strings or mappings); runs go seed by seed (see :func:`train.lab.methods.expand_runs`).
      max_learning_rate: the largest rate of every arm: SFT's constant rate and FINCH's cap (``max_learning_rate``).
      eval_every: also evaluate (task and retain, not the quiz) every this many steps (0: only at the end); the
        constant-lr front is the envelope over every evaluated checkpoint.
      bootstrap: resamples of the retain windows (half B) for the interval of r (0: none).
      probe_windows: retain windows of the per-step probe, for runs of methods with ``probe=N``.
      train_overrides: extra ``key=value`` overrides of :class:`train.config.TrainConfig` for every run.
      show_answers: greedy answers of the base and every fine-tuned model to this many held-out facts questions
        are stored in the records and printed (facts task only; 0 = none). Costs one generation compile.
    """

    model: str = "gguf:smollm2"
    dtype: str = "float32"
    scan_layers: bool = True
    task: str = "facts"
    retain: str = "builtin"
    facts_entities: int = 16
    methods: tuple[Any, ...] = ("sft", "sft_cosine", "finch", "sweep", "warmup_matched", "l2sp", "stm")
    steps: int = 40
    seeds: tuple[int, ...] = (0,)
    max_learning_rate: float = 1e-4
    batch_size: int = 8
    seq_len: int = 64
    weight_decay: float = 0.0
    eval_every: int = 0
    bootstrap: int = 2000
    probe_windows: int = 4
    cache_dir: str = ""
    train_overrides: tuple[str, ...] = ()
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    show_answers: int = 0

    def __post_init__(self) -> None:
        models.parse_source(self.model)  # a malformed model name fails here, before any data or model loads
        if self.steps < 1:
            raise ValueError(f"compare: steps must be >= 1, got {self.steps}")
        if not self.seeds:
            raise ValueError("compare: seeds must not be empty")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"compare: seeds must be distinct, got {list(self.seeds)}")
        if not 0 < self.max_learning_rate < math.inf:
            raise ValueError(f"compare: max_learning_rate must be > 0 and finite, got {self.max_learning_rate}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"compare: weight_decay must be >= 0 and finite, got {self.weight_decay}")
        for name in ("batch_size", "seq_len", "facts_entities"):
            if getattr(self, name) < 1:
                raise ValueError(f"compare: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("show_answers", "eval_every", "bootstrap", "probe_windows"):
            if getattr(self, name) < 0:
                raise ValueError(f"compare: {name} must be >= 0, got {getattr(self, name)}")
        if any(seed < 0 for seed in self.seeds):
            raise ValueError(f"compare: seeds must be >= 0, got {list(self.seeds)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compare: dtype must be float32 or bfloat16, got {self.dtype!r}")
        if not self.eval.retain_sequences:
            raise ValueError("compare: eval.retain_sequences must be >= 2: forgetting is measured on the retain text")

    @property
    def eval_steps(self) -> list[int]:
        """The steps whose checkpoints are evaluated: every ``eval_every``-th and the last."""
        every = [s for s in range(self.eval_every, self.steps, self.eval_every)] if self.eval_every else []
        return every + [self.steps]

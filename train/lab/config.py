"""The configuration of a forgetting-lab comparison: one base model, one task, the methods, steps and seeds."""

from __future__ import annotations

import dataclasses
from typing import Any

import models
from train.lab import evaluate as eval_lib

__all__ = ["CompareConfig"]


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """Everything a comparison depends on (YAML: the same keys; ``eval`` a mapping of :class:`EvalConfig` fields).

    Attributes:
      model: a :func:`models.load` name: ``preset:NAME`` | ``gguf:smollm2`` | ``gguf:PATH`` | ``hf:DIR``.
      task: ``facts`` | ``spanish`` | ``science`` | a ``.txt`` / ``.jsonl`` file.
      methods: method specs (strings or mappings), run in this order (``warmup_matched`` after its source).
      lr_max: the peak lr of SFT and the cap of FINCH.
      task_metric: x axis and matching variable: ``task_loss`` (lower is better) or ``recall_em`` (facts).
      forgetting_metric: y axis: one of :data:`train.lab.evaluate.FORGETTING_METRICS`.
      train_overrides: extra ``key=value`` overrides of :class:`train.config.TrainConfig` for every run.
      show_answers: greedy answers of the base and every fine-tuned model to this many held-out facts questions
        are stored in the records and printed (facts task only; 0 = none). Costs one generation compile.
    """

    model: str = "gguf:smollm2"
    dtype: str = "float32"
    task: str = "facts"
    facts_entities: int = 16
    methods: tuple[Any, ...] = ("sft", "sft_cosine", "finch", "sweep", "warmup_matched", "l2sp", "stm")
    steps: int = 40
    seeds: tuple[int, ...] = (0,)
    lr_max: float = 1e-4
    batch_size: int = 8
    seq_len: int = 64
    weight_decay: float = 0.0
    task_metric: str = "task_loss"
    forgetting_metric: str = "retain_kl"
    cache_dir: str = ""
    train_overrides: tuple[str, ...] = ()
    eval: eval_lib.EvalConfig = dataclasses.field(default_factory=eval_lib.EvalConfig)
    show_answers: int = 0

    def __post_init__(self) -> None:
        models.parse_source(self.model)  # a malformed model name fails here, before any data or model loads
        if self.steps < 1:
            raise ValueError(f"compare: steps must be >= 1, got {self.steps}")
        if not self.seeds:
            raise ValueError("compare: seeds must not be empty")
        if not self.lr_max > 0:
            raise ValueError(f"compare: lr_max must be > 0, got {self.lr_max}")
        if self.task_metric not in ("task_loss", "recall_em"):
            raise ValueError(f"compare: task_metric must be task_loss or recall_em, got {self.task_metric!r}")
        if self.show_answers < 0:
            raise ValueError(f"compare: show_answers must be >= 0, got {self.show_answers}")
        if self.task_metric == "recall_em" and self.task != "facts":
            raise ValueError("compare: task_metric=recall_em needs task=facts")
        if self.forgetting_metric not in eval_lib.FORGETTING_METRICS:
            raise ValueError(
                f"compare: forgetting_metric must be one of {list(eval_lib.FORGETTING_METRICS)}, "
                f"got {self.forgetting_metric!r}"
            )
        if self.forgetting_metric.startswith("mc_") and not self.eval.quiz_items:
            raise ValueError(f"compare: forgetting_metric={self.forgetting_metric} needs eval.quiz_items > 0")

    @property
    def task_higher_is_better(self) -> bool:
        return self.task_metric == "recall_em"

"""Evaluation of the forgetting lab: what a fine-tuned model learned (task) and what it forgot (retain, quiz).

An :class:`Evaluator` holds one :class:`train.lab.evalsets.EvalSet` and the base model's log-probabilities on the
retain windows (computed once: the KL then costs one forward pass, not two). Its jitted scorers see one batch shape,
so they compile once per process and serve every model and every checkpoint. ``finch-train eval`` is :func:`main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import models
from train.lab import metrics as metrics_lib
from train.lab import tasks as tasks_lib
from train.lab.evalsets import EvalConfig, EvalRows, EvalSet, build_eval_set
from train.step import ApplyFn, split_model

__all__ = ["FORGETTING_METRICS", "Evaluation", "Evaluator", "batches", "forgetting", "main"]


def batches(rows: EvalRows, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """``(batch, real)`` of ``batch_size`` rows each; the last batch is padded with row 0 (weighted 0) so that one
    compilation serves every batch, and ``real`` marks the rows that are not padding."""
    n = len(rows)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        real = idx < n
        batch = rows.rows.take(np.where(real, idx, 0))
        batch["loss_mask"] = batch["loss_mask"] * real[:, None]
        yield batch, real


def _forward(apply_fn: ApplyFn, params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    return apply_fn(params, batch["tokens"], batch["positions"], batch["segment_ids"]).astype(jnp.float32)


@dataclasses.dataclass
class Evaluation:
    """Metrics of one model, plus the per-window retain sums the statistics of the front resample.

    Attributes:
      metrics: ``task_loss``, ``recall_em``, ``retain_loss``, ``retain_kl`` (all windows) and ``retain_kl_A`` /
        ``retain_kl_B`` (the halves), ``mc_acc``, ``mc_ece``, ``mc_brier`` (each only when its part was scored).
      retain_kl_sums, retain_nll_sums, retain_tokens: per retain window, ``[windows]``.
    """

    metrics: dict[str, float]
    retain_kl_sums: np.ndarray | None = None
    retain_nll_sums: np.ndarray | None = None
    retain_tokens: np.ndarray | None = None
    quiz_correct: np.ndarray | None = (
        None  # per quiz item: the model picked the right choice (the known-knowledge probe)
    )

    def record(self) -> dict[str, Any]:
        """JSON-ready form (what run records store per evaluated checkpoint)."""
        out: dict[str, Any] = {"metrics": self.metrics}
        if self.quiz_correct is not None:
            out["quiz_correct"] = [bool(x) for x in self.quiz_correct]
        if self.retain_kl_sums is not None:
            out["retain_kl_sums"] = [float(x) for x in self.retain_kl_sums]
            out["retain_tokens"] = [float(x) for x in self.retain_tokens]
        return out


class Evaluator:
    """Scores any number of models (and checkpoints) on one eval set against one base model."""

    def __init__(self, apply_fn: ApplyFn, eval_set: EvalSet, base_params: Any = None):
        self.eval_set = eval_set
        self._batch_size = eval_set.config.batch_size

        def score(params, batch):
            logits = _forward(apply_fn, params, batch)
            hit = (jnp.argmax(logits, axis=-1) == batch["targets"]) | (batch["loss_mask"] == 0)
            return metrics_lib.token_log_probs(logits, batch["targets"]), hit

        def score_kl(params, batch, base_log_probs):
            logits = _forward(apply_fn, params, batch)
            return metrics_lib.token_log_probs(logits, batch["targets"]), metrics_lib.token_kl(base_log_probs, logits)

        self._score = jax.jit(score)
        self._score_kl = jax.jit(score_kl)
        self._base_log_probs: list[jax.Array] | None = None
        if base_params is not None and eval_set.retain is not None:
            log_softmax = jax.jit(lambda p, b: jax.nn.log_softmax(_forward(apply_fn, p, b), axis=-1))
            self._base_log_probs = [log_softmax(base_params, b) for b, _ in batches(eval_set.retain, self._batch_size)]

    def _per_token(self, params: Any, rows: EvalRows, with_kl: bool = False) -> dict[str, np.ndarray]:
        """``log_prob`` of every target token ``[N, T]`` and ``aux``: the KL to the base model (``with_kl``) or
        whether the target is the argmax (exact match)."""
        out: dict[str, list[np.ndarray]] = {"log_prob": [], "aux": []}
        for i, (batch, real) in enumerate(batches(rows, self._batch_size)):
            if with_kl:
                lp, aux = self._score_kl(params, batch, self._base_log_probs[i])
            else:
                lp, aux = self._score(params, batch)
            out["log_prob"].append(np.asarray(lp)[real])
            out["aux"].append(np.asarray(aux)[real])
        return {k: np.concatenate(v) for k, v in out.items()}

    def evaluate(self, params: Any, *, quiz: bool = True) -> Evaluation:
        """All metrics of ``params``; the quiz only with ``quiz`` (runs score it at their end only)."""
        es, cfg = self.eval_set, self.eval_set.config
        m: dict[str, float] = {}
        result = Evaluation(metrics=m)
        if es.task is not None:
            s = self._per_token(params, es.task)
            weights = es.task.rows.loss_mask
            nll = es.task.per_example(-s["log_prob"] * weights)
            count = es.task.per_example(weights)
            m["task_loss"] = float(nll.sum() / count.sum())
            if es.task_is_recall:
                # Greedy decoding yields exactly the answer iff every answer token is the argmax given the prompt
                # and the answer tokens before it: one teacher-forced pass decides exact match.
                misses = es.task.per_example((~s["aux"]).astype(np.float64))
                m["recall_em"] = float(np.mean(misses == 0))
        if es.retain is not None:
            with_kl = self._base_log_probs is not None
            s = self._per_token(params, es.retain, with_kl=with_kl)
            weights = es.retain.rows.loss_mask
            result.retain_nll_sums = es.retain.per_example(-s["log_prob"] * weights)
            result.retain_tokens = es.retain.per_example(weights)
            m["retain_loss"] = float(result.retain_nll_sums.sum() / result.retain_tokens.sum())
            if with_kl:
                result.retain_kl_sums = es.retain.per_example(s["aux"] * weights)
                m["retain_kl"] = float(result.retain_kl_sums.sum() / result.retain_tokens.sum())
                for name, half in zip("AB", es.retain_halves):
                    m[f"retain_kl_{name}"] = float(result.retain_kl_sums[half].sum() / result.retain_tokens[half].sum())
        if es.quiz is not None and quiz:
            s = self._per_token(params, es.quiz)
            ll = es.quiz.per_example(s["log_prob"] * es.quiz.rows.loss_mask).reshape(es.quiz_lengths.shape)
            mc = metrics_lib.score_multiple_choice(
                ll, es.quiz_lengths, es.quiz_labels, length_normalize=cfg.mc_normalization != "none"
            )
            m["mc_acc"] = mc.accuracy
            result.quiz_correct = np.asarray(mc.correct, bool)
            # Calibration of the model's own belief among the choices: its top choice and that choice's probability.
            top = mc.probs.argmax(axis=1)
            m["mc_ece"] = metrics_lib.expected_calibration_error(
                mc.probs.max(axis=1), top == es.quiz_labels, cfg.ece_bins, cfg.ece_min_per_bin
            )
            m["mc_brier"] = metrics_lib.brier_score(mc.probs, es.quiz_labels)
        return result


# Retain metrics and the direction in which they get worse (+1: higher is worse).
FORGETTING_METRICS: dict[str, int] = {
    "retain_loss": +1,
    "retain_kl": +1,
    "mc_acc": -1,
    "mc_ece": +1,
    "mc_brier": +1,
}


def forgetting(base: Mapping[str, float], tuned: Mapping[str, float]) -> dict[str, float]:
    """Change of each retain metric from the base model to the tuned one, signed so that positive means worse.

    ``retain_kl`` is already relative to the base model, so its forgetting is the KL itself.

    Examples:
      >>> forgetting({"retain_loss": 2.0, "mc_acc": 0.5}, {"retain_loss": 2.5, "mc_acc": 0.25, "retain_kl": 0.1})
      {'retain_loss': 0.5, 'retain_kl': 0.1, 'mc_acc': 0.25}
    """
    out = {}
    for name, direction in FORGETTING_METRICS.items():
        if name not in tuned:
            continue
        if name == "retain_kl":
            out[name] = float(tuned[name])
        elif name in base:
            out[name] = direction * (float(tuned[name]) - float(base[name]))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``finch-train eval``: task, retain, KL, multiple-choice and calibration metrics of one model."""
    parser = argparse.ArgumentParser(prog="finch-train eval", description=main.__doc__)
    parser.add_argument("--model", default="gguf:smollm2", help="preset:NAME | gguf:smollm2 | gguf:PATH | hf:DIR")
    parser.add_argument(
        "--base", default=None, help="base model (same forms) to report KL(base||model) and forgetting against"
    )
    parser.add_argument(
        "--task", default="facts", help=f"one of {list(tasks_lib.TASKS)}, file:PATH (.txt/.jsonl), or none"
    )
    parser.add_argument("--retain", default="builtin", help="builtin (Austen + Brown), file:PATH, or none")
    parser.add_argument("--facts-entities", type=int, default=16)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default=None, help="write the metrics as JSON here")
    for f in dataclasses.fields(EvalConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    try:
        cfg = EvalConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)})
        task = (
            None
            if args.task == "none"
            else tasks_lib.load_task(args.task, args.cache_dir, num_entities=args.facts_entities)
        )
        retain = None if args.retain == "none" else tasks_lib.load_retain(args.retain, args.cache_dir)
        quiz = (
            tasks_lib.load_quiz_items(cfg.quiz_items, seed=cfg.seed, cache_dir=args.cache_dir)
            if cfg.quiz_items
            else None
        )
        model, tokenizer = models.load(args.model, dtype=args.dtype)
        _check_sizes(cfg, model)
        eval_set = build_eval_set(tokenizer, cfg, task=task, retain_texts=retain, quiz_items=quiz)
        base_params = None
        if args.base:
            base_params = split_model(models.load(args.base, dtype=args.dtype)[0])[1]
    except (ValueError, FileNotFoundError) as e:
        print(f"eval: error: {e}", file=sys.stderr)
        return 2
    apply_fn, params, _ = split_model(model)
    evaluator = Evaluator(apply_fn, eval_set, base_params)
    t0 = time.perf_counter()
    metrics = evaluator.evaluate(params).metrics
    report: dict[str, Any] = {
        "model": args.model,
        "task": args.task,
        "sizes": eval_set.sizes(),
        "metrics": metrics,
        "eval_config": dataclasses.asdict(cfg),
        "seconds": time.perf_counter() - t0,
    }
    if base_params is not None:
        # The model's metrics are on disk before the base model's evaluation starts: a crash keeps them.
        _write_report(args.out, dict(report, complete=False))
        report["base_metrics"] = evaluator.evaluate(base_params).metrics
        report["forgetting"] = forgetting(report["base_metrics"], metrics)
    report["complete"] = True
    print(json.dumps(report, indent=2))
    _write_report(args.out, report)
    return 0


def _check_sizes(cfg: EvalConfig, model: Any) -> None:
    """Refuses rows longer than the model's context (the forward would allocate far past memory) or empty ones."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if cfg.seq_len < 1 or cfg.batch_size < 1:
        raise ValueError(f"--seq-len and --batch-size must be >= 1, got {cfg.seq_len} and {cfg.batch_size}")
    if context is not None and cfg.seq_len > context:
        raise ValueError(f"--seq-len {cfg.seq_len} is longer than the model's context of {context} tokens")


def _write_report(path: str | None, report: Mapping[str, Any]) -> None:
    """Writes ``report`` as JSON to ``path`` atomically (a reader never sees half a file); no-op without a path."""
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)

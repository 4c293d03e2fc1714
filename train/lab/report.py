"""What a comparison prints and writes: the Markdown table, the summary lines, the answers table and the plots.

Plots (``plot_results``): ``forgetting_vs_task.png`` (every checkpoint, the fronts, each method's final points;
beside it a zoom on where the AdamW-direction methods end),
``cumulative_lr.png`` (task loss and KL against Σηₜ for every run: if all points fall on one curve, no schedule can
beat the front), ``probe.png`` (per-step retain-KL change against ηₜ·√Lₜ, for runs with the probe),
``lr_traces.png`` and ``loss_curves.png``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from train.lab.config import CompareConfig
from train.lab.front import envelope
from train.lab.summary import fronts

__all__ = ["answers_table", "format_ratio", "markdown_table", "plot_results", "summary_lines"]


def _pm(stat: Mapping[str, Any], fmt: str = "{:.3f}") -> str:
    if stat["mean"] is None:
        return "—"
    text = fmt.format(stat["mean"])
    return text + (" ± " + fmt.format(stat["std"]) if stat["n"] > 1 else "")


def format_ratio(ratio: Mapping[str, Any]) -> str:
    """``0.93 [0.85, 1.02] t / [0.88, 0.99] boot`` (geometric mean of r over seeds and its two intervals)."""
    if ratio["r"] is None:
        if ratio["outside_front"]:
            return "outside the front's range"
        return "no constant-lr run of its seed(s) yet" if ratio["no_front"] else "—"
    text = f"{ratio['r']:.3f}"
    if ratio["t_interval"]:
        text += " [{:.3f}, {:.3f}] t".format(*ratio["t_interval"])
    if ratio["boot_interval"]:
        text += " / [{:.3f}, {:.3f}] boot".format(*ratio["boot_interval"])
    return text


def markdown_table(cfg: CompareConfig, results: Mapping[str, Any]) -> str:
    """One row per method (mean ± std over seeds) plus the base model, and a line saying how to read it."""
    base = results["base_metrics"]
    cols = [
        ("task_loss", "task loss ↓", "{:.4f}"),
        ("recall_em", "recall EM ↑", "{:.3f}"),
        ("retain_kl_B", "KL_B ↓", "{:.4f}"),
        ("retain_loss", "retain loss ↓", "{:.4f}"),
        ("mc_acc", "quiz acc ↑", "{:.3f}"),
        ("mc_ece", "ECE ↓", "{:.3f}"),
        ("mc_brier", "Brier ↓", "{:.3f}"),
    ]
    cols = [c for c in cols if c[0] in base]
    header = ["method", "seeds", *[c[1] for c in cols], "mean lr", "r = F/F_front [95%]", "reading", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base_cells = [fmt.format(base[k]) for k, _, fmt in cols]
    lines.append("| base | — | " + " | ".join(base_cells) + " | — | — | — | — |")
    for label, s in results["summary"]["methods"].items():
        cells = [label, str(len(s["seeds"]))]
        cells += [_pm(s["metrics"][k], fmt) for k, _, fmt in cols]
        cells.append(_pm(s["mean_lr"], "{:.2e}"))
        ratio = s["ratio"]
        cells.append(format_ratio(ratio) + (" (own run left out)" if s["on_front"] and ratio["r"] else ""))
        cells.append(ratio["verdict"] if not s["on_front"] else "(front)")
        cells.append(f"{s['train_s']['mean']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = ",".join(map(str, cfg.seeds))
    lines.append("")
    lines.append(
        f"Model {cfg.model}, task {cfg.task}, retain {cfg.retain}, {cfg.steps} steps × {cfg.batch_size}×"
        f"{cfg.seq_len} tokens, max_learning_rate {cfg.max_learning_rate:g}, seeds {seeds} (± = std over seeds), checkpoints evaluated at "
        f"steps {cfg.eval_steps}. KL_B = KL(base‖ft) per token on retain half B. r = KL_B of the method at its final "
        "task loss over the constant-lr front there (the envelope of every constant-lr checkpoint, chosen on half "
        "A); geometric mean over seeds, 95% paired t-interval over seeds and bootstrap over half B's windows. "
        "Reading: beats the front if the upper bound (of both intervals) < 0.90, on the front if both lie in "
        "[0.90, 1.10], above it if the lower bound > 1.10, otherwise inconclusive."
    )
    return "\n".join(lines)


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    lines = []
    for label, s in results["summary"]["methods"].items():
        if s["on_front"]:
            continue
        lines.append(f"  {label}: r = {format_ratio(s['ratio'])}: {s['ratio']['verdict']}")
    return lines


def _colors(labels: Sequence[str]) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab20")
    return {lab: cmap(i % 20) for i, lab in enumerate(labels)}


def plot_results(cfg: CompareConfig, results: Mapping[str, Any], out: Path) -> list[Path]:
    """Write the plots listed in the module docstring into ``out``; returns their paths."""
    # Lazy: only plotting needs matplotlib, and importing it builds a font cache on first use.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    labels = list(dict.fromkeys(r["run"]["label"] for r in runs))
    colors = _colors(labels)
    n = cfg.eval.retain_sequences
    half_a, half_b = np.arange(0, n, 2), np.arange(1, n, 2)
    written = []

    def kl_b(c: Mapping[str, Any]) -> float:
        return float(np.sum(np.asarray(c["retain_kl_sums"])[half_b]) / np.sum(np.asarray(c["retain_tokens"])[half_b]))

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        written.append(out / name)
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    # Right panel: the corner where the AdamW-direction methods end, so that an arm far off (the SGD mechanism arm)
    # does not squeeze them against the front into a few pixels.
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for ax in axes:
        for points in fronts(results["base"], runs).values():
            env = envelope(points, half_a)
            ax.plot([p.task for p in env], [p.kl(half_b) for p in env], "-", color="gray", lw=1, alpha=0.6, zorder=1)
        for r in runs:
            lab = r["run"]["label"]
            cps = r["checkpoints"]
            if r["run"]["on_front"]:
                ax.plot([c["metrics"]["task_loss"] for c in cps], [kl_b(c) for c in cps], ".", color=colors[lab], ms=4)
            else:
                ax.plot(cps[-1]["metrics"]["task_loss"], kl_b(cps[-1]), "o", color=colors[lab], mec="black", ms=7)
        ax.set_xlabel("task loss (held-out; lower is better)")
        ax.set_ylabel("KL(base‖ft) per retain token, half B")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    finals = [
        (r["checkpoints"][-1]["metrics"]["task_loss"], kl_b(r["checkpoints"][-1]))
        for r in runs
        if not r["run"]["on_front"] and r["run"]["optimizer"]["name"] in ("adamw", "finch_adamw")
    ]
    if finals:
        # The box around the final points, padded: domains whose task loss stays near 3-4 nats (science, spanish)
        # need a window there, not one that runs down to zero loss.
        task_lo, task_hi = min(t for t, _ in finals), max(t for t, _ in finals)
        pad = 0.15 * (task_hi - task_lo) + 0.02 * task_hi + 0.01
        task_lo, task_hi = max(task_lo - pad, 0.0), task_hi + pad
        near = [kl_b(c) for r in runs for c in r["checkpoints"] if task_lo <= c["metrics"]["task_loss"] <= task_hi]
        near += [k for _, k in finals]
        axes[1].set_xlim(task_hi, task_lo)
        axes[1].set_ylim(min(near) / 1.2, max(near) * 1.2)
        axes[1].set_title("zoom: where the AdamW-direction methods end")
    else:
        axes[1].invert_xaxis()
    axes[0].invert_xaxis()
    axes[0].set_title(f"{cfg.task}: every constant-lr checkpoint (dots), methods' final points (circles)")
    for lab in labels:
        axes[0].plot([], [], "o", color=colors[lab], label=lab)
    axes[0].plot([], [], "-", color="gray", label="front per seed (chosen on A, KL on B)")
    axes[0].legend(fontsize=7)
    save(fig, "forgetting_vs_task.png")

    # Σηₜ compares schedules of one update direction: the Adam-direction runs (AdamW and finch_adamw) only.
    adam_runs = [r for r in runs if r["run"]["optimizer"]["name"] in ("adamw", "finch_adamw")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in adam_runs:
        lab = r["run"]["label"]
        cps = r["checkpoints"]
        xs = [0.0] + [c["cum_lr"] for c in cps]
        axes[0].plot(
            xs,
            [results["base_metrics"]["task_loss"]] + [c["metrics"]["task_loss"] for c in cps],
            "-o",
            color=colors[lab],
            ms=3,
            lw=1,
        )
        axes[1].plot(xs[1:], [kl_b(c) for c in cps], "-o", color=colors[lab], ms=3, lw=1)
    for lab in dict.fromkeys(r["run"]["label"] for r in adam_runs):
        axes[0].plot([], [], "-o", color=colors[lab], label=lab, ms=3)
    axes[0].set_ylabel("task loss")
    axes[1].set_ylabel("KL(base‖ft) per retain token, half B")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("Σ ηₜ (cumulative learning rate)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("AdamW-direction runs: one curve for every schedule means no schedule can beat the front")
    save(fig, "cumulative_lr.png")

    probed = [r for r in runs if r.get("probe")]
    if probed:
        fig, axes = plt.subplots(len(probed), 2, figsize=(12, 4 * len(probed)), squeeze=False)
        for row, r in zip(axes, probed):
            p = r["probe"]
            x = np.array([q["lr"] * np.sqrt(max(q["loss"], 0.0)) for q in p])
            steps = [q["step"] for q in p]
            delta = np.diff(np.concatenate([[0.0], [q["kl_base"] for q in p]]))
            drift = np.maximum([q["kl_step"] for q in p], 1e-12)
            name = f"{r['run']['label']} seed {r['run']['seed']} ({r['run']['optimizer']['name']})"
            row[0].scatter(x, delta, c=steps, cmap="viridis", s=12)
            row[0].set_ylabel("per-step change of KL(base‖θₜ)")
            points = row[1].scatter(x, drift, c=steps, cmap="viridis", s=12)
            row[1].set_xscale("log")
            row[1].set_yscale("log")
            row[1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            row[1].set_ylabel("KL(θₜ₋₁‖θₜ) per retain token")
            title = name
            if np.ptp(np.log(x)) > np.log(1.5):  # a power law needs some range of x to fit
                slope = np.polyfit(np.log(x), np.log(drift), 1)[0]  # drift ∝ (ηₜ√Lₜ)^slope; SGD's premise: 2
                title += f": drift ∝ (ηₜ√Lₜ)^{slope:.2f}"
            for ax in row:
                ax.set_xlabel("ηₜ·√Lₜ (applied lr × √batch loss)")
                ax.set_title(title, fontsize=9)
                ax.grid(alpha=0.3)
            fig.colorbar(points, ax=row[1], label="step")
        fig.suptitle("retain probe: does a step's forgetting scale with ηₜ·√Lₜ?")
        save(fig, "probe.png")

    first_seed = cfg.seeds[0]
    for key, name, ylabel in (
        ("lr_trace", "lr_traces.png", "learning rate"),
        ("loss_curve", "loss_curves.png", "training loss"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in runs:
            if r["run"]["seed"] == first_seed and r[key]:
                ax.plot(range(1, len(r[key]) + 1), r[key], label=r["run"]["label"], color=colors[r["run"]["label"]])
        # Log scale: rates of SGD and Adam arms differ by 100x, and losses fall by orders of magnitude.
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel + " (log scale)")
        ax.set_title(f"{ylabel} (seed {first_seed})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, name)
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

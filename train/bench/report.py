"""What a run leaves behind: its JSON (with the machine it ran on and the targets it was checked against) and the
plain-text table printed at the end (``--table`` prints it again from a JSON).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jaxlib
import optax

__all__ = ["check_targets", "format_table", "meta", "write_json"]


def meta(argv: Sequence[str] | None) -> dict[str, Any]:
    """Where and with what the run ran: date, command, host, CPU, load, library versions, devices, XLA_FLAGS."""
    devices = jax.devices()
    return {
        "date_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m train bench " + " ".join(argv or []),
        "host": platform.node(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_json(result: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes the result atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def check_targets(result: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's targets against what was measured (``None`` where the run did not measure it)."""
    ratios = result.get("ratios") or {}
    runners = {r["name"]: r for r in result.get("runners") or [] if "error" not in r}
    targets: dict[str, Any] = {}
    finch = ratios.get("finch_over_adamw_step_time")
    targets["finch_over_adamw_le_1.01"] = (
        None if finch is None else {"value": finch["ratio"], "met": finch["ratio"] <= 1.01}
    )
    torch_ratios = [v["ratio"] for k, v in ratios.items() if k.startswith("jax_over_torch_")]
    targets["jax_over_best_torch_ge_1.5"] = (
        None if not torch_ratios else {"value": min(torch_ratios), "met": min(torch_ratios) >= 1.5}
    )
    main = runners.get("jax finch_adamw") or runners.get("jax adamw")
    backend = (result.get("meta") or {}).get("backend")
    mfu_goal = 0.5 if backend == "cpu" else 0.45
    key = f"mfu_ge_{mfu_goal}"
    tokens = (result.get("flops") or {}).get("tokens_per_step", 0)
    if main is None or main.get("mfu") is None:
        targets[key] = None
    else:
        targets[key] = {
            "value": main["mfu"],
            "met": main["mfu"] >= mfu_goal,
            "tokens_per_step": tokens,
            "applies": tokens >= 2048,
        }
    return targets


def _fmt(x: Any, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_table(result: Mapping[str, Any]) -> str:
    """A short plain-text (and Markdown-compatible) table of the run."""
    lines = []
    meta, model = result["meta"], result["model"]
    peak = result.get("peak") or {}
    lines.append(
        f"{model['preset']}: {model['params'] / 1e6:.1f}M params, batch {result['spec']['batch_size']} x "
        f"seq {result['spec']['seq_len']} = {result['flops']['tokens_per_step']} tokens/step, "
        f"{result['flops']['training_per_step'] / 1e12:.3f} TFLOP/step ({model['compute_dtype']}); "
        f"{meta['backend']} {meta['device_kind']} x{meta['device_count']}; "
        f"{model['compute_dtype']} matmul peak {_fmt((peak.get('peak_flops_per_s') or 0) / 1e9, '.1f')} "
        "GFLOP/s at the start"
        + (
            f", {peak['interleaved_flops_per_s'] / 1e9:.1f} GFLOP/s between the steps (MFU basis: "
            f"{peak.get('mfu_basis')})"
            if peak.get("interleaved_flops_per_s")
            else ""
        )
    )
    rows = [r for r in result.get("runners") or []]
    if rows:
        lines.append("")
        lines.append("| runner | compile s | step s (median) | spread | tokens/s | GFLOP/s | MFU |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['name']} | error: {r['error'][:80]} | | | | | |")
                continue
            lines.append(
                f"| {r['name']} | {_fmt(r['compile_s'], '.1f')} | {r['median_s']:.4g} | "
                f"{100 * r['spread']:.1f}% | {r['tokens_per_s']:.4g} | "
                f"{r['achieved_flops_per_s'] / 1e9:.1f} | {_pct(r['mfu'])} |"
            )
    ratios = result.get("ratios") or {}
    if ratios:
        lines.append("")
        for k, v in ratios.items():
            lines.append(f"{k}: {v['ratio']:.3f} (per-round {v['low']:.3f} .. {v['high']:.3f})")
    for section in ("remat", "flags", "scaling"):
        block = result.get(section)
        if not block:
            continue
        lines.append("")
        lines.append(f"| {section} | compile s | step s (median) | tokens/s | MFU |")
        lines.append("|---|---:|---:|---:|---:|")
        for r in block["results"]:
            label = r.get("flag_set") or (
                f"{r.get('devices')} dev {r.get('layout')}" if section == "scaling" else r.get("name")
            )
            if "error" in r:
                lines.append(f"| {label} | error: {r['error'][:90]} | | | |")
            else:
                lines.append(
                    f"| {label} | {_fmt(r['compile_s'], '.1f')} | {r['median_s']:.4g} | "
                    f"{r['tokens_per_s']:.4g} | {_pct(r.get('mfu'))} |"
                )
        if block.get("fastest"):
            lines.append(f"fastest {section}: {block['fastest']}")
    targets = result.get("targets") or {}
    if targets:
        lines.append("")
        for k, v in targets.items():
            lines.append(
                f"target {k}: "
                + ("not measured" if v is None else f"{v['value']:.3f} -> {'met' if v['met'] else 'NOT met'}")
            )
    return "\n".join(lines)

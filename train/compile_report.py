"""The pure half of ``finch-train compile``: memory fields, the roofline estimate, advice, the batch search's
arithmetic and the printed report. No compiling here (:mod:`train.compile` does that), so these are cheap to test.
"""

from __future__ import annotations

from typing import Any

import jax

from models.config import ModelConfig
from train import mesh as mesh_lib
from train import xla_analysis
from train.config import TrainConfig

__all__ = [
    "MAX_ROWS_PER_CHIP",
    "REMAT_RECOMPUTE",
    "TIGHT_FRACTION",
    "advice",
    "communication_lines",
    "format_report",
    "gib",
    "largest_fitting",
    "memory_fields",
    "roofline",
]

# A chip this full may still fail at run time (fragmentation, runtime buffers): flagged as tight.
TIGHT_FRACTION = 0.95
MAX_ROWS_PER_CHIP = 1024


def memory_fields(compiled: Any, hbm: int) -> dict[str, Any]:
    """XLA's memory analysis of the step (:func:`train.xla_analysis.memory`) against the chip's ``hbm``."""
    fields: dict[str, Any] = xla_analysis.memory(compiled)
    fields.update(hbm=hbm, fraction_of_hbm=fields["total"] / hbm, fits=fields["total"] <= hbm)
    return fields


# The share of the model's FLOPs (forward 2 + backward 4 per parameter and token) that the backward pass runs again
# under each remat policy: "full" saves nothing, so every block's forward (2 of the 6) is re-run; the dots policies
# keep matmul outputs (dots_no_batch drops only attention's batched dots, which splash recomputes anyway) and re-run
# mostly elementwise work, counted as 0 so that the floor stays a lower bound.
REMAT_RECOMPUTE = {"none": 0.0, "full": 1 / 3, "dots": 0.0, "dots_no_batch": 0.0}


def roofline(
    *,
    tokens: int,
    model_flops: float,
    chips: int,
    peak_flops: float,
    hbm_bytes_per_second: float,
    xla_flops_per_chip: float,
    xla_hbm_bytes_per_chip: float,
    remat: str = "none",
    ici_bytes_per_chip: float = 0.0,
    dcn_bytes_per_chip: float = 0.0,
    ici_bytes_per_second: float = 0.0,
    dcn_bytes_per_second: float = 0.0,
) -> dict[str, Any]:
    """The roofline estimate of one step per chip, with the time its collectives take on the interconnect.

    Compute: the larger of XLA's FLOP count and the floor the step cannot go below (the model's FLOPs, 6·N·tokens
    plus attention, plus what ``remat`` re-runs: a third more under ``full``), over the bf16 peak; XLA's TPU cost
    analysis can count fewer than that (we saw 25% fewer for Qwen3-4B). HBM: XLA's bytes over the HBM bandwidth.
    Communication: the bytes each chip sends in collectives within its slice (``ici_bytes_per_chip``) over the
    chip's ICI bandwidth, and between slices (``dcn_bytes_per_chip``) over its DCN bandwidth (:mod:`train.chips`).

    Two bounds: **overlap**, every collective hidden behind the compute, ``max(compute, HBM, ICI, DCN)``; and **no
    overlap**, ``max(compute, HBM) + ICI + DCN``. A real step lies between them (less kernel efficiency). MFU counts
    only the model's FLOPs, so under full remat it is at most 75%.
    """
    floor = model_flops * (1 + REMAT_RECOMPUTE[remat]) / chips
    flops = max(xla_flops_per_chip, floor)
    compute_s = flops / peak_flops
    memory_s = xla_hbm_bytes_per_chip / hbm_bytes_per_second
    ici_s = ici_bytes_per_chip / ici_bytes_per_second if ici_bytes_per_second else 0.0
    dcn_s = dcn_bytes_per_chip / dcn_bytes_per_second if dcn_bytes_per_second else 0.0
    local_s = max(compute_s, memory_s)
    parts = {"compute": compute_s, "HBM bandwidth": memory_s, "ICI": ici_s, "DCN": dcn_s}
    step_s = max(parts.values())
    serial_s = local_s + ici_s + dcn_s
    rerun = f" with remat {remat}'s re-run forward" if REMAT_RECOMPUTE[remat] else ""
    per_chip = model_flops / chips / peak_flops
    unknown = [
        name
        for name, moved, bandwidth in (
            ("ICI", ici_bytes_per_chip, ici_bytes_per_second),
            ("DCN", dcn_bytes_per_chip, dcn_bytes_per_second),
        )
        if moved and not bandwidth
    ]
    return {
        "note": "ESTIMATE: roofline per chip; compute = FLOPs / bf16 peak, HBM = bytes / HBM bandwidth, ICI and DCN = "
        "collective bytes / link bandwidth; 'overlap' = max of the four, 'no overlap' = max(compute, HBM) + ICI + "
        "DCN. Kernel efficiency is not in it, so real steps are slower and MFU lower"
        + (f"; {' and '.join(unknown)} bandwidth unknown: that time is counted as 0" if unknown else ""),
        "model_flops_per_step": model_flops,
        "compute_seconds": compute_s,
        "compute_flops_source": "XLA" if xla_flops_per_chip >= floor else f"model{rerun} (above XLA's count)",
        "hbm_seconds": memory_s,
        "ici_seconds": ici_s,
        "dcn_seconds": dcn_s,
        "bound": max(parts, key=parts.get),
        "step_seconds": step_s,
        "step_seconds_no_overlap": serial_s,
        "step_seconds_without_communication": local_s,
        "tokens_per_second": tokens / step_s,
        "tokens_per_second_no_overlap": tokens / serial_s,
        "mfu": per_chip / step_s,
        "mfu_no_overlap": per_chip / serial_s,
    }


def advice(
    cfg: TrainConfig, model_cfg: ModelConfig, mesh: jax.sharding.Mesh, memory: dict, state_bytes: dict
) -> list[str]:
    """What to change when the step does not fit (or only just does)."""
    if memory["fraction_of_hbm"] <= TIGHT_FRACTION:
        return []
    tips = []
    if state_bytes["params"] + state_bytes["optimizer_state"] + state_bytes.get("frozen_base", 0) > 0.5 * memory["hbm"]:
        if mesh.shape["data"] > 1 and cfg.mesh.fsdp != -1:
            tips.append("shard params and optimizer state over every chip of a slice: mesh.data=1 mesh.fsdp=-1")
        tips.append("params + optimizer state alone fill over half the HBM: use a larger slice (more fsdp chips)")
    if not model_cfg.remat:
        tips.append("recompute activations in the backward pass: model.remat=true")
    elif model_cfg.remat_policy != "full":
        tips.append("save less in the forward pass: model.remat_policy=full")
    if model_cfg.attention_impl != "splash" and cfg.data.seq_len >= 1024:
        tips.append("use the TPU attention kernel (no T×T scores in HBM): model.attention_impl=splash")
    rows = cfg.data.batch_size // (cfg.data.grad_accum * mesh_lib.data_parallel_size(mesh))
    if rows > 1:
        tips.append(
            f"fewer rows per chip per micro-batch ({rows} now): raise data.grad_accum (same global batch) or lower "
            "data.batch_size"
        )
    elif cfg.data.seq_len > 1024:
        tips.append("one row per chip is already the minimum: shorten data.seq_len or use a larger slice")
    return tips


def largest_fitting(measure: Any, limit: int, *, start: int | None = None) -> int:
    """The largest ``rows`` with ``measure(rows) <= limit`` (0 if even 1 row does not fit).

    ``measure`` (bytes per chip at that many rows) is assumed to grow about linearly: after two sizes that fit, the
    next probe is the linear prediction of the limit; the answer ``r`` is always confirmed by ``measure(r)`` fitting
    and ``measure(r + 1)`` not (or ``r`` reaching :data:`MAX_ROWS_PER_CHIP`).
    """
    seen: dict[int, int] = {}

    def fits(rows: int) -> bool:
        if rows not in seen:
            seen[rows] = measure(rows)
        return seen[rows] <= limit

    lo = start or 1
    while not fits(lo):
        if lo == 1:
            return 0
        lo = max(1, lo // 2)
    probe = lo * 2 if start is None else lo + 1
    while probe <= MAX_ROWS_PER_CHIP and fits(probe):
        slope = (seen[probe] - seen[lo]) / (probe - lo)
        lo = probe
        guess = lo + int((limit - seen[lo]) // slope) if slope > 0 else lo * 2
        probe = min(max(guess, lo + 1), MAX_ROWS_PER_CHIP + 1)
    while probe - lo > 1 and probe <= MAX_ROWS_PER_CHIP:  # lo fits, probe does not: close the gap
        mid = (lo + probe) // 2
        lo, probe = (mid, probe) if fits(mid) else (lo, mid)
    return lo


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _lora_note(lora: dict[str, Any] | None) -> str:
    if not lora:
        return ""
    base = f", base {lora['quantize']}" if lora["quantize"] != "none" else ""
    return f"; LoRA rank {lora['rank']} on {len(lora['targets'])} projections{base}"


def communication_lines(
    moved: dict[str, Any] | None, estimate: dict[str, Any] | None, chip: dict[str, Any]
) -> list[str]:
    """The collectives' bytes per chip per step and (with an estimate) the time they take on the links."""
    if not moved:
        return []
    kinds = ", ".join(f"{k} {gib(v)}" for k, v in sorted(moved["by_kind"].items(), key=lambda kv: -kv[1]) if v)
    unread = (moved.get("loops") or {}).get("unread")
    lines = [
        f"collectives per chip per step (HLO): ICI {gib(moved['ici_bytes'])}, DCN {gib(moved['dcn_bytes'])} "
        f"({kinds or 'none'})" + (f"; {len(unread)} loop(s) of unknown trip count counted once" if unread else "")
    ]
    if estimate is None:
        return lines
    ici, dcn = chip.get("ici_bytes_per_second"), chip.get("dcn_bytes_per_second")
    lines.append(
        f"          at {ici / 1e9:,.0f} GB/s ICI and {dcn / 1e9:,.2f} GB/s DCN per chip: ICI {estimate['ici_seconds']:.3g} s, "
        f"DCN {estimate['dcn_seconds']:.3g} s, against compute {estimate['compute_seconds']:.3g} s and HBM "
        f"{estimate['hbm_seconds']:.3g} s"
        if ici and dcn
        else "          link bandwidths of this chip unknown: communication time not estimated"
    )
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The report as a few human-readable lines."""
    t, m, b, mem = report["topology"], report["model"], report["batch"], report["memory_per_chip"]
    mesh = report["mesh"]
    lines = [
        f"topology  {t['name']} = {t['libtpu']}"
        + (f" × {t['slices']} slices" if t["slices"] > 1 else "")
        + f": {t['chips']} × {t['device_kind']}",
        f"model     {m['source']} ({m['params'] / 1e6:,.0f}M params, {m['param_dtype']} master weights, {m['dtype']} "
        f"compute{_lora_note(m.get('lora'))}), remat={m['remat']}, scan_layers={m['scan_layers']}, attention={m['attention_impl']}, "
        f"optimizer={report['optimizer']}",
        f"mesh      data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']}"
        + (f" (data spans {mesh['slices']} slices)" if mesh["slices"] > 1 else ""),
        f"batch     {b['global_rows']} rows × {b['seq_len']} tokens = {b['tokens_per_step']} tokens/step, "
        f"grad_accum={b['grad_accum']}, {b['rows_per_chip_per_micro_batch']} rows/chip/micro-batch",
        f"memory per chip (XLA): arguments {gib(mem['arguments'])}, outputs {gib(mem['outputs'])}, aliased "
        f"{gib(mem['aliased'])}, temporaries {gib(mem['temporaries'])}, code {gib(mem['generated_code'])}",
        f"          params {gib(mem['state']['params'])} + optimizer state {gib(mem['state']['optimizer_state'])}"
        + (f" + frozen base {gib(mem['state']['frozen_base'])}" if "frozen_base" in mem["state"] else "")
        + f" of the arguments; total {gib(mem['total'])} of {gib(mem['hbm'])} HBM ({100 * mem['fraction_of_hbm']:.0f}%)"
        f" -> {'FITS' if mem['fits'] else 'DOES NOT FIT'}"
        + (" (tight)" if mem["fits"] and mem["fraction_of_hbm"] > TIGHT_FRACTION else ""),
    ]
    lines += [f"  to change: {tip}" for tip in report["advice"]]
    if "flops" not in report:
        lines += communication_lines(report.get("collectives_per_chip"), None, report.get("chip") or {})
    if "flops" in report:
        f, e = report["flops"], report["estimate"]
        lines += [
            f"XLA FLOPs per chip per step {f['xla_flops_per_chip']:.3e}, HBM bytes {f['xla_hbm_bytes_per_chip']:.3e} "
            f"({f['method']})",
            *communication_lines(report.get("collectives_per_chip"), e, report.get("chip") or {}),
            f"ESTIMATE (roofline, not a measurement): step {e['step_seconds']:.3g} s with every collective "
            f"overlapped ({e['bound']}-bound) .. {e.get('step_seconds_no_overlap', e['step_seconds']):.3g} s with none; "
            f"{e['tokens_per_second']:,.0f} .. {e.get('tokens_per_second_no_overlap', e['tokens_per_second']):,.0f} "
            f"tokens/s, MFU {100 * e['mfu']:.0f}% .. {100 * e.get('mfu_no_overlap', e['mfu']):.0f}%",
        ]
    if "estimate_unavailable" in report:
        lines.append(f"no estimate: {report['estimate_unavailable']}")
    lines.append(f"compiled in {report['compile_seconds']:.0f} s")
    return "\n".join(lines)

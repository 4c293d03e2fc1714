"""``finch-train compile``: compile the real FINCH train step for a TPU pod on this CPU and say whether it fits.

    finch-train compile --topology v5p-64 --model preset:qwen3-4b
    finch-train compile --topology v5e-64 --num-slices 2 --config run.yaml data.batch_size=256
    finch-train compile --topology v5e-16 --model preset:qwen3-4b --max-batch

The step is the one ``finetune`` trains with, from the same builder (:func:`train.program.build_program`: the
optimizer, the mesh and its rules, gradient accumulation, remat, the attention implementation), lowered with
abstract params and batches (no weights in memory) for the devices libtpu describes
(:mod:`train.topology`), and compiled by XLA's TPU compiler. The report gives, per chip: XLA's memory analysis
(arguments, outputs, aliased = donated state, temporaries) against the chip's HBM, fits or not and what to change;
XLA's FLOPs and HBM bytes per step; the bytes every chip moves in the program's collectives, within a slice (ICI)
and between slices (DCN); and a roofline ESTIMATE of step time, tokens/s and MFU from the chip's published bf16 peak,
HBM bandwidth and link bandwidths, two ways: every collective overlapped with compute, and none. Kernel efficiency
is not in it: the estimate is a range of upper bounds on what the pod can do, not a measurement.

XLA's cost analysis counts a loop body once, and so would a count of the collectives in the loop's HLO, so for a
program with loops (``scan_layers``, ``grad_accum > 1``) the FLOPs, bytes and collectives come from two small
compiles of the same step with 1 and 2 unrolled layers, extrapolated to the model's depth (one micro-batch, times
``grad_accum``). Splash attention is a Pallas kernel XLA cannot see into; its FLOPs are added from the model's own
count.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from models import flops as flops_lib  # the model-FLOPs count MFU is defined by
from models import loss as loss_lib
from models.config import ModelConfig
from models.load import parse_source
from train import config as config_lib
from train import mesh as mesh_lib
from train import paths, xla_analysis
from train import program as program_lib
from train import topology as topology_lib
from train.compile_report import advice, format_report, gib, largest_fitting, memory_fields, roofline
from train.config import TrainConfig

__all__ = [
    "compile_step",
    "find_max_batch",
    "format_report",
    "largest_fitting",
    "main",
    "roofline",
]

# Defaults for a pod run when no --config is given: one 2048-token row per data-parallel chip, layers under scan
# (compiles in minutes instead of tens of minutes) and rematerialised (activations of one layer at a time).
POD_DEFAULTS = ("data.seq_len=2048", "model.scan_layers=true", "model.remat=true")


@dataclasses.dataclass
class _Built:
    """One lowered-and-compiled step and what it was built from."""

    compiled: Any
    mesh: jax.sharding.Mesh
    state: Any  # ShapeDtypeStructs with shardings
    seconds: float


def _build(cfg: TrainConfig, devices: Sequence[Any], model_cfg: ModelConfig, *, counting: bool = False) -> _Built:
    """Lowers and compiles the train program (:func:`train.program.build_program`) for ``devices`` with abstract
    state and batch.

    ``counting``: a compile only for XLA's FLOP and byte counts, with the loss's loop over chunks unrolled.
    """
    model = program_lib.abstract_model(cfg.model, model_cfg)
    program, _, _ = program_lib.build_program(cfg, model, devices=devices, unroll_loss=counting)
    start = time.perf_counter()
    lowered = program.lower()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        # XLA's TPU compiler refuses a program whose buffers cannot fit in HBM: an answer, not a crash.
        if "RESOURCE_EXHAUSTED" in str(e):
            raise DoesNotFitError(str(e).splitlines()[0], time.perf_counter() - start) from None
        raise
    return _Built(compiled, program.mesh, program.abstract_state, time.perf_counter() - start)


class DoesNotFitError(Exception):
    """XLA refused to compile the step because its buffers exceed the chip's HBM (``RESOURCE_EXHAUSTED``)."""

    def __init__(self, message: str, seconds: float):
        super().__init__(message)
        self.seconds = seconds


def _per_chip_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ``ShapeDtypeStruct``s (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


def _xla_costs(compiled: Any) -> tuple[float, float]:
    counted = xla_analysis.costs(compiled) or {"flops": 0.0, "bytes_accessed": 0.0}
    return counted["flops"], counted["bytes_accessed"]


# What one compile tells the estimate: FLOPs, HBM bytes, and each chip's collective bytes by kind ("ici" and "dcn"
# totals, and one entry per collective kind).
Counts = dict[str, float]


def _counts(compiled: Any, num_slices: int) -> Counts:
    flops, hbm = _xla_costs(compiled)
    moved = xla_analysis.collectives(compiled, num_slices=num_slices) or {"ici_bytes": 0.0, "dcn_bytes": 0.0}
    kinds = {f"bytes {kind}": v for kind, v in (moved.get("by_kind") or {}).items()}
    return {"flops": flops, "hbm": hbm, "ici": moved["ici_bytes"], "dcn": moved["dcn_bytes"], **kinds}


def _combine(a: Counts, b: Counts, weight: float) -> Counts:
    """``a + weight·(b − a)`` key by key (a kind missing on one side counts 0): the extrapolation of two counts."""
    return {k: a.get(k, 0.0) + weight * (b.get(k, 0.0) - a.get(k, 0.0)) for k in {**a, **b}}


def _splash_flops(model_cfg: ModelConfig, tokens: int, seq_len: int) -> float:
    """Training FLOPs of the attention kernel XLA cannot see: causal half, forward + backward (+ remat's re-run)."""
    per_token = flops_lib.forward_flops_per_token(flops_lib.shape_of(model_cfg), seq_len, causal_attention=True)
    forward = (per_token["attention_scores"] + per_token["attention_values"]) * tokens
    passes = 4 if model_cfg.remat else 3  # no remat policy saves a custom kernel's output: remat re-runs it
    return forward * passes


def _step_costs(
    cfg: TrainConfig, devices: Sequence[Any], model_cfg: ModelConfig, built: _Built, num_slices: int = 1
) -> dict[str, Any]:
    """XLA FLOPs, HBM bytes and collective bytes per chip per step, with every loop counted as often as it runs.

    XLA counts a loop body once (and the collectives of a loop body appear once in its HLO). The step's loops: the
    layers (``scan_layers``), the micro-batches (``grad_accum``) and the loss's chunks
    (:func:`models.loss.token_nll`). Counting compiles unroll the loss; layers are extrapolated from 1- and 2-layer
    compiles (each layer gathers, and reduces the gradients of, its own weights: the per-layer difference is
    exact); micro-batches multiply one micro-batch's count.
    """
    accum = cfg.data.grad_accum
    chunks, _ = loss_lib.chunk_layout(cfg.data.seq_len)
    if not model_cfg.scan_layers and accum == 1 and chunks == 1:
        counts = _counts(built.compiled, num_slices)
        method = "XLA cost analysis and HLO of the compiled step"
    else:
        micro = dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, batch_size=cfg.data.batch_size // accum, grad_accum=1)
        )
        notes: set[str] = set()
        if model_cfg.scan_layers:
            one, two = (
                _counted_costs(
                    micro, devices, dataclasses.replace(model_cfg, num_layers=n, scan_layers=False), notes, num_slices
                )
                for n in (1, 2)
            )
            counts = _combine(one, two, model_cfg.num_layers - 1)
            method = (
                "XLA cost analysis and HLO of the same step with 1 and 2 unrolled layers, extrapolated to "
                f"{model_cfg.num_layers} layers"
            )
        else:
            counts = _counted_costs(micro, devices, model_cfg, notes, num_slices)
            method = "XLA cost analysis and HLO of the same step with its loops unrolled"
        if notes:
            method += f" ({'; '.join(sorted(notes))}, where the counting compile did not fit in HBM)"
        counts = {k: accum * v for k, v in counts.items()}
        method += f", × {accum} micro-batches" if accum > 1 else ""
    chips = len(devices)
    flops = counts["flops"]
    if model_cfg.attention_impl == "splash":
        tokens = cfg.data.batch_size * cfg.data.seq_len
        flops += _splash_flops(model_cfg, tokens, cfg.data.seq_len) / chips
        method += "; splash attention FLOPs added from the model's count"
    by_kind = {k.split(" ", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("bytes ")}
    return {
        "xla_flops_per_chip": flops,
        "xla_hbm_bytes_per_chip": counts["hbm"],
        # The counting compiles' collectives, extrapolated like the FLOPs: a cross-check of the program's own count
        # (report["collectives_per_chip"]); they differ where the unrolled loss or layers communicate differently.
        "collectives_per_chip_extrapolated": {
            "ici_bytes": counts["ici"],
            "dcn_bytes": counts["dcn"],
            "by_kind": by_kind,
        },
        "method": method,
    }


def _counted_costs(
    cfg: TrainConfig, devices: Sequence[Any], model_cfg: ModelConfig, notes: set[str], num_slices: int = 1
) -> Counts:
    """XLA's FLOPs, HBM bytes and collective bytes from one counting compile (``grad_accum`` 1).

    The counting compile unrolls the loss, which keeps every chunk's logits alive, so near the HBM limit XLA may
    refuse it although the real step fits. Then the counts come from the same rows with a shorter sequence
    (:func:`_extrapolated_costs`), and ``notes`` says so.

    Raises:
      DoesNotFitError: even the shorter compiles do not fit, or the sequence cannot be shortened.
    """
    try:
        return _counts(_build(cfg, devices, model_cfg, counting=True).compiled, num_slices)
    except DoesNotFitError:
        for fraction in (2, 4):
            if cfg.data.seq_len % (512 * fraction) == 0:  # the shorter rows stay multiples of every kernel block
                try:
                    return _extrapolated_costs(cfg, devices, model_cfg, fraction, notes, num_slices)
                except DoesNotFitError:
                    continue
        raise


def _extrapolated_costs(
    cfg: TrainConfig,
    devices: Sequence[Any],
    model_cfg: ModelConfig,
    fraction: int,
    notes: set[str],
    num_slices: int = 1,
) -> Counts:
    """The counts at ``cfg``'s sequence length, extrapolated from counting compiles of the same rows at
    ``seq_len / (2·fraction)`` and ``seq_len / fraction``.

    At fixed rows both counts are close to affine in the sequence length (the weights are read once per step, the
    rest grows with the positions; splash attention, the kernel the pod runs use, is invisible to XLA's count and
    added from the model's count instead). Not exactly: on the tiny model the extrapolated FLOPs are 0.92-0.93 of
    the direct count and the HBM bytes 1.02-1.18 (``tests/test_compile.py``). Extrapolating over rows per chip
    instead was worse for the bytes (0.74 at 3 rows from 1 and 2). The weights' collectives do not depend on the
    sequence, so they extrapolate exactly.
    """
    seq = cfg.data.seq_len
    lengths = (seq // (2 * fraction), seq // fraction)
    short, long = (
        _counts(_build(_with_seq(cfg, length), devices, model_cfg, counting=True).compiled, num_slices)
        for length in lengths
    )
    notes.add(f"sequence extrapolated from {lengths[0]} and {lengths[1]} positions")
    return _combine(short, long, (seq - lengths[0]) / (lengths[1] - lengths[0]))


def _remat_name(model_cfg: ModelConfig) -> str:
    return model_cfg.remat_policy if model_cfg.remat else "none"


def _estimate(
    cfg: TrainConfig, model_cfg: ModelConfig, chip: topology_lib.Chip, chips: int, costs: dict, moved: dict
) -> dict:
    model_flops = flops_lib.training_flops_per_step(
        flops_lib.shape_of(model_cfg), cfg.data.batch_size, cfg.data.seq_len
    )
    return roofline(
        tokens=cfg.data.batch_size * cfg.data.seq_len,
        model_flops=model_flops,
        chips=chips,
        peak_flops=chip.peak_bf16_flops,
        hbm_bytes_per_second=chip.hbm_bytes_per_second,
        xla_flops_per_chip=costs["xla_flops_per_chip"],
        xla_hbm_bytes_per_chip=costs["xla_hbm_bytes_per_chip"],
        remat=_remat_name(model_cfg),
        ici_bytes_per_chip=moved["ici_bytes"],
        dcn_bytes_per_chip=moved["dcn_bytes"],
        ici_bytes_per_second=chip.ici_bytes_per_second,
        dcn_bytes_per_second=chip.dcn_bytes_per_second,
    )


def compile_step(cfg: TrainConfig, topology: topology_lib.Topology, *, costs: bool = True) -> dict[str, Any]:
    """Compiles the train step ``cfg`` describes for ``topology``; returns the report (JSON-ready).

    Args:
      cfg: the run's config (model, mesh, batch, optimizer), as ``finetune`` would run it.
      topology: the TPU slice(s) to compile for.
      costs: also measure FLOPs and HBM bytes (two more, smaller compiles when the step loops) and add the
        roofline ``estimate``.

    Raises:
      ConfigError (incl. TopologyError), ShardingError: a bad topology, mesh, batch or model, before compiling.
    """
    report, built = _memory_report(cfg, topology)
    if costs:
        _add_estimate(report, cfg, topology, built)
    return report


def _add_estimate(report: dict[str, Any], cfg: TrainConfig, topology: topology_lib.Topology, built: _Built) -> None:
    if xla_analysis.costs(built.compiled) is None:
        # XLA's GPU compiler gives no cost analysis for a GPU it does not see (deviceless): without HBM bytes the
        # roofline would read compute-bound at any size. Memory and collectives stand; the estimate does not.
        report["estimate_unavailable"] = (
            f"XLA has no cost analysis (FLOPs, HBM bytes) for {topology.chip.device_kind} compiled without one"
        )
        return
    devices = topology_lib.topology_devices(topology)
    model_cfg = program_lib.model_config(cfg.model)
    try:
        step_costs = _step_costs(cfg, devices, model_cfg, built, topology.num_slices)
    except DoesNotFitError as e:
        # The step itself fits; only the counting compiles did not. Keep the memory report, say why no estimate.
        report["estimate_unavailable"] = f"the counting compiles did not fit in HBM ({e})"
        return
    report["flops"] = step_costs
    moved = report["collectives_per_chip"]
    report["estimate"] = _estimate(cfg, model_cfg, topology.chip, topology.num_chips, step_costs, moved)


def _memory_report(cfg: TrainConfig, topology: topology_lib.Topology) -> tuple[dict[str, Any], _Built]:
    devices = topology_lib.topology_devices(topology)
    model_cfg = program_lib.model_config(cfg.model)
    built = _build(cfg, devices, model_cfg)
    chip = topology.chip
    mesh = built.mesh
    memory = memory_fields(built.compiled, chip.hbm_bytes)
    state_bytes = {
        "params": _per_chip_bytes(built.state.params),
        "optimizer_state": _per_chip_bytes(built.state.opt_state),
    }
    if built.state.frozen is not None:  # LoRA: the params are the adapters; the base is frozen (maybe quantized)
        state_bytes["frozen_base"] = _per_chip_bytes(built.state.frozen)
    dp = mesh_lib.data_parallel_size(mesh)
    report: dict[str, Any] = {
        "topology": {
            "name": topology.name,
            "libtpu": topology.libtpu_name,
            "slices": topology.num_slices,
            "chips": topology.num_chips,
            "device_kind": chip.device_kind,
        },
        "chip": {k: v for k, v in dataclasses.asdict(chip).items() if k != "slice_sizes"},
        "model": {
            "source": cfg.model.source,
            "params": model_cfg.num_params,
            "dtype": cfg.model.dtype,
            "param_dtype": cfg.model.param_dtype,
            "remat": _remat_name(model_cfg),
            "scan_layers": model_cfg.scan_layers,
            "attention_impl": model_cfg.attention_impl,
            "lora": dataclasses.asdict(cfg.model.lora) if cfg.model.lora.enabled else None,
        },
        "optimizer": cfg.optimizer.name,
        "mesh": {**{a: int(mesh.shape[a]) for a in mesh_lib.MESH_AXES}, "slices": topology.num_slices},
        "batch": {
            "global_rows": cfg.data.batch_size,
            "seq_len": cfg.data.seq_len,
            "grad_accum": cfg.data.grad_accum,
            "rows_per_chip_per_micro_batch": cfg.data.batch_size // (cfg.data.grad_accum * dp),
            "tokens_per_step": cfg.data.batch_size * cfg.data.seq_len,
        },
        "memory_per_chip": memory | {"state": state_bytes},
        "compile_seconds": built.seconds,
    }
    report["collectives_per_chip"] = _collectives(built.compiled, topology.num_slices)
    report["advice"] = advice(cfg, model_cfg, mesh, memory, state_bytes)
    return report, built


def _collectives(compiled: Any, num_slices: int) -> dict[str, Any]:
    """The bytes each chip moves per step in the compiled step's collectives (its HLO, every loop counted by its
    trip count: :func:`train.xla_analysis.collectives`), the loops whose count could not be read listed."""
    moved = xla_analysis.collectives(compiled, num_slices=num_slices) or {"ici_bytes": 0.0, "dcn_bytes": 0.0}
    unread = [loop["while"] for loop in moved.get("loops", []) if loop["trip_count"] is None]
    trips = sorted({loop["trip_count"] for loop in moved.get("loops", []) if loop["trip_count"] is not None})
    return {
        "ici_bytes": moved["ici_bytes"],
        "dcn_bytes": moved["dcn_bytes"],
        "by_kind": moved.get("by_kind", {}),
        "loops": {"count": len(moved.get("loops", [])), "trip_counts": trips, "unread": unread},
        "method": "HLO of the compiled step; every while loop counted by its trip count"
        + (f" ({len(unread)} loop(s) whose count could not be read counted once)" if unread else ""),
    }


def _with_rows(cfg: TrainConfig, rows: int, dp: int) -> TrainConfig:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=rows * dp * cfg.data.grad_accum))


def _with_seq(cfg: TrainConfig, seq_len: int) -> TrainConfig:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=seq_len))


def find_max_batch(
    cfg: TrainConfig,
    topology: topology_lib.Topology,
    *,
    start: int | None = None,
    costs: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """The largest global batch (rows per chip per micro-batch × data-parallel chips × grad_accum) that fits.

    Each size tried is a real compile (:func:`largest_fitting` keeps them few: typically 1, 2, the predicted limit
    and one more row). ``start`` (e.g. the answer for one slice, when asking about two) replaces the first guesses.
    ``costs``: add FLOPs and the roofline estimate at the answer (as :func:`compile_step`).

    Returns:
      ``{"rows_per_chip": r, "global_batch": ..., "report": the compile report at r (with FLOPs and estimate),
      "tried": {rows: total bytes per chip}}``; when one row does not fit, ``rows_per_chip`` is 0 and ``report``
      is the one-row compile's (memory and advice only).
    """
    dp = mesh_lib.data_parallel_size(mesh_lib.make_mesh(cfg.mesh, topology_lib.topology_devices(topology)))
    hbm = topology.chip.hbm_bytes
    tried: dict[int, int | None] = {}
    refused: dict[int, str] = {}
    compiled: dict[int, tuple[dict[str, Any], _Built]] = {}

    def measure(rows: int) -> float:
        try:
            report, built = _memory_report(_with_rows(cfg, rows, dp), topology)
        except DoesNotFitError as e:
            tried[rows] = None  # XLA refused: more than the HBM
            refused[rows] = str(e)
            log(f"  {rows} rows/chip: does not fit, XLA refused to compile it ({e}) ({e.seconds:.0f} s)")
            return math.inf
        compiled[rows] = (report, built)
        tried[rows] = report["memory_per_chip"]["total"]
        log(f"  {rows} rows/chip: {gib(tried[rows])} of {gib(hbm)} per chip ({built.seconds:.0f} s)")
        return tried[rows]

    rows = largest_fitting(measure, hbm, start=start)
    if rows:
        report, built = compiled[rows]
        if costs:
            _add_estimate(report, _with_rows(cfg, rows, dp), topology, built)
    elif 1 in compiled:
        report = compiled[1][0]  # what one row needs, for the advice
    else:
        report = _refused_report(cfg, topology, refused[1])
    return {
        "rows_per_chip": rows,
        "global_batch": rows * dp * cfg.data.grad_accum,
        "report": report,
        "tried": tried,
        "refused_by_xla": refused,
    }


def _refused_report(cfg: TrainConfig, topology: topology_lib.Topology, message: str) -> dict[str, Any]:
    """The report of a step XLA would not compile for lack of HBM: what was asked, and XLA's reason."""
    return {
        "topology": {"name": topology.name, "slices": topology.num_slices, "chips": topology.num_chips},
        "model": {"source": cfg.model.source},
        "batch": {"global_rows": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "grad_accum": cfg.data.grad_accum},
        "memory_per_chip": {"hbm": topology.chip.hbm_bytes, "fits": False, "xla_refused": message},
        "advice": [
            "XLA refused to compile the step: it needs more than the chip's HBM. Shard wider (mesh.fsdp), turn on "
            "model.remat, put fewer rows on each chip (data.batch_size, or data.grad_accum micro-batches), or use a "
            "chip with more HBM"
        ],
    }


def _default_out(cfg: TrainConfig, topology: topology_lib.Topology) -> str:
    model = parse_source(cfg.model.source).value.rstrip("/").split("/")[-1]
    slices = f"_x{topology.num_slices}" if topology.num_slices > 1 else ""
    return os.path.join("runs", "compile", f"{model}_{topology.name.replace(':', '-')}{slices}.json")


def build_parser(prog: str = "finch-train compile") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Compile the FINCH train step ahead of time for a TPU pod topology on this machine (no TPU "
        "needed): per-chip memory against HBM, fits or not, XLA FLOPs, and a roofline estimate of step time and MFU.",
        epilog="Without --config the pod defaults apply: " + " ".join(POD_DEFAULTS) + ", and one row per "
        "data-parallel chip. Any finetune config key can be overridden as key=value (see `finch-train finetune "
        "--help`).\n\nexample: finch-train compile --topology v5p-64 --model preset:qwen3-4b model.attention_impl=splash",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--topology", help="v5e-256, v5p-64, v4-32, v6e-16, ... or libtpu's v5e:4x4")
    target.add_argument(
        "--gpu",
        help="h100, h200 or a100, optionally :COUNT (default 8, one node): compile for NVIDIA GPUs with JAX's CUDA "
        "plugin (pip install jax-cuda12-plugin jax-cuda12-pjrt), no GPU needed",
    )
    parser.add_argument("--num-slices", type=int, default=1, help="slices joined by the data-center network")
    parser.add_argument("--model", default=None, help="the model, as model.source: preset:qwen3-4b, hf:DIR, gguf:PATH")
    parser.add_argument("--config", default=None, help="a finetune YAML config")
    parser.add_argument(
        "--max-batch",
        nargs="?",
        type=int,
        const=0,
        default=None,
        metavar="ROWS",
        help="search the largest global batch that fits (optionally starting from ROWS per chip)",
    )
    parser.add_argument(
        "--no-estimate", action="store_true", help="memory only: skip the FLOPs compiles and the roofline estimate"
    )
    parser.add_argument("--out", default=None, help="JSON report path (default runs/compile/MODEL_TOPOLOGY.json)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser


def _config(args: argparse.Namespace) -> tuple[TrainConfig, bool]:
    """The run's config and whether its batch size was chosen (else: one row per data-parallel chip)."""
    overrides = list(args.overrides)
    if args.model:
        overrides.insert(0, f"model.source={parse_source(args.model)}")
    if args.config is None:
        overrides = list(POD_DEFAULTS) + overrides
    cfg = config_lib.load_config(args.config, overrides)
    chosen = args.config is not None or any(o.split("=", 1)[0].strip() == "data.batch_size" for o in args.overrides)
    return cfg, chosen


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    topology_lib.quiet_libtpu_without_tpus()
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")  # compiling needs no accelerator of this host
    if args.gpu is not None:
        if args.num_slices != 1:
            raise topology_lib.TopologyError("--num-slices is for TPU slices; --gpu compiles for one node")
        topology = topology_lib.parse_gpu(args.gpu)
    else:
        topology = topology_lib.parse_topology(args.topology, args.num_slices)
        topology_lib.require_libtpu()  # before any model or config file is read
    cfg, batch_chosen = _config(args)
    # Every setting, the model's config and the report's path are checked before the first compile.
    config_lib.check_ranges(cfg)
    if args.max_batch is not None and args.max_batch < 0:
        raise config_lib.ConfigError(f"--max-batch must be >= 0 rows per chip (0: search from 1), got {args.max_batch}")
    out = args.out or _default_out(cfg, topology)
    paths.check_file_to_write(out, "--out")
    program_lib.model_config(cfg.model)
    if not batch_chosen:
        dp = mesh_lib.data_parallel_size(mesh_lib.make_mesh(cfg.mesh, topology_lib.topology_devices(topology)))
        cfg = _with_rows(cfg, 1, dp)
    print(f"compiling {cfg.model.source} for {topology.describe()} ...", flush=True)
    if args.max_batch is not None:
        log = functools.partial(print, flush=True)
        found = find_max_batch(cfg, topology, start=args.max_batch or None, costs=not args.no_estimate, log=log)
        report = found["report"]
        report["max_batch"] = {k: v for k, v in found.items() if k != "report"}
        if found["rows_per_chip"]:
            print(f"largest batch that fits: {found['rows_per_chip']} rows/chip = {found['global_batch']} rows")
        else:
            print("even one row per chip does not fit")
    else:
        try:
            report = compile_step(cfg, topology, costs=not args.no_estimate)
        except DoesNotFitError as e:
            report = _refused_report(cfg, topology, str(e))
    if "xla_refused" in report["memory_per_chip"]:
        print(f"DOES NOT FIT: {report['memory_per_chip']['xla_refused']}\n{report['advice'][0]}")
    else:
        print(format_report(report))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

How the FLOPs, bytes and collectives of a step with loops are counted: :mod:`train.step_costs`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax

from models import flops as flops_lib  # the model-FLOPs count MFU is defined by
from models.config import ModelConfig
from models.load import parse_source
from train import config as config_lib
from train import mesh as mesh_lib
from train import paths, xla_analysis
from train import program as program_lib
from train import step_costs as costs_lib
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


def _add_estimate(
    report: dict[str, Any], cfg: TrainConfig, topology: topology_lib.Topology, built: costs_lib.Built
) -> None:
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
        costs = costs_lib.step_costs(cfg, devices, model_cfg, built, topology.num_slices)
    except costs_lib.DoesNotFitError as e:
        # The step itself fits; only the counting compiles did not. Keep the memory report, say why no estimate.
        report["estimate_unavailable"] = f"the counting compiles did not fit in HBM ({e})"
        return
    report["flops"] = costs
    moved = report["collectives_per_chip"]
    report["estimate"] = _estimate(cfg, model_cfg, topology.chip, topology.num_chips, costs, moved)


def _memory_report(cfg: TrainConfig, topology: topology_lib.Topology) -> tuple[dict[str, Any], costs_lib.Built]:
    devices = topology_lib.topology_devices(topology)
    model_cfg = program_lib.model_config(cfg.model)
    built = costs_lib.build_step(cfg, devices, model_cfg)
    chip = topology.chip
    mesh = built.mesh
    memory = memory_fields(built.compiled, chip.hbm_bytes)
    state_bytes = {
        "params": costs_lib.per_chip_bytes(built.state.params),
        "optimizer_state": costs_lib.per_chip_bytes(built.state.opt_state),
    }
    if built.state.frozen is not None:  # LoRA: the params are the adapters; the base is frozen (maybe quantized)
        state_bytes["frozen_base"] = costs_lib.per_chip_bytes(built.state.frozen)
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
    report["collectives_per_chip"] = costs_lib.collectives(built.compiled, topology.num_slices)
    report["advice"] = advice(cfg, model_cfg, mesh, memory, state_bytes)
    return report, built


def _with_rows(cfg: TrainConfig, rows: int, dp: int) -> TrainConfig:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=rows * dp * cfg.data.grad_accum))


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
    compiled: dict[int, tuple[dict[str, Any], costs_lib.Built]] = {}

    def measure(rows: int) -> float:
        try:
            report, built = _memory_report(_with_rows(cfg, rows, dp), topology)
        except costs_lib.DoesNotFitError as e:
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
        except costs_lib.DoesNotFitError as e:
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

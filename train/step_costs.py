"""What one compiled train step costs per chip: XLA's FLOPs and HBM bytes, the bytes its collectives move, and
its state's bytes, with every loop counted as often as it runs (the numbers behind ``finch-train compile``'s
roofline estimate, :mod:`train.compile`).

XLA's cost analysis counts a loop body once, and so would a count of the collectives in the loop's HLO, so for a
program with loops (``scan_layers``, ``grad_accum > 1``, the loss's chunks) the counts come from small compiles of
the same step with its loops unrolled, extrapolated (:func:`step_costs`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from models import flops as flops_lib  # the model-FLOPs count MFU is defined by
from models import loss as loss_lib
from models.config import ModelConfig
from train import program as program_lib
from train import xla_analysis
from train.config import TrainConfig

__all__ = [
    "Built",
    "DoesNotFitError",
    "build_step",
    "collectives",
    "extrapolated_costs",
    "per_chip_bytes",
    "step_costs",
    "with_seq",
    "xla_costs",
]


@dataclasses.dataclass
class Built:
    """One lowered-and-compiled step and what it was built from."""

    compiled: Any
    mesh: jax.sharding.Mesh
    state: Any  # ShapeDtypeStructs with shardings
    seconds: float


def build_step(cfg: TrainConfig, devices: Sequence[Any], model_cfg: ModelConfig, *, counting: bool = False) -> Built:
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
    return Built(compiled, program.mesh, program.abstract_state, time.perf_counter() - start)


class DoesNotFitError(Exception):
    """XLA refused to compile the step because its buffers exceed the chip's HBM (``RESOURCE_EXHAUSTED``)."""

    def __init__(self, message: str, seconds: float):
        super().__init__(message)
        self.seconds = seconds


def per_chip_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ``ShapeDtypeStruct``s (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


def xla_costs(compiled: Any) -> tuple[float, float]:
    counted = xla_analysis.costs(compiled) or {"flops": 0.0, "bytes_accessed": 0.0}
    return counted["flops"], counted["bytes_accessed"]


# What one compile tells the estimate: FLOPs, HBM bytes, and each chip's collective bytes by kind ("ici" and "dcn"
# totals, and one entry per collective kind).
Counts = dict[str, float]


def _counts(compiled: Any, num_slices: int) -> Counts:
    flops, hbm = xla_costs(compiled)
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


def step_costs(
    cfg: TrainConfig, devices: Sequence[Any], model_cfg: ModelConfig, built: Built, num_slices: int = 1
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
    (:func:`extrapolated_costs`), and ``notes`` says so.

    Raises:
      DoesNotFitError: even the shorter compiles do not fit, or the sequence cannot be shortened.
    """
    try:
        return _counts(build_step(cfg, devices, model_cfg, counting=True).compiled, num_slices)
    except DoesNotFitError:
        for fraction in (2, 4):
            if cfg.data.seq_len % (512 * fraction) == 0:  # the shorter rows stay multiples of every kernel block
                try:
                    return extrapolated_costs(cfg, devices, model_cfg, fraction, notes, num_slices)
                except DoesNotFitError:
                    continue
        raise


def extrapolated_costs(
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
        _counts(build_step(with_seq(cfg, length), devices, model_cfg, counting=True).compiled, num_slices)
        for length in lengths
    )
    notes.add(f"sequence extrapolated from {lengths[0]} and {lengths[1]} positions")
    return _combine(short, long, (seq - lengths[0]) / (lengths[1] - lengths[0]))


def collectives(compiled: Any, num_slices: int) -> dict[str, Any]:
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


def with_seq(cfg: TrainConfig, seq_len: int) -> TrainConfig:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=seq_len))

"""One benchmark run: validate, count FLOPs, measure the peak, check the duration estimate, then run the sections.

:func:`run_bench` returns the JSON-ready result and, with ``out``, rewrites it after every section.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from collections.abc import Sequence
from typing import Any

import jax

from models import flops as flops_lib
from train.bench.estimate import estimate_seconds, shrink_advice
from train.bench.jax_runner import device_memory
from train.bench.peak import measure_matmul_peak
from train.bench.report import check_targets, meta, write_json
from train.bench.runner import log
from train.bench.sections import (
    run_flags_section,
    run_lora_section,
    run_main_sections,
    run_malloc_section,
    run_matmuls_section,
    run_profile_section,
    run_remat_section,
    run_scaling_section,
    run_trees_section,
    run_variants_section,
)
from train.bench.spec import BenchSpec, BenchTooLong, compute_dtypes, model_config, spec_to_json, validate
from train.chips import spec_peak_flops

__all__ = ["DTYPE_TAGS", "SCHEMA_VERSION", "run_bench"]

SCHEMA_VERSION = 1
# The tag a runner or ratio of a second compute dtype carries ("jax finch_adamw bf16", "..._tokens_per_s_bf16").
DTYPE_TAGS = {"float32": "fp32", "bfloat16": "bf16"}


def run_bench(
    spec: BenchSpec, argv: Sequence[str] | None = None, *, check_time: bool = True, out: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Runs the requested sections and returns the JSON-ready result (see ``docs/bench.md`` for every field).

    With ``out``, the result so far is written there after every section (``"complete": false`` until the end), so
    a run killed by a time limit still leaves what it measured.
    """
    validate(spec, jax.device_count())
    backend = jax.default_backend()
    dtypes = compute_dtypes(spec, backend)
    dtype_name = dtypes[0]  # the primary dtype: the one of every single-dtype section
    cfg = model_config(spec, dtype_name)
    shape = flops_lib.shape_of(cfg)
    tokens = spec.batch_size * spec.seq_len
    forward = flops_lib.forward_flops_per_token(shape, spec.seq_len)
    step_flops = flops_lib.training_flops_per_step(shape, spec.batch_size, spec.seq_len)
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "meta": meta(argv),
        "spec": spec_to_json(spec),
        "model": {
            "source": spec.model,
            "params": cfg.num_params,
            "matmul_params": flops_lib.matmul_param_count(shape),
            **dataclasses.asdict(shape),
            "compute_dtype": dtype_name,
            "compute_dtypes": list(dtypes),
            "param_dtype": "float32",
            "remat": cfg.remat,
            "scan_layers": cfg.scan_layers,
        },
        "flops": {
            "forward_per_token": forward,
            "training_per_token": 3 * forward["total"],
            "training_per_step": step_flops,
            "tokens_per_step": tokens,
            "convention": "matmuls only, 2 FLOPs per MAC, attention over all T keys, training = 3x forward",
        },
        "peak": None,
        "peaks": {},
        "estimate_s": None,
        "runners": [],
        "ratios": {},
        "targets": {},
        "profile": None,
        "matmuls": None,
        "variants": None,
        "trees": None,
        "remat": None,
        "lora": None,
        "flags": None,
        "malloc": None,
        "scaling": None,
        "memory": None,
        "wall_s": None,
        "complete": False,
    }

    def checkpoint() -> None:
        result["wall_s"] = time.perf_counter() - wall_start
        result["meta"]["load_average_end"] = list(os.getloadavg())
        result["targets"] = check_targets(result)
        if out is not None:
            write_json(result, out)

    wall_start = time.perf_counter()
    for name in dtypes:  # the MFU basis of each dtype's runners: a matmul peak in that dtype
        log(f"measuring the {name} matmul peak on {backend}")
        peak_info = measure_matmul_peak(name, sizes=spec.peak_sizes or None)
        spec_peak = spec_peak_flops(jax.devices()[0].device_kind, name)
        # The chip's published peak, for the MFU MaxText and Levanter report (accelerators only; see chips.py).
        peak_info["spec_flops_per_s"] = None if spec_peak is None else spec_peak * peak_info["devices_counted"]
        result["peaks"][name] = peak_info
        log(f"{name} peak {peak_info['peak_flops_per_s'] / 1e9:.1f} GFLOP/s")
    result["peak"] = result["peaks"][dtype_name]
    peak = result["peak"]["peak_flops_per_s"]
    slowest = min(p["peak_flops_per_s"] for p in result["peaks"].values())
    est = estimate_seconds(spec, shape, slowest, dtypes=len(dtypes))
    result["estimate_s"] = est
    log(
        f"estimated duration ~{est['total'] / 60:.1f} min (limit {spec.max_minutes:g} min): "
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in est.items() if k != "total")
    )
    if check_time and est["total"] > spec.max_minutes * 60:
        raise BenchTooLong(
            f"this benchmark would take ~{est['total'] / 60:.1f} min, over the --max-minutes {spec.max_minutes:g} "
            f"limit:\n{shrink_advice(spec, est)}"
        )
    checkpoint()
    worker_timeout = max(120.0, spec.max_minutes * 60)
    counts = {"tokens": tokens, "step_flops": step_flops}
    if {"step", "finch", "torch"} & set(spec.sections):
        for name in dtypes:  # one pass of the main sections per dtype; the runners of the others carry its tag
            peak_info = result["peaks"][name]
            runners, ratios = run_main_sections(spec, name, peak_info, **counts)
            tag = "" if name == dtype_name else DTYPE_TAGS[name]
            for r in runners:
                r["dtype"] = name
                r["name"] += f" {tag}" if tag else ""
                if "achieved_flops_per_s" in r:
                    spec_total = peak_info["spec_flops_per_s"]
                    r["mfu_spec"] = None if spec_total is None else r["achieved_flops_per_s"] / spec_total
            result["runners"] += runners
            result["ratios"].update({f"{k}_{tag}" if tag else k: v for k, v in ratios.items()})
            checkpoint()
        result["memory"] = {
            "device": device_memory(),
            "host_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        checkpoint()
    if "profile" in spec.sections:
        result["profile"] = run_profile_section(spec, dtype_name, forward_per_token=forward, tokens=tokens)
        checkpoint()
    if "matmuls" in spec.sections:
        result["matmuls"] = run_matmuls_section(spec, cfg, worker_timeout)
        checkpoint()
    # The comparison sections: in this process (by compute dtype) or in worker processes (by their time limit).
    comparisons = (
        ("variants", run_variants_section, dtype_name),
        ("trees", run_trees_section, worker_timeout),
        ("remat", run_remat_section, dtype_name),
        ("lora", run_lora_section, dtype_name),
        ("flags", run_flags_section, worker_timeout),
        ("malloc", run_malloc_section, worker_timeout),
        ("scaling", run_scaling_section, worker_timeout),
    )
    for name, run_section, setting in comparisons:
        if name in spec.sections:
            result[name] = run_section(spec, setting, peak=peak, **counts)
            checkpoint()
    result["complete"] = True
    checkpoint()
    return result

"""The benchmark's sections, each a set of runners that take turns: ``step``/``finch``/``torch``, ``remat``,
``flags``, ``malloc`` and ``scaling`` (``docs/bench.md`` describes what each measures).

In-process runners are interleaved by :func:`train.bench.stats.interleaved`; runners that need a process of their
own (PyTorch, XLA flag sets, allocators, device counts) take the same turns through :mod:`train.bench.worker`.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from train import malloc
from train.bench.jax_runner import build_jax_runner, spec_devices
from train.bench.matmuls import MATMUL_DTYPES, matmul_shapes
from train.bench.peak import build_peak_probe
from train.bench.profile_xla import ATTN, LMHEAD, MLP, PROJ
from train.bench.runner import Runner, log
from train.bench.spec import FLAG_SETS, BenchError, BenchSpec, compute_dtype_name, spec_to_json, variant_spec
from train.bench.stats import interleaved, ratio_of_medians, step_result, timed_steps
from train.bench.worker import Worker, run_worker_section, worker_env, worker_results

__all__ = [
    "run_flags_section",
    "run_main_sections",
    "run_malloc_section",
    "run_matmuls_section",
    "run_profile_section",
    "run_remat_section",
    "run_scaling_section",
    "run_trees_section",
    "run_variants_section",
]


def _time_runners(runners: list[Runner], spec: BenchSpec, label: str) -> dict[str, list[list[float]]]:
    for runner in runners:
        for _ in range(spec.warmup):
            runner.step()
    log(f"{label}: timing {', '.join(r.name for r in runners)} interleaved, {spec.rounds} rounds x {spec.steps} steps")
    return interleaved(
        {r.name: r.step for r in runners},
        rounds=spec.rounds,
        steps_per_round=spec.steps,
        progress=lambda msg: log(f"{label}: {msg}"),
    )


def _release_memory() -> None:
    """Returns freed buffers to the OS between phases, so a later phase's peak is not stacked on an earlier one's."""
    gc.collect()
    torch = sys.modules.get("torch")  # only where a runner imported it; the benchmark never needs it here
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    malloc.release_free_memory()


def _compile_jax(spec: BenchSpec, dtype_name: str, optimizer: str) -> Runner:
    log(f"compiling JAX step ({spec.model}, {optimizer})")
    runner = build_jax_runner(
        f"jax {optimizer}", spec, dtype_name, optimizer, mesh_text=spec.mesh, devices=spec_devices(spec)
    )
    log(f"compiled in {runner.compile_s:.1f} s")
    return runner


def _interleaved_peak(peak_info: dict[str, Any], probe_flops: float, probe_times: list[list[float]]) -> float:
    """Records the peak probed between the steps and returns the MFU basis: the higher of the two measurements.

    A probe that comes out lower was disturbed (on an idle 2-core VM the between-steps probe read half the start
    figure while PyTorch's step itself sustained more than the probe), and MFU against a too-low peak flatters
    every runner.
    """
    probe_fps = probe_flops / statistics.median([t for rnd in probe_times for t in rnd])
    peak_info["interleaved_flops_per_s"] = probe_fps * peak_info["devices_counted"]
    if peak_info["interleaved_flops_per_s"] > peak_info["peak_flops_per_s"]:
        peak_info["mfu_basis"] = "interleaved"
        return peak_info["interleaved_flops_per_s"]
    return peak_info["peak_flops_per_s"]


def _torch_phase(
    name: str, spec: BenchSpec, dtype_name: str, reference: Runner
) -> tuple[dict[str, Any], dict[str, list[list[float]]]]:
    """One PyTorch mode in its own worker process, taking turns with the JAX ``reference`` runner.

    Returns:
      ``(runner, times)``: the worker's ready entry of the PyTorch runner and both runners' ``[rounds][steps]``.
    """
    mode = name.split()[1]
    log(f"building {name} in a worker process (first step{' compiles' if mode == 'compile' else ''})")
    job = {"spec": spec_to_json(spec), "layouts": [name], "dtype": dtype_name}
    worker = Worker(name, job, worker_env(1, "", platform=None), max(600.0, spec.max_minutes * 60))
    try:
        ready = worker.receive()["ready"]
        if ready["errors"]:
            raise BenchError(ready["errors"][0]["error"])
        # Warm the reference again even when an earlier phase did: the memory released between phases
        # (_release_memory) is faulted back in by its next steps, which must not be the timed ones.
        for _ in range(spec.warmup):
            reference.step()
        if spec.warmup:
            worker.run(name, spec.warmup)
        times: dict[str, list[list[float]]] = {reference.name: [], name: []}
        for rnd in range(spec.rounds):
            log(f"torch: round {rnd + 1}/{spec.rounds}: {reference.name}, {name}")
            times[reference.name].append(timed_steps(reference.step, spec.steps))
            times[name].append(worker.run(name, spec.steps))
        return ready["runners"][0], times
    finally:
        worker.close()


def run_main_sections(
    spec: BenchSpec, dtype_name: str, peak_info: dict[str, Any], *, tokens: int, step_flops: float
) -> tuple[list[dict], dict[str, Any]]:
    """``step``, ``finch`` and ``torch``, in phases that each interleave their runners.

    Phase 1 times ``finch_adamw`` against ``adamw`` (same jit step, same mesh) and a matmul peak probe, which
    becomes the MFU basis (``peak["interleaved_flops_per_s"]``, updated in place). Then, to keep at most one PyTorch
    model in memory, each PyTorch mode gets its own phase, interleaved with the same JAX ``adamw`` runner, which is
    the reference of that mode's tokens/s ratio (AdamW on both sides).

    Returns:
      ``(runners, ratios)``: one result per runner (or ``{"name", "error"}``), and the ratios measured side by side.
    """
    errors: dict[str, str] = {}
    peak = peak_info["peak_flops_per_s"]
    peak_info["mfu_basis"] = "start of run"
    sections = set(spec.sections)
    all_times: dict[str, list[list[float]]] = {}
    runners: dict[str, Runner] = {}
    ratios: dict[str, Any] = {}
    if {"step", "finch"} & sections:
        runners["jax finch_adamw"] = _compile_jax(spec, dtype_name, "finch_adamw")
    if {"finch", "torch"} & sections:
        runners["jax adamw"] = _compile_jax(spec, dtype_name, "adamw")
    if {"step", "finch"} & sections:
        by_size = peak_info["flops_per_s_by_size"]
        probe, probe_flops = build_peak_probe(dtype_name, int(max(by_size, key=by_size.get)))
        times = _time_runners([*runners.values(), probe], spec, "jax")
        peak = _interleaved_peak(peak_info, probe_flops, times.pop(probe.name))
        for name, t in times.items():
            all_times.setdefault(name, []).extend(t)
        if "jax adamw" in times:
            ratios["finch_over_adamw_step_time"] = ratio_of_medians(times["jax finch_adamw"], times["jax adamw"])
    counts = {"tokens": tokens, "step_flops": step_flops, "peak": peak}
    results: dict[str, dict | None] = {name: None for name in runners}
    if "jax finch_adamw" in runners:
        finch = runners.pop("jax finch_adamw")
        results[finch.name] = step_result(finch.name, finch.compile_s, all_times[finch.name], finch.info, **counts)
        finch.close()
        _release_memory()
    if "torch" in sections:
        reference = runners["jax adamw"]
        for mode in spec.torch_modes:
            name = f"torch {mode}"
            try:
                torch_runner, times = _torch_phase(name, spec, dtype_name, reference)
            except BenchError as e:
                errors[name] = str(e)[:500]
                log(f"{name} failed: {errors[name]}")
                continue
            all_times.setdefault(reference.name, []).extend(times[reference.name])
            # tokens/s ratio JAX/torch = step-time ratio torch/JAX, measured side by side in this phase.
            ratios[f"jax_over_torch_{mode}_tokens_per_s"] = ratio_of_medians(times[name], times[reference.name])
            results[name] = step_result(name, torch_runner["compile_s"], times[name], torch_runner["info"], **counts)
    for runner in runners.values():
        if runner.name in all_times:  # not timed when every PyTorch phase it was the reference of failed
            results[runner.name] = step_result(
                runner.name, runner.compile_s, all_times[runner.name], runner.info, **counts
            )
        runner.close()
    _release_memory()
    out = [r for r in results.values() if r is not None]
    out += [{"name": name, "error": msg} for name, msg in errors.items()]
    return out, ratios


def _side_by_side(
    spec: BenchSpec, dtype_name: str, section: str, variants: dict[str, dict[str, Any]], counts: dict[str, float]
) -> tuple[list[dict], dict[str, list[list[float]]]]:
    """One ``finch_adamw`` runner per variant (name -> :func:`build_jax_runner` options, ``spec`` among them to
    replace the section's), compiled in turn, timed interleaved, closed; their step results and raw times."""
    runners = []
    try:
        for name, options in variants.items():
            log(f"{section}: compiling {name}")
            options = dict(options)
            runner_spec = options.pop("spec", spec)
            runners.append(
                build_jax_runner(
                    name,
                    runner_spec,
                    dtype_name,
                    "finch_adamw",
                    mesh_text=spec.mesh,
                    devices=spec_devices(spec),
                    **options,
                )
            )
        times = _time_runners(runners, spec, section)
    finally:
        for r in runners:
            r.close()
        _release_memory()
    return [step_result(r.name, r.compile_s, times[r.name], r.info, **counts) for r in runners], times


def run_remat_section(spec: BenchSpec, dtype_name: str, *, tokens: int, step_flops: float, peak: float) -> dict:
    """The model's ``remat`` x ``scan_layers`` choices side by side: compile time, step time, memory."""
    variants = {
        f"remat={'on' if remat else 'off'} scan={'on' if scan else 'off'}": {"remat": remat, "scan": scan}
        for remat in (False, True)
        for scan in (False, True)
    }
    counts = {"tokens": tokens, "step_flops": step_flops, "peak": peak}
    results, _ = _side_by_side(spec, dtype_name, "remat", variants, counts)
    best = min(results, key=lambda r: r["median_s"])
    return {
        "results": results,
        "fastest": best["name"],
        "fastest_compile": min(results, key=lambda r: r["compile_s"])["name"],
    }


def run_lora_section(spec: BenchSpec, dtype_name: str, *, tokens: int, step_flops: float, peak: float) -> dict:
    """Full fine-tuning (``base``) against LoRA of ``--lora-rank`` on every projection, both ``finch_adamw`` on the
    same batch, timed side by side; the ratio below 1 means the LoRA step is faster. MFU counts the model's FLOPs
    for both (what the step computes for the base model; the adapters' few FLOPs are not counted)."""
    names = ["base", f"lora r={spec.lora_rank}"]
    variants = {name: {"lora_rank": rank} for name, rank in zip(names, (0, spec.lora_rank))}
    counts = {"tokens": tokens, "step_flops": step_flops, "peak": peak}
    results, times = _side_by_side(spec, dtype_name, "lora", variants, counts)
    return {
        "results": results,
        "ratios_to_base": {names[1]: ratio_of_medians(times[names[1]], times["base"])},
        "fastest": min(results, key=lambda r: r["median_s"])["name"],
        "load_average": list(os.getloadavg()),
    }


def run_variants_section(
    spec: BenchSpec, dtype_name: str, *, tokens: int, step_flops: float, peak: float
) -> dict[str, Any]:
    """The spec's model (``base``) and each ``--variant`` of it, all in ``finch_adamw`` steps timed side by side:
    compile time, step time, memory, and each variant's step-time ratio to the base (below 1 = faster)."""
    names = ["base", *spec.variants]
    variants = {name: {"spec": spec if name == "base" else variant_spec(spec, name)} for name in names}
    counts = {"tokens": tokens, "step_flops": step_flops, "peak": peak}
    results, times = _side_by_side(spec, dtype_name, "variants", variants, counts)
    ratios = {name: ratio_of_medians(times[name], times["base"]) for name in names[1:]}
    return {
        "results": results,
        "ratios_to_base": ratios,
        "fastest": min(results, key=lambda r: r["median_s"])["name"],
        "load_average": list(os.getloadavg()),
    }


def run_trees_section(
    spec: BenchSpec, timeout_s: float, *, tokens: int, step_flops: float, peak: float
) -> dict[str, Any]:
    """The same step from two or more checkouts of this repository (a code change and the tree before it), one
    worker each, timed side by side; step-time ratios to the first tree (below 1 = faster)."""
    trees = [str(Path(t).resolve()) for t in spec.trees]
    # Workers are keyed by position, so one checkout given twice (an A/A run: the noise floor) stays two runners.
    labels = [f"{i + 1}:{tree}" for i, tree in enumerate(trees)]
    jobs = [
        (label, {"spec": spec_to_json(spec), "layouts": ["single"]}, worker_env(1, "", source=tree))
        for label, tree in zip(labels, trees)
    ]
    ready, times = run_worker_section("trees", jobs, spec, timeout_s)
    results = worker_results(ready, times, tokens=tokens, step_flops=step_flops, peak=peak)
    by_label = dict(zip(labels, trees))
    for r in results:
        r["label"] = r.pop("worker")
        r["name"] = by_label[r["label"]]
    out: dict[str, Any] = {"results": results, "ratios_to_first": {}, "load_average": list(os.getloadavg())}
    base = (labels[0], "single")
    if base in times:
        for (label, runner), t in times.items():
            if (label, runner) != base:
                out["ratios_to_first"][label] = ratio_of_medians(t, times[base])
    return out


def run_flags_section(
    spec: BenchSpec, timeout_s: float, *, tokens: int, step_flops: float, peak: float
) -> dict[str, Any]:
    """One worker per XLA flag set (single device), all timed interleaved; MFU against the main process's peak."""
    jobs = [
        (name, {"spec": spec_to_json(spec), "layouts": ["single"]}, worker_env(1, FLAG_SETS[name]))
        for name in dict.fromkeys(spec.flag_sets)
    ]
    ready, times = run_worker_section("flags", jobs, spec, timeout_s)
    results = worker_results(ready, times, tokens=tokens, step_flops=step_flops, peak=peak)
    for r in results:
        r["flag_set"] = r.pop("worker")
        r["xla_flags"] = FLAG_SETS[r["flag_set"]]
    ok = [r for r in results if "median_s" in r]
    out: dict[str, Any] = {"results": results, "fastest": None, "ratios_to_default": {}}
    if ok:
        out["fastest"] = min(ok, key=lambda r: r["median_s"])["flag_set"]
    base = ("default", "single")
    if base in times:
        for (name, runner), t in times.items():
            if (name, runner) != base:  # step-time ratio: below 1 = faster than the default flags
                out["ratios_to_default"][name] = ratio_of_medians(t, times[base])
    return out


def run_malloc_section(
    spec: BenchSpec, timeout_s: float, *, tokens: int, step_flops: float, peak: float
) -> dict[str, Any]:
    """The JAX step (single device) under each allocator of ``spec.mallocs`` (train/malloc.py), one worker process
    per allocator, all timed interleaved. An allocator whose library is not installed is a result saying so.

    Memory: a worker under tcmalloc or jemalloc keeps its step's temporaries between its turns (5.95 GB for
    SmolLM2-135M at 4 x 512 tokens), which is the point; so this section holds that much per such allocator at once,
    and PyTorch is not in it (the ``torch`` section pairs it with JAX under the allocator the run started with).
    """
    _release_memory()  # what the earlier sections left in this process's allocator
    jobs, missing = [], []
    job = {"spec": spec_to_json(spec), "layouts": ["single"], "dtype": compute_dtype_name(spec, "cpu")}
    for name in dict.fromkeys(spec.mallocs):
        library = None if name == "system" else malloc.find_library(name)
        if name != "system" and library is None:
            missing.append({"worker": name, "error": f"not installed: none of {', '.join(malloc.LIBRARIES[name])}"})
            continue
        jobs.append((name, job, malloc.preload_env(worker_env(1, ""), name, library)))
    ready, times = run_worker_section("malloc", jobs, spec, timeout_s)
    results = worker_results(ready, times, tokens=tokens, step_flops=step_flops, peak=peak) + missing
    reported = {w["label"]: w.get("malloc") for w in ready}  # what each worker found itself running with
    for r in results:
        label = r.pop("worker")
        r["malloc"] = reported.get(label, label)
        r["label"] = f"jax finch_adamw under {r['malloc']}"
    out: dict[str, Any] = {"dtype": job["dtype"], "results": results, "ratios_to_system": {}}
    for (label, runner), t in times.items():  # step-time ratio: below 1 = faster than the system malloc
        if label != "system" and ("system", runner) in times:
            out["ratios_to_system"][label] = ratio_of_medians(t, times[("system", runner)])
    return out


def run_scaling_section(
    spec: BenchSpec, timeout_s: float, *, tokens: int, step_flops: float, peak: float
) -> dict[str, Any]:
    """One worker per simulated device count, each holding the data / fsdp / tensor layouts; all interleaved."""
    jobs = []
    for n in dict.fromkeys(spec.scaling_devices):
        layouts = ["single"] if n == 1 else list(spec.scaling_layouts)
        jobs.append((f"{n} dev", {"spec": spec_to_json(spec), "layouts": layouts}, worker_env(n, "")))
    ready, times = run_worker_section("scaling", jobs, spec, timeout_s)
    results = worker_results(ready, times, tokens=tokens, step_flops=step_flops, peak=peak)
    for r in results:
        label = r.pop("worker")
        r.setdefault("layout", r.get("name", label))
    return {
        "results": results,
        "note": "simulated CPU devices share the machine's cores: this measures the cost of partitioning, "
        "not a speed-up",
    }


# Which model FLOPs (models.flops parts) each matmul class of the profile does: its achieved FLOP/s.
_CLASS_FLOPS = {
    PROJ: ("attention_projections",),
    MLP: ("mlp",),
    ATTN: ("attention_scores", "attention_values"),
    LMHEAD: ("lm_head",),
}


def _class_rates(split: dict[str, Any], forward_per_token: dict[str, float], tokens: int) -> dict[str, float]:
    """Achieved FLOP/s of each matmul class: its training FLOPs (3x forward) over its profiled seconds."""
    rates = {}
    for cls, parts in _CLASS_FLOPS.items():
        secs = split["seconds"].get(cls, 0.0)
        if secs > 0:
            rates[cls] = 3 * tokens * sum(forward_per_token[p] for p in parts) / secs
    return rates


def run_profile_section(
    spec: BenchSpec, dtype_name: str, *, forward_per_token: dict[str, float], tokens: int
) -> dict[str, Any]:
    """Where each framework's step spends its time, by op class: the JAX ``finch_adamw`` step (XLA's per-op trace,
    in this process) and, in a worker, PyTorch eager (``torch.profiler``); ``--profile-steps`` steps each, after
    the warm-up."""
    out: dict[str, Any] = {"steps": spec.profile_steps, "load_average_before": list(os.getloadavg())}
    runner = _compile_jax(spec, dtype_name, "finch_adamw")
    try:
        for _ in range(max(spec.warmup, 1)):
            runner.step()
        log(f"profile: tracing {spec.profile_steps} JAX steps")
        out["jax"] = runner.profile(spec.profile_steps)
        out["jax"]["matmul_flops_per_s"] = _class_rates(out["jax"], forward_per_token, tokens)
    finally:
        runner.close()
        _release_memory()
    if "eager" in spec.torch_modes:
        name = "torch eager"
        job = {"spec": spec_to_json(spec), "layouts": [name], "dtype": dtype_name}
        worker = Worker(name, job, worker_env(1, "", platform=None), max(600.0, spec.max_minutes * 60))
        try:
            ready = worker.receive()["ready"]
            if ready["errors"]:
                out["torch"] = {"error": ready["errors"][0]["error"]}
            else:
                worker.run(name, max(spec.warmup, 1))
                log(f"profile: profiling {spec.profile_steps} PyTorch eager steps")
                out["torch"] = worker.profile(name, spec.profile_steps)
                out["torch"]["matmul_flops_per_s"] = _class_rates(out["torch"], forward_per_token, tokens)
        except BenchError as e:
            out["torch"] = {"error": str(e)[:500]}
        finally:
            worker.close()
    out["load_average_after"] = list(os.getloadavg())
    return out


def run_matmuls_section(spec: BenchSpec, cfg: Any, timeout_s: float) -> dict[str, Any]:
    """The model's forward matmul shapes (M = the batch's tokens) timed alone: PyTorch in one worker, JAX in one
    worker per XLA flag set (``--flag-sets``), each in float32 and bfloat16. The workers take turns round by round
    (``--rounds``); each keeps its best GFLOP/s per shape and dtype over the rounds (``--matmul-iters`` calls a
    round). Answers "what can this CPU's kernels do at the model's shapes", the ceiling of each framework's step."""
    shapes = matmul_shapes(
        cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.mlp_dim, cfg.vocab_size,
        spec.batch_size * spec.seq_len,
    )  # fmt: skip
    jobs = [
        ("torch", {"spec": spec_to_json(spec), "layouts": [], "dtype": "float32"}, worker_env(1, "", platform=None))
    ]
    jobs += [
        (f"jax {name}", {"spec": spec_to_json(spec), "layouts": []}, worker_env(1, FLAG_SETS[name]))
        for name in dict.fromkeys(spec.flag_sets)
    ]
    best: dict[str, dict[str, dict[str, float]]] = {}
    errors: dict[str, str] = {}
    workers: list[tuple[str, Worker]] = []
    try:
        for label, job, env in jobs:
            log(f"matmuls: starting worker {label}")
            worker = Worker(label, job, env, timeout_s)
            try:
                worker.receive()
            except BenchError as e:
                worker.close()
                errors[label] = str(e)[:500]
                continue
            workers.append((label, worker))
        for rnd in range(spec.rounds):
            for label, worker in workers:
                log(f"matmuls: round {rnd + 1}/{spec.rounds}: {label}")
                framework = label.split()[0]
                try:
                    rates = worker.matmuls(framework, shapes, MATMUL_DTYPES, spec.matmul_iters)
                except BenchError as e:  # a flag set that crashes XLA on one of the shapes
                    errors[label] = str(e)[:500]
                    continue
                for shape, by_dtype in rates.items():
                    for dtype, rate in by_dtype.items():
                        kept = best.setdefault(label, {}).setdefault(shape, {})
                        kept[dtype] = max(kept.get(dtype, 0.0), rate)
    finally:
        for _, worker in workers:
            worker.close()
    return {
        "shapes": {name: list(mkn) for name, mkn in shapes.items()},
        "gflops": best,
        "best_jax_flag_set": _best_flag_sets(best),
        "errors": errors,
        "iters": spec.matmul_iters,
        "rounds": spec.rounds,
        "load_average": list(os.getloadavg()),
    }


def _best_flag_sets(best: dict[str, dict[str, dict[str, float]]]) -> dict[str, str | None]:
    """Per dtype, the JAX flag set with the highest geometric mean GFLOP/s over the shapes."""
    out: dict[str, str | None] = {}
    for dtype in MATMUL_DTYPES:
        means = {
            label: statistics.geometric_mean([by[dtype] for by in rates.values()])
            for label, rates in best.items()
            if label.startswith("jax ") and all(dtype in by and by[dtype] > 0 for by in rates.values())
        }
        out[dtype] = max(means, key=means.get).split(" ", 1)[1] if means else None
    return out

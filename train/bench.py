r"""``python -m train bench``: step throughput, MFU, FINCH's overhead, scaling, and the PyTorch side, in one run.

Absolute step times drift on a shared machine, so everything this benchmark concludes is a *ratio measured side by
side*: the runners of a section take turns (A B A B ...) for several rounds, each step is timed on its own, and a
ratio is reported as the ratio of medians together with the spread of the per-round ratios.

Sections (``--sections``):

``step``     the JAX train step users run (:func:`train.step.make_train_step` with ``finch_adamw``): compile time,
             median step time, tokens/s, model FLOPs per token (:mod:`train.flops`), achieved FLOP/s and MFU against
             a matmul peak measured in this run in the compute dtype, compiled and peak device memory.
``finch``    the same step with ``optax.adamw`` (via :func:`train.optimizers.make_optimizer`), interleaved with
             ``finch_adamw``: the FINCH/AdamW step-time ratio.
``torch``    ``transformers``' model of the same config with ``torch.optim.AdamW``, eager and ``torch.compile``,
             interleaved with the JAX runners: the JAX/PyTorch tokens/s ratio (same optimizer, dtype, batch).
``remat``    the model's ``remat`` x ``scan_layers`` choices side by side: compile time, step time, memory.
``flags``    XLA CPU flag sets (``--flag-sets``): one worker process each (XLA reads its flags once per process),
             the workers' steps still interleaved A B A B through a small stdin/stdout protocol.
``scaling``  1, 2, 4, 8 simulated devices (one worker process per count) x data / fsdp / tensor meshes,
             interleaved the same way.

Before anything heavy runs, the benchmark estimates its own duration from the measured peak and refuses (with the
options that shrink it) when the estimate exceeds ``--max-minutes``. Results go to a JSON file (``--out``) and a short
table on stdout.

Examples::

  python -m train bench                                    # SmolLM2-135M, 4 x 512 tokens, step+finch+torch
  python -m train bench --preset tiny --batch-size 8 --seq-len 64 --sections step,finch --out /tmp/b.json
  python -m train bench --sections flags,remat --override num_layers=4
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from train import flops as flops_lib

__all__ = [
    "BenchError",
    "BenchSpec",
    "BenchTooLong",
    "Runner",
    "FLAG_SETS",
    "SECTIONS",
    "estimate_seconds",
    "interleaved",
    "main",
    "measure_matmul_peak",
    "ratio_of_medians",
    "run_bench",
    "summarize_times",
    "throughput",
]

SECTIONS = ("step", "finch", "torch", "remat", "flags", "scaling")
DEFAULT_SECTIONS = ("step", "finch", "torch")
LAYOUTS = ("data", "fsdp", "tensor")
SCHEMA_VERSION = 1

# Named XLA CPU flag sets for the ``flags`` section. XLA parses XLA_FLAGS once per process, so each set runs in its
# own subprocess. An unknown flag aborts that subprocess and is reported as that set's error.
FLAG_SETS: dict[str, str] = {
    "default": "",
    "xnn-greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "xnn-greedy-slinky": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY_SLINKY",
    "xnn-bypass-cost": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_BYPASS_COST_MODEL",
    "no-xnnpack": "--xla_cpu_use_xnnpack=false",
    "onednn": "--xla_cpu_use_onednn=true",
    "fast-math": "--xla_cpu_enable_fast_math=true",
}
DEFAULT_FLAG_SETS = ("default", "xnn-greedy", "xnn-greedy-slinky", "onednn", "no-xnnpack")

# Rough costs used only by the up-front duration estimate (seconds); calibrated on a 2-core Xeon, generous.
_ESTIMATE_EFFICIENCY = 0.45  # assumed fraction of the matmul peak a step reaches
_JAX_COMPILE_BASE_S, _JAX_COMPILE_PER_LAYER_S = 4.0, 1.2
_TORCH_COMPILE_BASE_S, _TORCH_COMPILE_PER_LAYER_S = 45.0, 4.0
_SUBPROCESS_START_S = 10.0


class BenchError(ValueError):
    """A benchmark request that cannot run as given (unknown preset, mesh/batch mismatch, bad option)."""


class BenchTooLong(BenchError):
    """The up-front estimate exceeds ``--max-minutes``."""


# ----------------------------------------------------------------------------------------------------------------
# The request
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """What to benchmark. Field names match the command-line flags (``--batch-size`` -> ``batch_size``)."""

    preset: str = "smollm2-135m"
    overrides: tuple[str, ...] = ()  # model config fields, "key=value"
    batch_size: int = 4
    seq_len: int = 512
    dtype: str = "auto"  # compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU
    mesh: str = "data=-1"
    devices: int = 0  # use the first N devices (0 = all)
    remat: bool = False
    scan_layers: bool = False
    sections: tuple[str, ...] = DEFAULT_SECTIONS
    warmup: int = 1
    rounds: int = 4
    steps: int = 1  # timed steps per runner per round (1: the finest interleaving, most robust to drift)
    torch_modes: tuple[str, ...] = ("eager", "compile")
    scaling_devices: tuple[int, ...] = (1, 2, 4, 8)
    scaling_layouts: tuple[str, ...] = LAYOUTS
    flag_sets: tuple[str, ...] = DEFAULT_FLAG_SETS
    max_minutes: float = 60.0
    seed: int = 0
    peak_sizes: tuple[int, ...] = ()  # square matmul sizes for the peak (empty = 1024,2048 on CPU, 4096,8192 else)


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=2,tensor=2"`` -> sizes; missing axes are 1 (``data`` is -1 when nothing is given)."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    if not text.strip():
        return {"data": -1, "fsdp": 1, "tensor": 1}
    for item in text.split(","):
        if "=" not in item:
            raise BenchError(f"--mesh item {item!r} is not axis=size; axes: {', '.join(sizes)}")
        axis, value = (s.strip() for s in item.split("=", 1))
        if axis not in sizes:
            raise BenchError(f"--mesh axis {axis!r} is unknown; axes: {', '.join(sizes)}")
        try:
            sizes[axis] = int(value)
        except ValueError:
            raise BenchError(f"--mesh {axis}={value!r} is not an integer") from None
    return sizes


def _parse_override(item: str, cfg: Any) -> tuple[str, Any]:
    if "=" not in item:
        raise BenchError(f"--override {item!r} is not key=value")
    key, text = (s.strip() for s in item.split("=", 1))
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    if key not in fields or key in ("dtype", "param_dtype"):
        valid = sorted(k for k in fields if k not in ("dtype", "param_dtype", "rope_scaling"))
        raise BenchError(f"--override {key!r} is not a model config field; valid: {', '.join(valid)}")
    current = getattr(cfg, key)
    try:
        if isinstance(current, bool):
            value: Any = {"true": True, "false": False, "1": True, "0": False}[text.lower()]
        elif isinstance(current, int):
            value = int(text)
        elif isinstance(current, float):
            value = float(text)
        else:
            value = text
    except (KeyError, ValueError):
        raise BenchError(f"--override {key}={text!r}: expected a {type(current).__name__}") from None
    return key, value


def compute_dtype_name(spec: BenchSpec, backend: str) -> str:
    if spec.dtype == "auto":
        return "float32" if backend == "cpu" else "bfloat16"
    if spec.dtype not in ("float32", "bfloat16"):
        raise BenchError(f"--dtype {spec.dtype!r} is not one of auto, float32, bfloat16")
    return spec.dtype


def model_config(spec: BenchSpec, dtype_name: str, *, remat: bool | None = None, scan: bool | None = None) -> Any:
    """The ``models.ModelConfig`` of the preset with overrides, compute dtype and remat/scan applied."""
    import jax.numpy as jnp

    import models

    if spec.preset not in models.PRESETS:
        raise BenchError(f"unknown model preset {spec.preset!r}; available: {', '.join(sorted(models.PRESETS))}")
    cfg = models.get_preset(spec.preset)
    replace = dict(_parse_override(item, cfg) for item in spec.overrides)
    replace.update(
        dtype=getattr(jnp, dtype_name),
        param_dtype=jnp.float32,
        remat=spec.remat if remat is None else remat,
        scan_layers=spec.scan_layers if scan is None else scan,
    )
    try:
        cfg = dataclasses.replace(cfg, **replace)
    except (ValueError, TypeError) as e:
        raise BenchError(f"--override: {e}") from None
    if spec.seq_len > cfg.max_position_embeddings:
        raise BenchError(
            f"--seq-len {spec.seq_len} exceeds {spec.preset}'s max_position_embeddings={cfg.max_position_embeddings}"
        )
    return cfg


def validate(spec: BenchSpec, num_devices: int) -> None:
    """Cheap checks of the whole request, so nothing heavy starts on a request that cannot finish."""
    if spec.batch_size <= 0 or spec.seq_len <= 0:
        raise BenchError(f"--batch-size and --seq-len must be positive, got {spec.batch_size} and {spec.seq_len}")
    if spec.rounds < 1 or spec.steps < 1 or spec.warmup < 0:
        raise BenchError(
            f"need --rounds >= 1, --steps >= 1, --warmup >= 0; got {spec.rounds}, {spec.steps}, {spec.warmup}"
        )
    bad = [s for s in spec.sections if s not in SECTIONS]
    if bad or not spec.sections:
        raise BenchError(f"--sections {','.join(spec.sections)!r}: unknown {bad}; choose from {', '.join(SECTIONS)}")
    bad = [m for m in spec.torch_modes if m not in ("eager", "compile")]
    if bad:
        raise BenchError(f"--torch-modes: unknown {bad}; choose from eager, compile")
    bad = [f for f in spec.flag_sets if f not in FLAG_SETS]
    if bad:
        raise BenchError(f"--flag-sets: unknown {bad}; known: {', '.join(FLAG_SETS)}")
    bad = [layout for layout in spec.scaling_layouts if layout not in LAYOUTS]
    if bad:
        raise BenchError(f"--scaling-layouts: unknown {bad}; choose from {', '.join(LAYOUTS)}")
    if any(n < 1 for n in spec.scaling_devices):
        raise BenchError(f"--scaling-devices must be positive, got {spec.scaling_devices}")
    model_config(spec, "float32")  # unknown preset / bad override / too long a sequence
    if spec.devices < 0 or spec.devices > num_devices:
        raise BenchError(f"--devices {spec.devices}: this process has {num_devices} device(s) (0 = all)")
    mesh_sizes(spec.mesh, spec.devices or num_devices, spec.batch_size)


def mesh_sizes(mesh_text: str, num_devices: int, batch_size: int) -> dict[str, int]:
    """Resolves -1 and checks the mesh against the devices and the batch; clear errors otherwise."""
    sizes = parse_mesh(mesh_text)
    if any(v == 0 or v < -1 for v in sizes.values()) or list(sizes.values()).count(-1) > 1:
        raise BenchError(f"--mesh {mesh_text!r}: sizes must be positive with at most one -1")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    for axis, v in sizes.items():
        if v == -1:
            if num_devices % fixed:
                raise BenchError(f"--mesh {mesh_text!r}: {num_devices} devices do not divide by {fixed}")
            sizes[axis] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise BenchError(
            f"--mesh {mesh_text!r} needs {math.prod(sizes.values())} devices but {num_devices} are available "
            f"(on CPU, simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N)"
        )
    data_parallel = sizes["data"] * sizes["fsdp"]
    if batch_size % data_parallel:
        raise BenchError(
            f"--batch-size {batch_size} does not divide by the data-parallel size data*fsdp={data_parallel} "
            f"of --mesh {mesh_text!r}"
        )
    return sizes


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


def summarize_times(times: Sequence[float]) -> dict[str, float]:
    """Median, spread and extremes of step times (seconds).

    ``spread`` is the interquartile range relative to the median (0.02 = the middle half of the steps lies within
    a 2% band).
    """
    if not times:
        raise ValueError("summarize_times needs at least one time")
    xs = sorted(float(t) for t in times)
    median = statistics.median(xs)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {
        "n": len(xs),
        "median_s": median,
        "mean_s": statistics.fmean(xs),
        "min_s": xs[0],
        "max_s": xs[-1],
        "iqr_s": q3 - q1,
        "spread": (q3 - q1) / median if median > 0 else 0.0,
    }


def interleaved(
    steps: Mapping[str, Callable[[], None]],
    *,
    rounds: int,
    steps_per_round: int,
    progress: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[list[float]]]:
    """Times every runner's step in turns: round r runs A x k, B x k, ... and records each step's seconds.

    Args:
      steps: name -> a function that runs one step to completion (blocks until the device is done).
      rounds: number of A B ... rounds.
      steps_per_round: consecutive steps per runner per round.
      progress: called with a short description before each runner's turn.
      clock: the time source (a parameter so tests can drive it).

    Returns:
      name -> ``[rounds][steps_per_round]`` step times in seconds.
    """
    times: dict[str, list[list[float]]] = {name: [] for name in steps}
    for r in range(rounds):
        for name, step in steps.items():
            if progress is not None:
                progress(f"round {r + 1}/{rounds}: {name}")
            this_round = []
            for _ in range(steps_per_round):
                start = clock()
                step()
                this_round.append(clock() - start)
            times[name].append(this_round)
    return times


def ratio_of_medians(numerator: Sequence[Sequence[float]], denominator: Sequence[Sequence[float]]) -> dict[str, Any]:
    """``median(numerator) / median(denominator)`` over all steps, and the per-round ratios as its spread.

    Both arguments are ``[rounds][steps]`` times from :func:`interleaved`, so round r of each ran back to back.
    """
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("ratio_of_medians needs the same non-zero number of rounds on both sides")
    flat_n = [t for rnd in numerator for t in rnd]
    flat_d = [t for rnd in denominator for t in rnd]
    per_round = [statistics.median(n) / statistics.median(d) for n, d in zip(numerator, denominator)]
    return {
        "ratio": statistics.median(flat_n) / statistics.median(flat_d),
        "round_ratios": per_round,
        "low": min(per_round),
        "high": max(per_round),
    }


def throughput(tokens_per_step: int, flops_per_step: float, step_s: float, peak_flops_per_s: float | None) -> dict:
    """Tokens/s, achieved FLOP/s and MFU from a step time."""
    if step_s <= 0:
        raise ValueError(f"step time must be positive, got {step_s}")
    out = {
        "tokens_per_s": tokens_per_step / step_s,
        "achieved_flops_per_s": flops_per_step / step_s,
        "mfu": None,
    }
    if peak_flops_per_s:
        out["mfu"] = flops_lib.mfu(flops_per_step, step_s, peak_flops_per_s)
    return out


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Peak: a large matmul in the compute dtype, on this machine, in this run
# ----------------------------------------------------------------------------------------------------------------


def measure_matmul_peak(dtype_name: str, *, sizes: Sequence[int] | None = None, iters: int = 5) -> dict[str, Any]:
    """Median FLOP/s of a jit-compiled square matmul on the first device, for each size; the best is the peak.

    On CPU the simulated devices share the same cores, so this single-device figure is the machine's peak; on
    accelerators the run's peak is this times the number of devices.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    device = jax.devices()[0]
    if sizes is None:
        sizes = (1024, 2048) if device.platform == "cpu" else (4096, 8192)
    dtype = getattr(jnp, dtype_name)
    matmul = jax.jit(lambda a, b: a @ b)
    by_size = {}
    for n in sizes:
        rng = np.random.default_rng(n)
        a = jax.device_put(jnp.asarray(rng.standard_normal((n, n), np.float32), dtype), device)
        b = jax.device_put(jnp.asarray(rng.standard_normal((n, n), np.float32), dtype), device)
        compiled = matmul.lower(a, b).compile()
        compiled(a, b).block_until_ready()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            compiled(a, b).block_until_ready()
            times.append(time.perf_counter() - start)
        by_size[str(n)] = 2.0 * n**3 / statistics.median(times)
        del a, b
    per_device = max(by_size.values())
    num = 1 if device.platform == "cpu" else jax.device_count()
    return {
        "dtype": dtype_name,
        "iters": iters,
        "flops_per_s_by_size": by_size,
        "per_device_flops_per_s": per_device,
        "devices_counted": num,
        "peak_flops_per_s": per_device * num,
    }


def build_peak_probe(dtype_name: str, size: int, calls: int = 3) -> tuple[Runner, float]:
    """A runner whose "step" is ``calls`` square matmuls: interleaved with the train steps, it measures the peak
    under the same load as the steps, so MFU is itself a ratio measured side by side.

    Returns:
      ``(runner, flops_per_step)``.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    device = jax.devices()[0]
    rng = np.random.default_rng(size)
    a = jax.device_put(jnp.asarray(rng.standard_normal((size, size), np.float32), getattr(jnp, dtype_name)), device)
    compiled = jax.jit(lambda x, y: x @ y).lower(a, a).compile()
    compiled(a, a).block_until_ready()

    def step() -> None:
        for _ in range(calls):
            compiled(a, a).block_until_ready()

    return Runner(
        name="matmul peak probe", step=step, compile_s=None, info={"size": size, "calls": calls, "dtype": dtype_name}
    ), calls * 2.0 * size**3


# ----------------------------------------------------------------------------------------------------------------
# Runners: one step of one implementation, ready to time
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Runner:
    """A compiled step with its state, ready to be called; ``step()`` blocks until the device is done."""

    name: str
    step: Callable[[], None]
    compile_s: float | None
    info: dict[str, Any]
    close: Callable[[], None] = lambda: None


def _synthetic_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(batch_size, seq_len + 1), dtype=np.int32)
    return {
        "tokens": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": np.ones((batch_size, seq_len), np.float32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy(),
        "segment_ids": np.ones((batch_size, seq_len), np.int32),
    }


def _memory_analysis(compiled: Any) -> dict[str, int] | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if m is None:
        return None
    fields = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "temp_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    return {f: int(getattr(m, f)) for f in fields if hasattr(m, f)}


def _xla_flops(compiled: Any) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def build_jax_runner(
    name: str,
    model_cfg: Any,
    optimizer: str,
    *,
    batch_size: int,
    seq_len: int,
    mesh_text: str,
    seed: int = 0,
    devices: Sequence[Any] | None = None,
) -> Runner:
    """The train step users run (:func:`train.step.make_train_step`), sharded over a mesh, on a synthetic batch."""
    import jax
    from flax import nnx

    import models
    from train import config as train_config
    from train import mesh as mesh_lib
    from train import optimizers
    from train import step as step_lib

    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(mesh_text, len(devices), batch_size)
    mesh = mesh_lib.make_mesh(train_config.MeshConfig(**sizes), devices)
    model = models.CausalLM(model_cfg, rngs=nnx.Rngs(seed))
    apply_fn, params, _ = step_lib.split_model(model)
    params_sh = mesh_lib.param_shardings(params, models.logical_axes(model), mesh, mesh_lib.parse_rules())
    opt_cfg = train_config.OptimizerConfig(name=optimizer)
    tx = optimizers.make_optimizer(opt_cfg)
    state, state_sh = step_lib.create_train_state(params, tx, mesh=mesh, params_shardings=params_sh, seed=seed)
    del model, params
    train_step = step_lib.make_train_step(apply_fn, tx, opt_cfg, mesh=mesh, state_shardings=state_sh)
    batch = jax.device_put(
        _synthetic_batch(model_cfg.vocab_size, batch_size, seq_len, seed), mesh_lib.batch_sharding(mesh)
    )
    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def step() -> None:
        new_state, metrics = compiled(holder["state"], batch)
        jax.block_until_ready((new_state, metrics))
        holder["state"] = new_state

    def close() -> None:
        holder.clear()

    info = {
        "framework": "jax",
        "optimizer": optimizer,
        "mesh": sizes,
        "devices": len(devices),
        "compiled_memory": _memory_analysis(compiled),
        "xla_flops_per_device": _xla_flops(compiled),  # XLA's own count (elementwise included), per device
        "remat": bool(model_cfg.remat),
        "scan_layers": bool(model_cfg.scan_layers),
    }
    return Runner(name=name, step=step, compile_s=compile_s, info=info, close=close)


def build_torch_runner(
    name: str, model_cfg: Any, mode: str, *, batch_size: int, seq_len: int, dtype_name: str, seed: int = 0
) -> Runner:
    """``transformers``' model of the same config + ``torch.optim.AdamW``; eager or ``torch.compile``.

    The same numerics as the JAX side: fp32 params and optimizer state, matmuls in ``dtype_name`` (bf16 via
    autocast), fp32 loss. ``compile_s`` is the first step's time minus a steady step's (compilation is lazy).
    """
    import numpy as np
    import torch
    import transformers

    hf = dict(model_cfg.to_hf_config())
    hf.pop("torch_dtype", None)
    hf.pop("architectures", None)
    model_type = hf.pop("model_type")
    hf["max_position_embeddings"] = max(hf["max_position_embeddings"], seq_len)
    config = transformers.AutoConfig.for_model(model_type, **hf)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    ids = torch.from_numpy(_synthetic_batch(model_cfg.vocab_size, batch_size, seq_len, seed)["tokens"]).long()
    ids = ids.to(device)
    if mode == "compile":
        # One inductor compile worker: a pool per core would hold gigabytes next to the benchmark's own models.
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    forward = torch.compile(model) if mode == "compile" else model
    autocast = (
        (lambda: torch.autocast(device, dtype=torch.bfloat16)) if dtype_name == "bfloat16" else contextlib.nullcontext
    )

    def step() -> None:
        with autocast():
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    start = time.perf_counter()
    step()
    second = time.perf_counter() - start
    info = {
        "framework": "torch",
        "mode": mode,
        "optimizer": "torch.optim.AdamW",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
        "first_step_s": first,
        "params": int(sum(int(np.prod(p.shape)) for p in model.parameters())),
    }

    def close() -> None:
        nonlocal model, optimizer, forward
        del model, optimizer, forward

    return Runner(name=name, step=step, compile_s=max(first - second, 0.0), info=info, close=close)


# ----------------------------------------------------------------------------------------------------------------
# The duration estimate
# ----------------------------------------------------------------------------------------------------------------


def estimate_seconds(spec: BenchSpec, model_cfg: Any, peak_flops_per_s: float) -> dict[str, float]:
    """A deliberately rough upper-side estimate of each section's duration, from FLOPs and the measured peak."""
    shape = flops_lib.shape_of(model_cfg)
    step_flops = flops_lib.training_flops_per_step(shape, spec.batch_size, spec.seq_len)
    step_s = step_flops / (peak_flops_per_s * _ESTIMATE_EFFICIENCY) + 0.01
    layers = 1 if spec.scan_layers else model_cfg.num_layers
    jax_compile = _JAX_COMPILE_BASE_S + _JAX_COMPILE_PER_LAYER_S * layers
    timed = spec.warmup + spec.rounds * spec.steps
    jax_runner = jax_compile + timed * step_s
    est: dict[str, float] = {}
    if "step" in spec.sections or "finch" in spec.sections:
        est["step"] = jax_runner
    if "finch" in spec.sections or "torch" in spec.sections:
        est["finch"] = jax_runner  # the adamw runner (also the torch comparison's JAX side)
    if "torch" in spec.sections:
        torch_s = 0.0
        for mode in spec.torch_modes:
            compile_s = _TORCH_COMPILE_BASE_S + _TORCH_COMPILE_PER_LAYER_S * model_cfg.num_layers
            # the PyTorch steps plus the JAX adamw reference steps interleaved with them
            torch_s += (compile_s if mode == "compile" else 0.0) + (timed + 1) * step_s * 1.3 + timed * step_s
        est["torch"] = torch_s
    if "remat" in spec.sections:
        est["remat"] = 4 * jax_runner * 1.2
    if "flags" in spec.sections:
        est["flags"] = len(set(spec.flag_sets)) * (_SUBPROCESS_START_S + jax_runner * 1.2)
    if "scaling" in spec.sections:
        layouts = sum(1 if n == 1 else len(spec.scaling_layouts) for n in spec.scaling_devices)
        est["scaling"] = len(spec.scaling_devices) * _SUBPROCESS_START_S + layouts * jax_runner * 1.5
    est["total"] = sum(est.values())
    return est


def _shrink_advice(spec: BenchSpec, est: dict[str, float]) -> str:
    parts = sorted(((v, k) for k, v in est.items() if k != "total"), reverse=True)
    lines = [f"  {k}: ~{v / 60:.1f} min" for v, k in parts]
    advice = [
        f"--sections with fewer of {','.join(spec.sections)} (e.g. --sections step,finch)",
        f"--rounds {max(1, spec.rounds - 1)} or --steps 1 (now {spec.rounds} x {spec.steps})",
        f"--batch-size / --seq-len smaller (now {spec.batch_size} x {spec.seq_len})",
        "--torch-modes eager (torch.compile compiles for minutes on a CPU)",
        "--override num_layers=N, or --preset tiny",
        f"--max-minutes larger (now {spec.max_minutes:g})",
    ]
    return "\n".join(lines) + "\nshrink it with:\n" + "\n".join(f"  {a}" for a in advice)


# ----------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------


def _runner_result(runner: Runner, times: list[list[float]], tokens: int, flops: float, peak: float | None) -> dict:
    summary = summarize_times([t for rnd in times for t in rnd])
    return {
        "name": runner.name,
        "compile_s": runner.compile_s,
        **summary,
        "round_medians_s": [statistics.median(r) for r in times],
        **throughput(tokens, flops, summary["median_s"], peak),
        **runner.info,
    }


def _time_runners(runners: list[Runner], spec: BenchSpec, label: str) -> dict[str, list[list[float]]]:
    for runner in runners:
        for _ in range(spec.warmup):
            runner.step()
    _log(f"{label}: timing {', '.join(r.name for r in runners)} interleaved, {spec.rounds} rounds x {spec.steps} steps")
    return interleaved(
        {r.name: r.step for r in runners},
        rounds=spec.rounds,
        steps_per_round=spec.steps,
        progress=lambda msg: _log(f"{label}: {msg}"),
    )


def _device_memory() -> dict[str, Any] | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keys if k in stats}


def _devices(spec: BenchSpec) -> list[Any]:
    import jax

    devices = jax.devices()
    return devices[: spec.devices] if spec.devices else devices


def _timed_steps(step: Callable[[], None], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        out.append(time.perf_counter() - start)
    return out


def _release_memory() -> None:
    """Returns freed buffers to the OS between phases, so a later phase's peak is not stacked on an earlier one's."""
    import ctypes
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_main_sections(
    spec: BenchSpec, model_cfg: Any, dtype_name: str, peak_info: dict[str, Any], tokens: int, step_flops: float
) -> tuple[list[dict], dict[str, Any]]:
    """``step``, ``finch`` and ``torch``, in phases that each interleave their runners.

    Phase 1 times ``finch_adamw`` against ``adamw`` (same jit step, same mesh) and a matmul peak probe, which
    becomes the MFU basis (``peak["interleaved_flops_per_s"]``, updated in place). Then, to keep at most one PyTorch
    model in memory, each PyTorch mode gets its own phase, interleaved with the same JAX ``adamw`` runner, which is
    the reference of that mode's tokens/s ratio (AdamW on both sides).
    """
    errors: dict[str, str] = {}
    peak = peak_info["peak_flops_per_s"]
    peak_info["mfu_basis"] = "start of run"
    kwargs = dict(batch_size=spec.batch_size, seq_len=spec.seq_len)
    all_times: dict[str, list[list[float]]] = {}
    runners: dict[str, Runner] = {}
    ratios: dict[str, Any] = {}
    if {"step", "finch"} & set(spec.sections):
        _log(f"compiling JAX step ({spec.preset}, finch_adamw)")
        runners["jax finch_adamw"] = build_jax_runner(
            "jax finch_adamw",
            model_cfg,
            "finch_adamw",
            mesh_text=spec.mesh,
            seed=spec.seed,
            devices=_devices(spec),
            **kwargs,
        )
        _log(f"compiled in {runners['jax finch_adamw'].compile_s:.1f} s")
    if {"finch", "torch"} & set(spec.sections):
        _log("compiling JAX step (adamw)")
        runners["jax adamw"] = build_jax_runner(
            "jax adamw", model_cfg, "adamw", mesh_text=spec.mesh, seed=spec.seed, devices=_devices(spec), **kwargs
        )
        _log(f"compiled in {runners['jax adamw'].compile_s:.1f} s")
    by_size = peak_info["flops_per_s_by_size"]
    probe, probe_flops = build_peak_probe(dtype_name, int(max(by_size, key=by_size.get)))
    probe_times: list[list[float]] = []
    if {"step", "finch"} & set(spec.sections):
        times = _time_runners([*runners.values(), probe], spec, "jax")
        probe_times = times.pop(probe.name)
        for name, t in times.items():
            all_times.setdefault(name, []).extend(t)
        if "jax adamw" in times:
            ratios["finch_over_adamw_step_time"] = ratio_of_medians(times["jax finch_adamw"], times["jax adamw"])
    if probe_times:
        # The peak is re-measured between the steps, under the same load. The MFU basis is the higher of the two
        # measurements: a probe that comes out lower was disturbed (on an idle 2-core VM the between-steps probe
        # read half the start figure while PyTorch's step itself sustained more than the probe), and MFU against a
        # too-low peak flatters every runner.
        probe_fps = probe_flops / statistics.median([t for rnd in probe_times for t in rnd])
        peak_info["interleaved_flops_per_s"] = probe_fps * peak_info["devices_counted"]
        if peak_info["interleaved_flops_per_s"] > peak:
            peak = peak_info["interleaved_flops_per_s"]
            peak_info["mfu_basis"] = "interleaved"
    results = {name: None for name in runners}
    if "jax finch_adamw" in runners:
        finch = runners["jax finch_adamw"]
        results[finch.name] = _runner_result(finch, all_times[finch.name], tokens, step_flops, peak)
        finch.close()
        del runners["jax finch_adamw"]
        _release_memory()
    if "torch" in spec.sections:
        reference = runners["jax adamw"]
        warmed = {"jax finch_adamw", "jax adamw"} & set(all_times)
        for mode in spec.torch_modes:
            name = f"torch {mode}"
            _log(f"building {name} in a worker process (first step{' compiles' if mode == 'compile' else ''})")
            # PyTorch runs in its own process: next to a live XLA CPU client in one process, its eager steps
            # were measured 5x slower than alone, which would flatter JAX.
            job = {"spec": _spec_to_json(spec), "layouts": [name], "dtype": dtype_name}
            env = _worker_env(1, "", platform=None)
            worker = _Worker(name, job, env, max(600.0, spec.max_minutes * 60))
            try:
                ready = worker.receive()["ready"]
                if ready["errors"]:
                    raise BenchError(ready["errors"][0]["error"])
                info = ready["runners"][0]
                if reference.name not in warmed:
                    for _ in range(spec.warmup):
                        reference.step()
                    warmed.add(reference.name)
                if spec.warmup:
                    worker.run(name, spec.warmup)
                times: dict[str, list[list[float]]] = {reference.name: [], name: []}
                for rnd in range(spec.rounds):
                    _log(f"torch: round {rnd + 1}/{spec.rounds}: {reference.name}, {name}")
                    times[reference.name].append(_timed_steps(reference.step, spec.steps))
                    times[name].append(worker.run(name, spec.steps))
            except BenchError as e:
                errors[name] = str(e)[:500]
                _log(f"{name} failed: {errors[name]}")
                continue
            finally:
                worker.close()
            all_times.setdefault(reference.name, []).extend(times[reference.name])
            # tokens/s ratio JAX/torch = step-time ratio torch/JAX, measured side by side in this phase.
            ratios[f"jax_over_torch_{mode}_tokens_per_s"] = ratio_of_medians(times[name], times[reference.name])
            stub = Runner(name=name, step=lambda: None, compile_s=info["compile_s"], info=info["info"])
            results[name] = _runner_result(stub, times[name], tokens, step_flops, peak)
    for runner in runners.values():
        results[runner.name] = _runner_result(runner, all_times[runner.name], tokens, step_flops, peak)
        runner.close()
    _release_memory()
    out = [r for r in results.values() if r is not None]
    out += [{"name": name, "error": msg} for name, msg in errors.items()]
    return out, ratios


def run_remat_section(spec: BenchSpec, dtype_name: str, peak: float, tokens: int, step_flops: float) -> dict:
    runners = []
    for remat in (False, True):
        for scan in (False, True):
            cfg = model_config(spec, dtype_name, remat=remat, scan=scan)
            name = f"remat={'on' if remat else 'off'} scan={'on' if scan else 'off'}"
            _log(f"remat: compiling {name}")
            runners.append(
                build_jax_runner(
                    name,
                    cfg,
                    "finch_adamw",
                    batch_size=spec.batch_size,
                    seq_len=spec.seq_len,
                    mesh_text=spec.mesh,
                    seed=spec.seed,
                    devices=_devices(spec),
                )
            )
    times = _time_runners(runners, spec, "remat")
    results = [_runner_result(r, times[r.name], tokens, step_flops, peak) for r in runners]
    for r in runners:
        r.close()
    best = min(results, key=lambda r: r["median_s"])
    return {
        "results": results,
        "fastest": best["name"],
        "fastest_compile": min(results, key=lambda r: r["compile_s"])["name"],
    }


def _worker_env(device_count: int, xla_flags: str, platform: str | None = "cpu") -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={device_count}")
    flags.extend(xla_flags.split())
    env["XLA_FLAGS"] = " ".join(flags)
    if platform is not None:
        env.setdefault("JAX_PLATFORMS", platform)
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else repo
    return env


_TAG = "BENCH_WORKER "


class _Worker:
    """A ``python -m train.bench --worker`` subprocess holding compiled runners, stepping them on request.

    Protocol (one JSON object per line): the worker prints ``_TAG {"ready": ...}`` once its runners are compiled,
    then answers each ``{"op": "run", "name": N, "steps": k}`` on stdin with ``_TAG {"times": [...]}`` (each step
    timed inside the worker), and exits on ``{"op": "quit"}``. Only one worker computes at any time, so workers
    with different XLA flags or device counts can take turns exactly like in-process runners.
    """

    def __init__(self, label: str, job: dict[str, Any], env: dict[str, str], timeout_s: float):
        import queue
        import tempfile
        import threading

        self.label, self.timeout_s = label, timeout_s
        self._stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, "-m", "train.bench", "--worker", json.dumps(job)]
        self.proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1
        )
        self._lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            for line in self.proc.stdout:
                if line.startswith(_TAG):
                    self._lines.put(line[len(_TAG) :])
            self._lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def _error_tail(self) -> str:
        self._stderr.seek(0)
        tail = [ln for ln in self._stderr.read().strip().splitlines() if ln.strip()][-3:]
        return " | ".join(tail)[:800]

    def receive(self) -> dict[str, Any]:
        import queue

        try:
            line = self._lines.get(timeout=self.timeout_s)
        except queue.Empty:
            self.close()
            raise BenchError(f"worker {self.label}: no answer within {self.timeout_s:.0f} s") from None
        if line is None:
            self.proc.wait()
            raise BenchError(f"worker {self.label} exited with {self.proc.returncode}: {self._error_tail()}")
        return json.loads(line)

    def run(self, name: str, steps: int) -> list[float]:
        self.proc.stdin.write(json.dumps({"op": "run", "name": name, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        return self.receive()["times"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


def _run_worker_section(
    label: str, jobs: list[tuple[str, dict[str, Any], dict[str, str]]], spec: BenchSpec, timeout_s: float
) -> tuple[list[dict[str, Any]], dict[tuple[str, str], list[list[float]]]]:
    """Starts the workers one after another (compiles never overlap), then times all their runners interleaved.

    Returns:
      ``(ready, times)``: each worker's ready message (``{"label", "runners": [...], "errors": [...], ...}`` or
      ``{"label", "error"}``), and ``(worker label, runner name) -> [rounds][steps]`` times.
    """
    workers: list[tuple[_Worker, dict[str, Any]]] = []
    ready_all: list[dict[str, Any]] = []
    try:
        for i, (wlabel, job, env) in enumerate(jobs):
            _log(f"{label}: starting worker {wlabel} ({i + 1}/{len(jobs)}) and compiling")
            worker = _Worker(wlabel, job, env, timeout_s)
            try:
                ready = {"label": wlabel, **worker.receive()["ready"]}
            except BenchError as e:
                worker.close()
                ready_all.append({"label": wlabel, "error": str(e)})
                _log(f"{label}: {e}")
                continue
            ready_all.append(ready)
            workers.append((worker, ready))
            for r in ready["runners"]:
                if spec.warmup:
                    worker.run(r["name"], spec.warmup)
        times: dict[tuple[str, str], list[list[float]]] = {}
        order = [(w, r["name"], ready["label"]) for w, ready in workers for r in ready["runners"]]
        _log(
            f"{label}: timing {len(order)} runners in {len(workers)} workers interleaved, "
            f"{spec.rounds} rounds x {spec.steps} steps"
        )
        for rnd in range(spec.rounds):
            for worker, name, wlabel in order:
                _log(f"{label}: round {rnd + 1}/{spec.rounds}: {wlabel} {name}")
                times.setdefault((wlabel, name), []).append(worker.run(name, spec.steps))
        return ready_all, times
    finally:
        for worker, _ in workers:
            worker.close()


def _worker_results(
    ready_all: list[dict[str, Any]],
    times: dict[tuple[str, str], list[list[float]]],
    tokens: int,
    step_flops: float,
    peak: float | None,
) -> list[dict[str, Any]]:
    results = []
    for ready in ready_all:
        if "error" in ready:
            results.append({"worker": ready["label"], "error": ready["error"]})
            continue
        for r in ready["runners"]:
            t = times[(ready["label"], r["name"])]
            summary = summarize_times([x for rnd in t for x in rnd])
            results.append(
                {
                    "worker": ready["label"],
                    "name": r["name"],
                    "compile_s": r["compile_s"],
                    **summary,
                    "round_medians_s": [statistics.median(x) for x in t],
                    **throughput(tokens, step_flops, summary["median_s"], peak),
                    **r["info"],
                }
            )
        for err in ready.get("errors", []):
            results.append({"worker": ready["label"], **err})
    return results


def run_flags_section(spec: BenchSpec, peak: float, timeout_s: float) -> dict[str, Any]:
    """One worker per XLA flag set (single device), all timed interleaved; MFU against the main process's peak."""
    cfg = model_config(spec, "float32")
    step_flops = flops_lib.training_flops_per_step(flops_lib.shape_of(cfg), spec.batch_size, spec.seq_len)
    jobs = [
        (name, {"spec": _spec_to_json(spec), "layouts": ["single"]}, _worker_env(1, FLAG_SETS[name]))
        for name in dict.fromkeys(spec.flag_sets)
    ]
    ready, times = _run_worker_section("flags", jobs, spec, timeout_s)
    results = _worker_results(ready, times, spec.batch_size * spec.seq_len, step_flops, peak)
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


def run_scaling_section(spec: BenchSpec, peak: float, timeout_s: float) -> dict[str, Any]:
    """One worker per simulated device count, each holding the data / fsdp / tensor layouts; all interleaved."""
    cfg = model_config(spec, "float32")
    step_flops = flops_lib.training_flops_per_step(flops_lib.shape_of(cfg), spec.batch_size, spec.seq_len)
    jobs = []
    for n in dict.fromkeys(spec.scaling_devices):
        layouts = ["single"] if n == 1 else list(spec.scaling_layouts)
        jobs.append((f"{n} dev", {"spec": _spec_to_json(spec), "layouts": layouts}, _worker_env(n, "")))
    ready, times = _run_worker_section("scaling", jobs, spec, timeout_s)
    results = _worker_results(ready, times, spec.batch_size * spec.seq_len, step_flops, peak)
    for r in results:
        label = r.pop("worker")
        r.setdefault("layout", r.get("name", label))
    return {
        "results": results,
        "note": "simulated CPU devices share the machine's cores: this measures the cost of partitioning, "
        "not a speed-up",
    }


def _layout_mesh(layout: str, n: int) -> str:
    return "data=1" if layout == "single" else f"{layout}={n}" + ("" if layout == "data" else ",data=1")


def _worker_main(job: dict[str, Any]) -> None:
    """The worker side of :class:`_Worker`: build the layouts' runners, say ready, step them on request."""
    import jax

    spec = _spec_from_json(job["spec"])
    dtype_name = job.get("dtype") or compute_dtype_name(spec, jax.default_backend())
    cfg = model_config(spec, dtype_name)
    n = jax.device_count()
    runners: dict[str, Runner] = {}
    errors = []
    for layout in job["layouts"]:
        if layout.startswith("torch "):
            try:
                runners[layout] = build_torch_runner(
                    layout,
                    cfg,
                    layout.split()[1],
                    batch_size=spec.batch_size,
                    seq_len=spec.seq_len,
                    dtype_name=dtype_name,
                    seed=spec.seed,
                )
            except Exception as e:  # noqa: BLE001 - torch missing or torch.compile unsupported: report it
                errors.append({"name": layout, "error": f"{type(e).__name__}: {e}"[:500]})
            continue
        mesh_text = _layout_mesh(layout, n)
        try:
            runners[layout] = build_jax_runner(
                layout,
                cfg,
                "finch_adamw",
                batch_size=spec.batch_size,
                seq_len=spec.seq_len,
                mesh_text=mesh_text,
                seed=spec.seed,
                devices=jax.devices()[:1] if layout == "single" else None,
            )
        except Exception as e:  # noqa: BLE001 - a layout that cannot run is a result, not a crash
            errors.append({"name": layout, "devices": n, "layout": layout, "error": f"{type(e).__name__}: {e}"[:500]})
    ready = {
        "runners": [{"name": k, "compile_s": r.compile_s, "info": r.info} for k, r in runners.items()],
        "errors": errors,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    print(_TAG + json.dumps({"ready": ready}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        runner = runners[cmd["name"]]
        times = []
        for _ in range(int(cmd["steps"])):
            start = time.perf_counter()
            runner.step()
            times.append(time.perf_counter() - start)
        print(_TAG + json.dumps({"times": times}), flush=True)


def _spec_to_json(spec: BenchSpec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def _spec_from_json(data: Mapping[str, Any]) -> BenchSpec:
    fields = {f.name: f for f in dataclasses.fields(BenchSpec)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
    return BenchSpec(**values)


# ----------------------------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------------------------


def _meta(argv: Sequence[str] | None) -> dict[str, Any]:
    import flax
    import jax
    import jaxlib
    import optax

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


def run_bench(
    spec: BenchSpec, argv: Sequence[str] | None = None, *, check_time: bool = True, out: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Runs the requested sections and returns the JSON-ready result (see ``docs/bench.md`` for every field).

    With ``out``, the result so far is written there after every section (``"complete": false`` until the end), so
    a run killed by a time limit still leaves what it measured.
    """
    import jax

    validate(spec, jax.device_count())
    backend = jax.default_backend()
    dtype_name = compute_dtype_name(spec, backend)
    cfg = model_config(spec, dtype_name)
    shape = flops_lib.shape_of(cfg)
    tokens = spec.batch_size * spec.seq_len
    forward = flops_lib.forward_flops_per_token(shape, spec.seq_len)
    step_flops = flops_lib.training_flops_per_step(shape, spec.batch_size, spec.seq_len)
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "meta": _meta(argv),
        "spec": _spec_to_json(spec),
        "model": {
            "preset": spec.preset,
            "params": cfg.num_params,
            "matmul_params": flops_lib.matmul_param_count(shape),
            **dataclasses.asdict(shape),
            "compute_dtype": dtype_name,
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
        "estimate_s": None,
        "runners": [],
        "ratios": {},
        "targets": {},
        "remat": None,
        "flags": None,
        "scaling": None,
        "memory": None,
        "wall_s": None,
        "complete": False,
    }

    def checkpoint() -> None:
        result["wall_s"] = time.perf_counter() - wall_start
        result["targets"] = check_targets(result)
        if out is not None:
            write_json(result, out)

    wall_start = time.perf_counter()
    _log(f"measuring the {dtype_name} matmul peak on {backend}")
    peak_info = measure_matmul_peak(dtype_name, sizes=spec.peak_sizes or None)
    peak = peak_info["peak_flops_per_s"]
    result["peak"] = peak_info
    _log(f"peak {peak / 1e9:.1f} GFLOP/s")
    est = estimate_seconds(spec, cfg, peak)
    result["estimate_s"] = est
    _log(
        f"estimated duration ~{est['total'] / 60:.1f} min (limit {spec.max_minutes:g} min): "
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in est.items() if k != "total")
    )
    if check_time and est["total"] > spec.max_minutes * 60:
        raise BenchTooLong(
            f"this benchmark would take ~{est['total'] / 60:.1f} min, over the --max-minutes {spec.max_minutes:g} "
            f"limit:\n{_shrink_advice(spec, est)}"
        )
    checkpoint()
    worker_timeout = max(120.0, spec.max_minutes * 60)
    if {"step", "finch", "torch"} & set(spec.sections):
        runners, ratios = run_main_sections(spec, cfg, dtype_name, peak_info, tokens, step_flops)
        result["runners"] = runners
        result["ratios"] = ratios
        result["memory"] = {
            "device": _device_memory(),
            "host_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        checkpoint()
    if "remat" in spec.sections:
        result["remat"] = run_remat_section(spec, dtype_name, peak, tokens, step_flops)
        checkpoint()
    if "flags" in spec.sections:
        result["flags"] = run_flags_section(spec, peak, worker_timeout)
        checkpoint()
    if "scaling" in spec.sections:
        result["scaling"] = run_scaling_section(spec, peak, worker_timeout)
    result["complete"] = True
    checkpoint()
    return result


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


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _csv(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _int_csv(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = BenchSpec()
    p = argparse.ArgumentParser(
        prog="python -m train bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default=d.preset, help="model preset (models.PRESETS)")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a model config field, e.g. num_layers=4 (repeatable)",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument(
        "--dtype",
        default=d.dtype,
        help="compute dtype: auto (bf16 on GPU/TPU, fp32 on CPU), float32, "
        "bfloat16; params and optimizer state stay float32",
    )
    p.add_argument("--mesh", default=d.mesh, help="e.g. data=-1 or data=2,fsdp=2,tensor=2")
    p.add_argument("--devices", type=int, default=d.devices, help="use the first N devices (0 = all)")
    p.add_argument("--remat", action="store_true", help="rematerialise each block")
    p.add_argument("--scan-layers", action="store_true", help="lax.scan over the layers")
    p.add_argument("--sections", type=_csv, default=d.sections, help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps per runner after compiling")
    p.add_argument("--rounds", type=int, default=d.rounds, help="interleaved A B ... rounds")
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps per runner per round")
    p.add_argument("--torch-modes", type=_csv, default=d.torch_modes, help="eager,compile")
    p.add_argument("--scaling-devices", type=_int_csv, default=d.scaling_devices)
    p.add_argument("--scaling-layouts", type=_csv, default=d.scaling_layouts)
    p.add_argument("--flag-sets", type=_csv, default=d.flag_sets, help=f"names from: {', '.join(FLAG_SETS)}")
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for this process (set before jax starts)")
    p.add_argument(
        "--max-minutes", type=float, default=d.max_minutes, help="refuse to start when the estimate is longer"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--peak-sizes",
        type=_int_csv,
        default=d.peak_sizes,
        help="square matmul sizes for the measured peak (default 1024,2048 on CPU, 4096,8192 on GPU)",
    )
    p.add_argument("--out", default="", help="JSON output path (default runs/bench/<preset>-<time>.json)")
    p.add_argument("--table", default=None, metavar="JSON", help="print the table of an earlier run's JSON and exit")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def spec_from_args(args: argparse.Namespace) -> BenchSpec:
    return BenchSpec(
        preset=args.preset,
        overrides=tuple(args.override),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        dtype=args.dtype,
        mesh=args.mesh,
        devices=args.devices,
        remat=args.remat,
        scan_layers=args.scan_layers,
        sections=tuple(args.sections),
        warmup=args.warmup,
        rounds=args.rounds,
        steps=args.steps,
        torch_modes=tuple(args.torch_modes),
        scaling_devices=tuple(args.scaling_devices),
        scaling_layouts=tuple(args.scaling_layouts),
        flag_sets=tuple(args.flag_sets),
        max_minutes=args.max_minutes,
        seed=args.seed,
        peak_sizes=tuple(args.peak_sizes),
    )


def _apply_xla_flags(extra: str) -> None:
    """Adds flags to XLA_FLAGS; only possible before jax creates its backend, which reads them once."""
    if not extra.strip():
        return
    jax_mod = sys.modules.get("jax")
    if jax_mod is not None:
        from jax._src import xla_bridge

        if getattr(xla_bridge, "_backends", None):
            raise BenchError(
                "--xla-flags must be applied before jax starts its backend; set XLA_FLAGS in the environment instead"
            )
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + extra).strip()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train bench [options]``; returns the exit status (2 for a request that cannot run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        _worker_main(json.loads(args.worker))
        return 0
    if args.table is not None:
        try:
            print(format_table(json.loads(Path(args.table).read_text())))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            print(f"bench: --table {args.table}: cannot read a bench result ({type(e).__name__}: {e})", file=sys.stderr)
            return 2
        return 0
    out = Path(args.out or f"runs/bench/{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    try:
        _apply_xla_flags(args.xla_flags)
        spec = spec_from_args(args)
        result = run_bench(spec, argv, out=out)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

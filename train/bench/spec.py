"""The benchmark request: :class:`BenchSpec`, its validation, the mesh it asks for and the model it names.

Everything here is cheap, so :func:`validate` refuses a request that cannot finish before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

import models

__all__ = [
    "DEFAULT_FLAG_SETS",
    "DEFAULT_SECTIONS",
    "DTYPES",
    "FLAG_SETS",
    "MALLOCS",
    "LAYOUTS",
    "SECTIONS",
    "BenchError",
    "BenchSpec",
    "BenchTooLong",
    "compute_dtype_name",
    "compute_dtypes",
    "mesh_sizes",
    "model_config",
    "model_settings",
    "parse_mesh",
    "spec_from_json",
    "spec_to_json",
    "validate",
    "variant_spec",
]

SECTIONS = (
    "step", "finch", "torch", "profile", "matmuls", "variants", "trees", "remat", "lora", "flags", "malloc", "scaling",
)  # fmt: skip
DTYPES = ("float32", "bfloat16")
DEFAULT_SECTIONS = ("step", "finch", "torch", "profile")
LAYOUTS = ("data", "fsdp", "tensor")

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
    # jaxlib 0.10 sends dots and reductions to YNNPACK by default; these take reductions, or everything, back to
    # XLA's own emitters (Eigen for the dots).
    "ynn-no-reduce": "--xla_cpu_experimental_ynn_fusion_type=-reduce",
    "no-ynn": "--xla_cpu_experimental_ynn_fusion_type=",
    "xnn-dot": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_xnn_fusion_type=dot",
    # The bf16 candidates: oneDNN for the dots (as a library call, as a custom call, or fused), XNNPACK.
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "onednn-custom-call": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "onednn-dot": "--xla_cpu_experimental_onednn_fusion_type=dot",
    "ynn-dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
}
DEFAULT_FLAG_SETS = ("default", "xnn-greedy", "xnn-greedy-slinky", "onednn", "no-xnnpack")
# The ``malloc`` section's allocators (train/malloc.py): each runs in worker processes of its own, since a process's
# allocator is fixed when it starts.
MALLOCS = ("system", "tcmalloc", "jemalloc")


class BenchError(ValueError):
    """A benchmark request that cannot run as given (unknown model, mesh/batch mismatch, bad option)."""


class BenchTooLong(BenchError):
    """The up-front estimate exceeds ``--max-minutes``."""


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """What to benchmark. Field names match the command-line flags (``--batch-size`` -> ``batch_size``)."""

    model: str = "preset:smollm2-135m"  # a model source (models.load_config): its architecture, randomly initialised
    overrides: tuple[str, ...] = ()  # model config fields, "key=value"
    batch_size: int = 4
    seq_len: int = 512
    dtype: str = "auto"  # compute dtype(s), comma-separated: auto = float32,bfloat16 on CPU, bfloat16 on GPU/TPU
    mesh: str = "data=-1"
    devices: int = 0  # use the first N devices (0 = all)
    remat: bool = False
    scan_layers: bool = False
    lora_rank: int = 16  # the ``lora`` section: LoRA of this rank on every projection against full fine-tuning
    variants: tuple[str, ...] = ()  # the ``variants`` section: each "key=value,key=value" of model config overrides
    trees: tuple[str, ...] = ()  # the ``trees`` section: checkouts of this repository whose steps are compared
    sections: tuple[str, ...] = DEFAULT_SECTIONS
    warmup: int = 1
    rounds: int = 4
    steps: int = 1  # timed steps per runner per round (1: the finest interleaving, most robust to drift)
    profile_steps: int = 2  # steps traced per framework by the ``profile`` section
    torch_modes: tuple[str, ...] = ("eager", "compile")
    scaling_devices: tuple[int, ...] = (1, 2, 4, 8)
    scaling_layouts: tuple[str, ...] = LAYOUTS
    flag_sets: tuple[str, ...] = DEFAULT_FLAG_SETS
    mallocs: tuple[str, ...] = ("system", "tcmalloc")  # the ``malloc`` section's allocators (from MALLOCS)
    max_minutes: float = 60.0
    seed: int = 0
    peak_sizes: tuple[int, ...] = ()  # square matmul sizes for the peak (empty = 1024,2048 on CPU, 4096,8192 else)
    matmul_iters: int = 5  # the ``matmuls`` section: calls per shape, dtype and round (the best one counts)


def spec_to_json(spec: BenchSpec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def spec_from_json(data: Mapping[str, Any]) -> BenchSpec:
    fields = {f.name for f in dataclasses.fields(BenchSpec)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
    if "preset" in data and "model" not in data:  # written before 0.2, when the spec named a preset
        values["model"] = f"preset:{data['preset']}"
    return BenchSpec(**values)


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


def _parse_override(item: str, cfg: models.ModelConfig) -> tuple[str, Any]:
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


def compute_dtypes(spec: BenchSpec, backend: str) -> tuple[str, ...]:
    """The compute dtypes the spec asks for, the first one primary (the only one of the sections that run a single
    dtype: profile, variants, trees, remat, lora, flags, scaling). ``auto``: float32 then bfloat16 on CPU (which
    has no bf16 matmul units to speak of, but users ask), bfloat16 on accelerators."""
    if spec.dtype == "auto":
        return DTYPES if backend == "cpu" else ("bfloat16",)
    names = tuple(dict.fromkeys(d.strip() for d in spec.dtype.split(",") if d.strip()))
    bad = [d for d in names if d not in DTYPES]
    if bad or not names:
        raise BenchError(f"--dtype {spec.dtype!r}: each must be one of float32, bfloat16 (or auto)")
    return names


def compute_dtype_name(spec: BenchSpec, backend: str) -> str:
    """The primary compute dtype (:func:`compute_dtypes`' first)."""
    return compute_dtypes(spec, backend)[0]


def _base_config(spec: BenchSpec) -> models.ModelConfig:
    try:
        return models.load_config(spec.model)
    except models.ConfigError as e:
        raise BenchError(f"--model: {e}") from None


def model_settings(
    spec: BenchSpec, dtype_name: str, *, remat: bool | None = None, scan: bool | None = None
) -> dict[str, Any]:
    """The keyword arguments of :func:`models.load_config` for the spec's model: the ``--override`` fields, the
    compute dtype (params stay float32) and remat/scan (the spec's unless given)."""
    base = _base_config(spec)
    settings = {"remat": spec.remat, "scan_layers": spec.scan_layers}  # --override remat=... wins over --remat
    settings.update(_parse_override(item, base) for item in spec.overrides)
    settings.update(dtype=getattr(jnp, dtype_name), param_dtype=jnp.float32)
    if remat is not None:
        settings["remat"] = remat
    if scan is not None:
        settings["scan_layers"] = scan
    return settings


def variant_spec(spec: BenchSpec, variant: str) -> BenchSpec:
    """The spec with one ``--variant``'s overrides ("key=value,key=value") added after its own."""
    items = tuple(item.strip() for item in variant.split(",") if item.strip())
    if not items:
        raise BenchError(f"--variant {variant!r} names no key=value override")
    return dataclasses.replace(spec, overrides=spec.overrides + items)


def model_config(
    spec: BenchSpec, dtype_name: str, *, remat: bool | None = None, scan: bool | None = None
) -> models.ModelConfig:
    """The ``models.ModelConfig`` of the spec's model (see :func:`model_settings`)."""
    settings = model_settings(spec, dtype_name, remat=remat, scan=scan)
    try:
        cfg = models.load_config(spec.model, **settings)
    except (ValueError, TypeError) as e:
        raise BenchError(f"--override: {e}") from None
    if spec.seq_len > cfg.max_position_embeddings:
        raise BenchError(
            f"--seq-len {spec.seq_len} exceeds {spec.model}'s max_position_embeddings={cfg.max_position_embeddings}"
        )
    return cfg


def validate(spec: BenchSpec, num_devices: int) -> None:
    """Cheap checks of the whole request, so nothing heavy starts on a request that cannot finish."""
    if spec.batch_size <= 0 or spec.seq_len <= 0:
        raise BenchError(f"--batch-size and --seq-len must be positive, got {spec.batch_size} and {spec.seq_len}")
    if not spec.max_minutes > 0:
        raise BenchError(f"--max-minutes must be > 0, got {spec.max_minutes}")
    if spec.seed < 0:
        raise BenchError(f"--seed must be >= 0, got {spec.seed}")
    if spec.rounds < 1 or spec.steps < 1 or spec.warmup < 0 or spec.profile_steps < 1:
        raise BenchError(
            "need --rounds >= 1, --steps >= 1, --warmup >= 0, --profile-steps >= 1; got "
            f"{spec.rounds}, {spec.steps}, {spec.warmup}, {spec.profile_steps}"
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
    bad = [m for m in spec.mallocs if m not in MALLOCS]
    if bad or ("malloc" in spec.sections and not spec.mallocs):
        raise BenchError(f"--mallocs: unknown {bad}; choose from {', '.join(MALLOCS)}")
    bad = [layout for layout in spec.scaling_layouts if layout not in LAYOUTS]
    if bad:
        raise BenchError(f"--scaling-layouts: unknown {bad}; choose from {', '.join(LAYOUTS)}")
    compute_dtypes(spec, "cpu")  # a bad --dtype
    if spec.matmul_iters < 1:
        raise BenchError(f"--matmul-iters must be >= 1, got {spec.matmul_iters}")
    if spec.lora_rank < 1:
        raise BenchError(f"--lora-rank must be >= 1, got {spec.lora_rank}")
    if any(n < 1 for n in spec.scaling_devices):
        raise BenchError(f"--scaling-devices must be positive, got {spec.scaling_devices}")
    model_config(spec, "float32")  # unknown model / bad override / too long a sequence
    for variant in spec.variants:
        model_config(variant_spec(spec, variant), "float32")
    if "variants" in spec.sections and not spec.variants:
        raise BenchError("--sections variants needs at least one --variant KEY=VALUE[,KEY=VALUE...]")
    if "trees" in spec.sections and len(spec.trees) < 2:
        raise BenchError("--sections trees needs --trees with two or more checkouts, e.g. --trees /tmp/before,.")
    for tree in spec.trees:
        if not (Path(tree) / "train" / "bench" / "worker.py").is_file():
            raise BenchError(f"--trees: {tree!r} is not a checkout of this repository (no train/bench/worker.py)")
    if spec.devices < 0 or spec.devices > num_devices:
        raise BenchError(f"--devices {spec.devices}: this process has {num_devices} device(s) (0 = all)")
    mesh_sizes(spec.mesh, spec.devices or num_devices, spec.batch_size)

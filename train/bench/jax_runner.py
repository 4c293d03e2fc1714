"""The JAX runner: the train step users run, built the way ``finetune`` builds it, on a random-init preset model.

Model from ``models.load("preset:...")``, optimizer from :func:`train.optimizers.make_optimizer`, step from
:func:`train.step.make_train_step`, sharded by :mod:`train.mesh`; plus what XLA reports about the compiled step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax

import models
from train import mesh as mesh_lib
from train import optimizers
from train import step as step_lib
from train.bench.profile_xla import profile_jax_step
from train.bench.runner import Runner, synthetic_batch
from train.bench.spec import BenchSpec, mesh_sizes, model_settings
from train.config import MeshConfig, OptimizerConfig

__all__ = ["build_jax_runner", "device_memory", "spec_devices"]


def spec_devices(spec: BenchSpec) -> list[Any]:
    """The devices the spec asks for (``--devices N``: the first N; 0: all)."""
    devices = jax.devices()
    return devices[: spec.devices] if spec.devices else devices


def device_memory() -> dict[str, Any] | None:
    """The first device's memory counters (``peak_bytes_in_use`` ...), where the backend reports them (GPU)."""
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keys if k in stats}


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
    spec: BenchSpec,
    dtype_name: str,
    optimizer: str,
    *,
    mesh_text: str,
    devices: Sequence[Any] | None = None,
    remat: bool | None = None,
    scan: bool | None = None,
) -> Runner:
    """The spec's model and batch in :func:`train.step.make_train_step` with ``optimizer``, sharded over a mesh.

    Args:
      name: the runner's name in the results.
      spec: the request (preset, overrides, batch size, sequence length, seed).
      dtype_name: compute dtype; params and optimizer state stay float32.
      optimizer: a :func:`train.optimizers.make_optimizer` name (``finch_adamw``, ``adamw``).
      mesh_text: ``--mesh`` syntax, checked against ``devices`` and the batch.
      devices: default all devices.
      remat, scan: the model's ``remat`` / ``scan_layers`` (default: the spec's).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(mesh_text, len(devices), spec.batch_size)
    mesh = mesh_lib.make_mesh(MeshConfig(**sizes), devices)
    settings = model_settings(spec, dtype_name, remat=remat, scan=scan)
    model, _ = models.load(f"preset:{spec.preset}", seed=spec.seed, **settings)
    model_cfg = model.config
    apply_fn, params, _ = step_lib.split_model(model)
    params_sh = mesh_lib.param_shardings(params, models.logical_axes(model), mesh, mesh_lib.parse_rules())
    tx = optimizers.make_optimizer(OptimizerConfig(name=optimizer))
    state, state_sh = step_lib.create_train_state(params, tx, mesh=mesh, params_shardings=params_sh, seed=spec.seed)
    del model, params
    train_step = step_lib.make_train_step(apply_fn, tx, mesh=mesh, state_shardings=state_sh)
    batch = synthetic_batch(model_cfg.vocab_size, spec.batch_size, spec.seq_len, spec.seed)
    batch = jax.device_put(batch, mesh_lib.batch_sharding(mesh))
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

    def profile(steps: int) -> dict[str, Any]:
        return profile_jax_step(step, compiled.as_text(), steps=steps)

    return Runner(name=name, step=step, compile_s=compile_s, info=info, close=close, profile=profile)

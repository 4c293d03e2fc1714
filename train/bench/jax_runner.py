"""The JAX runner: the train step users run, from the builder ``finetune`` uses (:func:`train.program.build_program`),
on a randomly initialised model of the spec's architecture; plus what XLA reports about the compiled step (:mod:`train.xla_analysis`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

import models
from train import xla_analysis
from train.bench.profile_xla import profile_jax_step
from train.bench.runner import Runner, synthetic_batch
from train.bench.spec import BenchSpec, mesh_sizes, model_config
from train.config import DataConfig, LoraSettings, MeshConfig, ModelSettings, OptimizerConfig, TrainConfig
from train.program import build_program, with_adapters

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
    lora_rank: int = 0,
) -> Runner:
    """The spec's model and batch in :func:`train.step.make_train_step` with ``optimizer``, sharded over a mesh.

    Args:
      name: the runner's name in the results.
      spec: the request (model, overrides, batch size, sequence length, seed).
      dtype_name: compute dtype; params and optimizer state stay float32.
      optimizer: a :func:`train.optimizers.make_optimizer` name (``finch_adamw``, ``adamw``).
      mesh_text: ``--mesh`` syntax, checked against ``devices`` and the batch.
      devices: default all devices.
      remat, scan: the model's ``remat`` / ``scan_layers`` (default: the spec's).
      lora_rank: > 0: train LoRA adapters of this rank on every projection (alpha 2 × rank), the base frozen.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(mesh_text, len(devices), spec.batch_size)
    model_cfg = model_config(spec, dtype_name, remat=remat, scan=scan)
    model = models.CausalLM(model_cfg, rngs=nnx.Rngs(spec.seed))
    if lora_rank:
        model = with_adapters(model, ModelSettings(lora=LoraSettings(rank=lora_rank, alpha=2.0 * lora_rank)))
    cfg = TrainConfig(
        optimizer=OptimizerConfig(name=optimizer),
        mesh=MeshConfig(**sizes),
        data=DataConfig(batch_size=spec.batch_size, seq_len=spec.seq_len),
        seed=spec.seed,
    )
    program, params, frozen = build_program(cfg, model, devices=devices)
    state = program.init_state(params, frozen)
    del model, params, frozen
    batch = synthetic_batch(model_cfg.vocab_size, spec.batch_size, spec.seq_len, spec.seed)
    batch = jax.device_put(batch, program.batch_sharding)
    start = time.perf_counter()
    compiled = program.step.compile(state, batch)
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
        "compiled_memory": xla_analysis.memory(compiled.compiled),
        "xla_flops_per_device": (xla_analysis.costs(compiled.compiled) or {}).get("flops"),  # elementwise too
        "lora_rank": lora_rank,
        "remat": bool(model_cfg.remat),
        "scan_layers": bool(model_cfg.scan_layers),
    }

    def profile(steps: int) -> dict[str, Any]:
        return profile_jax_step(step, compiled.compiled.as_text(), steps=steps)

    return Runner(name=name, step=step, compile_s=compile_s, info=info, close=close, profile=profile)

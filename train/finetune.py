"""Fine-tuning run: config → model, data, mesh, optimizer → jit steps with checkpoints and metrics.

``python -m train finetune --config run.yaml optimizer.learning_rate=1e-4 ...`` runs it from the shell;
:func:`run` is the same from Python and also accepts an already-loaded model, so one process can fine-tune several
copies of one base model with different methods (the forgetting lab does that).

Everything that can be wrong with the input (config keys, data files, sizes, mesh, an incompatible checkpoint) is
checked before the first step, and an existing checkpoint directory is only ever read until the first new save.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

import models
from train import config as config_lib
from train import data as data_lib
from train import distributed
from train import mesh as mesh_lib
from train import step as step_lib
from train.checkpoint import Checkpointer, CheckpointError
from train.config import ConfigError, TrainConfig
from train.metrics_log import DelayedMetrics, MetricsLogger
from train.optimizers import make_optimizer

__all__ = ["FinetuneResult", "load_model", "main", "run"]


@dataclasses.dataclass
class FinetuneResult:
    """What a run produced, in memory.

    Attributes:
      state: the final :class:`train.step.TrainState` (device arrays, sharded like training).
      params: ``state.params``.
      model: the NNX model rebuilt with the final params (``None`` in multi-process runs, where params span hosts).
      tokenizer: the tokenizer the data was encoded with.
      metrics: one dict per step trained in this call (``step``, ``loss``, ``lr``, ``grad_norm``, ``tokens``, ...).
      lr_trace: the learning rate each of those steps applied (replay it with ``optimizer.schedule=trace``).
      start_step: the step training (re)started from (> 0 after a resume).
      config: the config that ran.
    """

    state: step_lib.TrainState
    params: Any
    model: Any
    tokenizer: Any
    metrics: list[dict[str, float]]
    lr_trace: list[float]
    start_step: int
    config: TrainConfig

    @property
    def losses(self) -> list[float]:
        return [m["loss"] for m in self.metrics]


def load_model(settings: config_lib.ModelSettings) -> tuple[Any, Any]:
    """The model and tokenizer ``settings.source`` names (see :func:`models.load`), at the configured precision."""
    return models.load(
        settings.source,
        dtype=settings.dtype,
        param_dtype=settings.param_dtype,
        seed=settings.init_seed,
        remat=settings.remat,
        scan_layers=settings.scan_layers,
    )


def _model_context(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None)


def _check_sizes(cfg: TrainConfig, mesh: jax.sharding.Mesh) -> None:
    dp = mesh_lib.data_parallel_size(mesh)
    d = cfg.data
    if cfg.steps < 0:
        raise ConfigError(f"steps must be >= 0, got {cfg.steps}")
    if d.grad_accum < 1:
        raise ConfigError(f"data.grad_accum must be >= 1, got {d.grad_accum}")
    if d.batch_size % (d.grad_accum * dp):
        raise ConfigError(
            f"data.batch_size={d.batch_size} must be divisible by data.grad_accum={d.grad_accum} × the data-parallel "
            f"size {dp} (mesh data={mesh.shape['data']} × fsdp={mesh.shape['fsdp']})"
        )
    if cfg.l2sp_weight < 0:
        raise ConfigError(f"l2sp_weight must be >= 0, got {cfg.l2sp_weight}")
    if cfg.checkpoint.every < 0:
        raise ConfigError(f"checkpoint.every must be >= 0, got {cfg.checkpoint.every}")


def _global_batch(host_batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
    """Host batch → global device arrays; each process contributes only the rows its devices hold."""
    host_batch = step_lib.host_batch_arrays(host_batch)
    shape = host_batch["tokens"].shape
    rows = data_lib.local_rows(sharding, shape)
    return {k: jax.make_array_from_process_local_data(sharding, v[rows], v.shape) for k, v in host_batch.items()}


def run(
    cfg: TrainConfig,
    model: Any = None,
    tokenizer: Any = None,
    *,
    documents: Sequence[data_lib.Document] | None = None,
    on_step: Callable[[int, step_lib.TrainState], None] | None = None,
    transform_rows: Callable[[data_lib.PackedRows], data_lib.PackedRows] | None = None,
) -> FinetuneResult:
    """Fine-tunes ``model`` (or the one ``cfg.model`` names) for ``cfg.steps`` steps.

    Args:
      cfg: the run's config.
      model: an NNX ``models.CausalLM`` to start from (it is not modified); loaded from ``cfg.model`` if ``None``.
      tokenizer: its tokenizer (required with ``model``).
      documents: in-memory training documents used instead of ``cfg.data.train_files``.
      on_step: called as ``on_step(step, state)`` after each update is dispatched (and its checkpoint save
        started); ``step`` counts updates from 1. Reading ``state`` there waits for the device.
      transform_rows: applied once to the packed rows before training, e.g. to re-weight ``loss_mask``
        (STM-style suppression of tokens the base model finds too surprising).

    Returns:
      A :class:`FinetuneResult` with the final params/model, per-step metrics and the lr trace.

    Raises:
      ConfigError, DataError, ShardingError, CheckpointError: bad input, before any training step.
    """
    total = cfg.steps
    tx = make_optimizer(cfg.optimizer, total_steps=total)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    _check_sizes(cfg, mesh)
    rules = mesh_lib.parse_rules(cfg.mesh.rules)
    if model is None:
        model, tokenizer = load_model(cfg.model)
    elif tokenizer is None:
        raise ValueError("finetune.run(cfg, model=...) also needs the model's tokenizer")
    rows = data_lib.build_rows(tokenizer, cfg.data, max_context=_model_context(model), documents=documents)
    if transform_rows is not None:
        rows = transform_rows(rows)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and int(rows.tokens.max()) >= vocab:
        raise data_lib.DataError(f"token id {int(rows.tokens.max())} is outside the model's vocabulary of {vocab}")
    loader = data_lib.ResumableLoader(rows, cfg.data.batch_size, seed=cfg.data.seed)

    apply_fn, params, merge = step_lib.split_model(model)
    params_shardings = mesh_lib.param_shardings(params, models.logical_axes(model), mesh, rules)
    l2sp = cfg.l2sp_weight > 0

    # Resume: validate the checkpoint before building anything big on the devices.
    checkpointer = None
    resume_step = None
    if cfg.checkpoint.directory:
        checkpointer = Checkpointer(
            cfg.checkpoint.directory, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
        )
        latest = checkpointer.latest_step()
        if latest is not None and not cfg.checkpoint.resume:
            raise CheckpointError(
                f"checkpoint.directory={cfg.checkpoint.directory!r} already holds checkpoints (steps "
                f"{checkpointer.all_steps()}) and checkpoint.resume=false; pick an empty directory"
            )
        resume_step = latest

    state, state_shardings = step_lib.create_train_state(
        params, tx, mesh=mesh, params_shardings=params_shardings, seed=cfg.seed, l2sp=l2sp
    )
    start_step = 0
    if resume_step is not None:
        target = step_lib.abstract_like(state_shardings, jax.eval_shape(lambda s: s, state))
        # Programs on simulated/in-process devices share one collective rendezvous pool: never let the init or
        # restore programs overlap the first training step.
        jax.block_until_ready(state)
        del state  # free the fresh state before the restored one lands in the same shardings
        state, meta = checkpointer.restore(resume_step, target)
        jax.block_until_ready(state)
        loader.load_state_dict(meta["loader"])
        start_step = int(meta["step"])

    step_fn = step_lib.make_train_step(
        apply_fn,
        tx,
        grad_accum=cfg.data.grad_accum,
        l2sp_weight=cfg.l2sp_weight,
        mesh=mesh,
        state_shardings=state_shardings,
    )
    batch_sharding = mesh_lib.batch_sharding(mesh)

    output_dir = cfg.output_dir or None
    if output_dir and jax.process_index() == 0:
        os.makedirs(output_dir, exist_ok=True)
        config_lib.save_config(cfg, os.path.join(output_dir, "config.yaml"))
    logger = MetricsLogger(
        output_dir,
        total_steps=total,
        start_step=start_step,
        tensorboard=cfg.tensorboard,
        progress=cfg.progress,
        append=start_step > 0,
    )
    delayed = DelayedMetrics(logger)
    meta_base = {"config": config_lib.to_dict(cfg)}

    def save(step: int) -> None:
        if checkpointer is not None and step not in checkpointer.all_steps():
            # Let the step finish first, so the save's device-to-host copies never interleave with a running step's
            # collectives; the file writes still happen in the background while the next steps run.
            jax.block_until_ready(state)
            checkpointer.save(step, state, dict(meta_base, loader=loader.state_dict()))

    try:
        logger.start_clock()
        for step in range(start_step, total):
            batch = _global_batch(loader.next_batch(), batch_sharding)
            state, metrics = step_fn(state, batch)
            delayed.push(step + 1, metrics)
            if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 and step + 1 < total:
                save(step + 1)
            if on_step is not None:
                on_step(step + 1, state)
        delayed.flush()
        if total > start_step:
            save(total)
    finally:
        if checkpointer is not None:
            checkpointer.close()
        logger.close()

    final_model = merge(state.params) if jax.process_count() == 1 else None
    return FinetuneResult(
        state=state,
        params=state.params,
        model=final_model,
        tokenizer=tokenizer,
        metrics=logger.records,
        lr_trace=[r["lr"] for r in logger.records],
        start_step=start_step,
        config=cfg,
    )


def build_parser(prog: str = "finch-train finetune") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune a causal LM with FINCH (or a baseline) on text/JSONL data.",
        epilog="Overrides: section.key=value, e.g. optimizer.learning_rate=1e-4 data.train_files=[a.jsonl]. "
        "Valid keys: " + ", ".join(config_lib.valid_keys()),
    )
    parser.add_argument("--config", default=None, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    distributed.add_distributed_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_lib.load_config(args.config, args.overrides)
    distributed.initialize_from_args(args)
    t0 = time.perf_counter()
    result = run(cfg)
    if jax.process_index() == 0:
        if result.metrics:
            last = result.metrics[-1]
            print(
                f"trained steps {result.start_step}..{cfg.steps} in {time.perf_counter() - t0:.1f}s; "
                f"final loss {last['loss']:.4f}, lr {last['lr']:.3g}"
            )
        else:
            print(f"nothing to train: the checkpoint is already at step {result.start_step} >= steps={cfg.steps}")
    return 0

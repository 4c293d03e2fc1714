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
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import yaml

import models
from train import config as config_lib
from train import data as data_lib
from train import distributed, run_folder, runlock
from train import export as export_lib
from train import guard as guard_lib
from train import mesh as mesh_lib
from train import resume as resume_lib
from train import step as step_lib
from train import summary as summary_lib
from train.checkpoint import Checkpointer, CheckpointError, CheckpointSaveError, CorruptCheckpointError
from train.config import ConfigError, TrainConfig
from train.metrics_log import DelayedMetrics, MetricsLogger
from train.optimizers import make_optimizer
from train.preemption import EXIT_CODE as PREEMPTED_EXIT_CODE
from train.preemption import Preempted, PreemptionWatch
from train.stderr_filter import EventLoopNoiseFilter
from train.validation import Validator

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
      config: the config that ran (``output.dir`` and ``checkpoint.directory`` filled in).
      validation: ``(step, validation loss)`` pairs, when ``data.validation_files`` are set.
      hf_dir: the Hugging Face export of the final model (``None`` with ``output.hf_export=false``).
    """

    state: step_lib.TrainState
    params: Any
    model: Any
    tokenizer: Any
    metrics: list[dict[str, float]]
    lr_trace: list[float]
    start_step: int
    config: TrainConfig
    validation: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    hf_dir: str | None = None

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
        remat_policy=settings.remat_policy,
        scan_layers=settings.scan_layers,
        attention_impl=settings.attention_impl,
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

    Files go to the run folder (``output.dir``, default ``runs/<model>-<data>``): see :mod:`train.run_folder`.

    Raises:
      ConfigError, DataError, ShardingError, CheckpointError: bad input, before any training step.
      RunLockedError, UnwritableDirectoryError: another run holds the run folder, or it cannot be written.
      DivergenceError: ``guard.max_consecutive_skips`` steps in a row had a NaN/inf loss or gradient.
      Preempted: SIGTERM arrived; a checkpoint of the last step was saved first (resume loses nothing).
      CheckpointSaveError: a checkpoint could not be written (e.g. disk full), within a step of the failure.
    """
    cfg = run_folder.resolve(cfg, in_memory_documents=documents is not None)
    config_lib.check_ranges(cfg)
    # One writer per run folder, taken before anything is loaded: a second run is refused at once.
    written = [cfg.output.dir] + ([cfg.checkpoint.directory] if cfg.checkpoint.enabled else [])
    with runlock.hold(written if jax.process_index() == 0 else []), PreemptionWatch() as preemption:
        return _run(cfg, model, tokenizer, documents, on_step, transform_rows, preemption)


def _run(cfg, model, tokenizer, documents, on_step, transform_rows, preemption: PreemptionWatch) -> FinetuneResult:
    total = cfg.steps
    tx = make_optimizer(cfg.optimizer, total_steps=total)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    _check_sizes(cfg, mesh)
    rules = mesh_lib.parse_rules(cfg.mesh.rules)
    model_name = f"{cfg.model.source} (given to finetune.run)" if model is not None else cfg.model.source
    if model is None:
        model, tokenizer = load_model(cfg.model)
    elif tokenizer is None:
        raise ValueError("finetune.run(cfg, model=...) also needs the model's tokenizer")
    train_split = data_lib.load_split(
        tokenizer, cfg.data, cfg.data.train_files, documents=documents, max_context=_model_context(model)
    )
    rows = train_split.rows
    if transform_rows is not None:
        rows = transform_rows(rows)
    data_fingerprint = resume_lib.rows_fingerprint(rows)
    val_split = None
    if cfg.data.validation_files:
        val_split = data_lib.load_split(
            tokenizer, cfg.data, cfg.data.validation_files, max_context=_model_context(model), what="validation"
        )
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    for split_rows in (rows, None if val_split is None else val_split.rows):
        if vocab is not None and split_rows is not None and int(split_rows.tokens.max()) >= vocab:
            raise data_lib.DataError(
                f"token id {int(split_rows.tokens.max())} is outside the model's vocabulary of {vocab}"
            )
    # The template chats were rendered with, when it is not the tokenizer's own: checkpoints and exports keep it.
    chat_template = None
    if cfg.data.chat_template:
        with open(cfg.data.chat_template, encoding="utf-8") as f:
            chat_template = f.read()
    loader = data_lib.ResumableLoader(rows, cfg.data.batch_size, seed=cfg.data.seed)

    apply_fn, params, merge = step_lib.split_model(model)
    params_shardings = mesh_lib.param_shardings(params, models.logical_axes(model), mesh, rules)
    l2sp = cfg.l2sp_weight > 0

    # Resume: validate the checkpoint before building anything big on the devices.
    checkpointer = None
    resume_step = None
    if cfg.checkpoint.enabled and cfg.checkpoint.directory:
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
    config_changes: list = []  # settings that differ from the checkpoint's run, when accepted
    if resume_step is None:
        guard_lib.check_finite_params(state.params, model_name)  # NaN weights would make every step a skip
    else:
        target = step_lib.abstract_like(state_shardings, jax.eval_shape(lambda s: s, state))
        # Programs on simulated/in-process devices share one collective rendezvous pool: never let the init or
        # restore programs overlap the first training step.
        jax.block_until_ready(state)
        del state  # free the fresh state before the restored one lands in the same shardings

        def same_run(step: int, meta: dict) -> None:
            config_changes[:] = resume_lib.check_same_run(
                meta, config_lib.to_dict(cfg), data_fingerprint, step=step, accept=cfg.checkpoint.accept_config_change
            )

        resume_step, state, meta, corrupt = checkpointer.restore_newest(
            target, fall_back=cfg.checkpoint.on_corrupt == "previous", before_restore=same_run
        )
        for bad in corrupt:  # only with on_corrupt=previous: moved aside, so new saves can take their steps
            print(f"checkpoint: moved corrupt step {bad} to {checkpointer.quarantine(bad)}", flush=True)
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

    output_dir = cfg.output.dir
    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(output_dir, exist_ok=True)
        if config_changes:  # accepted on resume: the config the earlier steps ran with stays beside the new one
            resume_lib.keep_previous_config(output_dir, start_step)
        if start_step > 0:  # steps logged after the checkpoint by a run that then died are about to run again
            resume_lib.trim_metrics(output_dir, start_step)
        config_lib.save_config(cfg, os.path.join(output_dir, "config.yaml"))
        if model_name == cfg.model.source and models.parse_source(cfg.model.source).is_random_init:
            print(summary_lib.random_init_warning(cfg.model.source), flush=True)
        uses_chat = any(s.chats for s in train_split.sources)
        print(
            summary_lib.start_summary(
                cfg,
                model_name=model_name,
                params=params,
                params_shardings=params_shardings,
                mesh=mesh,
                train=train_split,
                validation=val_split,
                start_step=start_step,
                chat_template=(cfg.data.chat_template or "the model's chat template") if uses_chat else None,
            ),
            flush=True,
        )
    validator = None
    if val_split is not None:
        validator = Validator(
            apply_fn,
            val_split.rows,
            cfg.data.batch_size // cfg.data.grad_accum,
            lambda batch: _global_batch(batch, batch_sharding),
            params_shardings,
            batch_sharding,
        )
    logger = MetricsLogger(
        output_dir,
        total_steps=total,
        start_step=start_step,
        tensorboard=cfg.tensorboard,
        progress=cfg.progress,
        append=start_step > 0,
    )
    delayed = DelayedMetrics(logger)
    meta_base = {
        "config": config_lib.to_dict(cfg),
        "chat_template": chat_template,
        "data_fingerprint": data_fingerprint,
    }
    skip_watch = guard_lib.SkipWatch(
        cfg.guard.max_consecutive_skips, last_good_step=None if checkpointer is None else checkpointer.latest_step
    )
    validation: list[tuple[int, float]] = []
    hf_dir = run_folder.hf_directory(output_dir) if cfg.output.hf_export else None

    def validate(step: int) -> None:
        jax.block_until_ready(state)  # as for saves: never interleave two programs' collectives
        loss, tokens = validator(state.params)
        validation.append((step, loss))
        logger.log_eval(step, {"val_loss": loss, "val_tokens": tokens})

    def export(step: int | None) -> None:
        # Every process joins the gather; process 0 writes.
        jax.block_until_ready(state)
        host_model = merge(export_lib.host_params(state.params))
        if is_main:
            export_lib.export_hf(
                host_model,
                tokenizer,
                run_folder.hf_directory(output_dir, step),
                dtype=cfg.output.hf_dtype,
                chat_template=chat_template,
            )

    def save(step: int) -> None:
        if checkpointer is not None and step not in checkpointer.all_steps():
            # Let the step finish first, so the save's device-to-host copies never interleave with a running step's
            # collectives; the file writes still happen in the background while the next steps run.
            jax.block_until_ready(state)
            checkpointer.save(step, state, dict(meta_base, loader=loader.state_dict()))

    try:
        if validator is not None and start_step == 0:  # a resumed run's earlier session logged its own
            validate(0)
        t_start = time.perf_counter()
        logger.start_clock()
        for step in range(start_step, total):
            batch = _global_batch(loader.next_batch(), batch_sharding)
            state, metrics = step_fn(state, batch)
            delayed.push(step + 1, metrics)
            skip_watch.check(logger.records)
            if checkpointer is not None:
                checkpointer.check_for_errors()  # a failed background save stops the run now, not `every` steps later
            saved = cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 and step + 1 < total
            if saved:
                save(step + 1)
            if validator is not None and _every(cfg.data.validation_every, step + 1, total):
                validate(step + 1)
            if hf_dir is not None and _every(cfg.output.hf_every, step + 1, total):
                export(step + 1)
            if on_step is not None:
                on_step(step + 1, state)
            if step + 1 < total and preemption.requested(step + 1):
                delayed.flush()
                if checkpointer is None:
                    raise Preempted(
                        f"stopped by SIGTERM after step {step + 1}; checkpoints are off, nothing saved", step + 1
                    )
                if not saved:
                    save(step + 1)
                checkpointer.wait()
                raise Preempted(
                    f"stopped by SIGTERM after step {step + 1}, saved as checkpoint {checkpointer.latest_step()} in "
                    f"{checkpointer.directory}; run the same command again to resume",
                    step + 1,
                )
        delayed.flush()
        skip_watch.check(logger.records)
        seconds = time.perf_counter() - t_start
        if total > start_step:
            save(total)
            if validator is not None:
                validate(total)
        if hf_dir is not None and (total > start_step or not os.path.isdir(hf_dir)):
            export(None)
    finally:
        if checkpointer is not None:
            checkpointer.close()
        logger.close()

    final_model = merge(state.params) if jax.process_count() == 1 else None
    if is_main:
        checkpoint_steps = [] if checkpointer is None else checkpointer.all_steps()
        run_end = summary_lib.RunEnd(cfg, start_step, logger.records, validation, seconds, checkpoint_steps, hf_dir)
        print(run_end.text(), flush=True)
        run_end.write()
    return FinetuneResult(
        state=state,
        params=state.params,
        model=final_model,
        tokenizer=tokenizer,
        metrics=logger.records,
        lr_trace=[r["lr"] for r in logger.records],
        start_step=start_step,
        config=cfg,
        validation=validation,
        hf_dir=hf_dir,
    )


def _every(period: int, step: int, total: int) -> bool:
    """Whether a periodic action falls on ``step`` (the last step has its own, unconditional one)."""
    return period > 0 and step % period == 0 and step < total


def build_parser(prog: str = "finch-train finetune") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune a causal LM with FINCH (or a baseline) on text/JSONL data. Files go to the run "
        "folder, runs/<model>-<data>/ unless output.dir is set: metrics, checkpoints and a Hugging Face export.",
        epilog=config_lib.help_text()
        + "\n\nexample: finch-train finetune --config configs/smollm2-chat.yaml steps=20 optimizer.learning_rate=3e-4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML config file")
    parser.add_argument(
        "--print-config", action="store_true", help="print the merged config (file + overrides) as YAML and exit"
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    distributed.add_distributed_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_lib.load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(config_lib.to_dict(run_folder.resolve(cfg)), sort_keys=False), end="")
        return 0
    distributed.initialize_from_args(args)
    # orbax logs a failed background save with full tracebacks from each of its threads (325 lines for a full disk);
    # the run reports the failure itself, as one line naming the step and the cause.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    with EventLoopNoiseFilter() as noise_filter:
        try:
            run(cfg)  # prints its start and final summaries
        except guard_lib.DivergenceError as e:
            sys.stderr.write(f"finch-train finetune: error: {e}\n")
            return 3
        except Preempted as e:
            sys.stderr.write(f"finch-train finetune: {e}\n")
            return PREEMPTED_EXIT_CODE
        except CheckpointSaveError as e:
            # Threads of a failed orbax save can be left waiting for a commit that never comes (up to orbax's
            # 20-minute timeout) and are not daemons, so a normal interpreter exit could wait for them: report and
            # leave at once (run() has already closed its files and released its locks).
            noise_filter.exit(f"finch-train finetune: error: {e}", 2)
        except CorruptCheckpointError:
            # The reads still in flight when a restore fails report to orbax's closed loop a moment later: let them
            # reach the filter before stderr is given back (the CLI then prints the one error line).
            noise_filter.settle()
            raise
    return 0

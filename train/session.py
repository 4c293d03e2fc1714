"""One fine-tuning run's loop, in named phases (:class:`Session`): start (resume or the step-0 state, the run
folder), train (jit steps, delayed metrics, checkpoints, evaluations, preemption), finish (selection, export) and
report; and what a run produced (:class:`FinetuneResult`). :func:`train.finetune.run` checks and loads the inputs,
builds the program and drives a session."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax

import models
from train import checkpoint as checkpoint_lib
from train import config as config_lib
from train import data as data_lib
from train import evaluation as evaluation_lib
from train import export as export_lib
from train import guard as guard_lib
from train import resume as resume_lib
from train import run_folder, runlock, storage
from train import selection as selection_lib
from train import step as step_lib
from train import summary as summary_lib
from train.checkpoint import Checkpointer, CheckpointError
from train.config import TrainConfig
from train.metrics_log import DelayedMetrics, MetricsLogger
from train.preemption import Preempted, PreemptionWatch

__all__ = ["FinetuneResult", "Inputs", "Session"]


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


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a run trains: the model, its tokenizer and the packed data, checked against each other."""

    model: Any
    tokenizer: Any
    model_name: str
    train: data_lib.DataSplit
    rows: data_lib.PackedRows | data_lib.CompactRows  # the training rows, after ``transform_rows``
    validation: data_lib.DataSplit | None
    retain: data_lib.DataSplit | None  # text the model should not forget (the retain KL's)
    chat_template: str | None  # the template chats were rendered with when it is not the tokenizer's own
    fingerprint: str
    config: TrainConfig  # the run's config, ``steps`` set from ``data.epochs`` when that is on


class Session:
    """One run of the training loop: state, data order, checkpoints, metrics and exports, in named phases."""

    def __init__(self, cfg: TrainConfig, program, inputs: Inputs, preemption: PreemptionWatch, on_step):
        self.cfg, self.program, self.inputs = cfg, program, inputs
        self.preemption, self.on_step = preemption, on_step
        self.is_main = jax.process_index() == 0
        self.locks: list = []  # the run locks (process 0), checked at each save: another run may take one over
        # Process 0 writes the run folder; a gs:// one through a local staging folder uploaded as it grows.
        self.folder = storage.StagedFolder(cfg.output.dir) if self.is_main else None
        self.out = None if self.folder is None else self.folder.local
        self.clock = checkpoint_lib.SaveClock(cfg.checkpoint.every_minutes)
        self.loader = data_lib.ResumableLoader(inputs.rows, cfg.data.batch_size, seed=cfg.data.seed)
        self.checkpointer: Checkpointer | None = None
        self.logger: MetricsLogger | None = None
        self.state: step_lib.TrainState | None = None
        self.start_step = 0
        self.seconds = 0.0
        self.validation: list[tuple[int, float]] = []
        self.hf_dir = run_folder.hf_directory(cfg.output.dir) if cfg.output.hf_export else None
        self.evaluation: evaluation_lib.RunEvaluation | None = None
        self.final_step = cfg.steps
        self.stopped: str | None = None  # why the run ended before cfg.steps (early stopping, the retain budget)

    # -- start: checkpoints, the initial state, the run folder ------------------------------------------------------

    def start(self, params: Any, frozen: Any) -> None:
        """Resumes from the newest checkpoint or builds the step-0 state; writes the config and start summary."""
        resume_step = self._open_checkpoints()
        state = self.program.init_state(params, frozen)
        # A LoRA run's checkpoints hold the adapters only: the base they were trained on is identified by its digest.
        self.frozen_digest = None if frozen is None else checkpoint_lib.tree_digest(state.frozen)
        # Built from the step-0 state: the retain KL's reference is the base model's distributions.
        self.evaluation = evaluation_lib.RunEvaluation(
            self.cfg,
            self.program,
            validation=self.inputs.validation,
            retain=self.inputs.retain,
            tokenizer=self.inputs.tokenizer,
            initial=state,
        )
        config_changes: list = []
        if resume_step is None:
            guard_lib.check_finite_params(state.params, self.inputs.model_name)  # NaN weights: every step skipped
            if frozen is not None:
                guard_lib.check_finite_params(state.frozen, self.inputs.model_name)
        else:
            state, config_changes = self._restore(state)
        self.state = state
        self._prepare_run_folder(params, frozen, config_changes)
        self.logger = MetricsLogger(
            self.out,
            total_steps=self.cfg.steps,
            start_step=self.start_step,
            tensorboard=self.cfg.tensorboard,
            progress=self.cfg.progress,
            append=self.start_step > 0,
            wandb_project=self.cfg.wandb_project,
            config=config_lib.to_dict(self.cfg),
        )
        self.evaluation.logger = self.logger

    def _open_checkpoints(self) -> int | None:
        """Opens the checkpoint directory (if checkpoints are on); the step to resume from, if any."""
        c = self.cfg.checkpoint
        if not (c.enabled and c.directory):
            return None
        # Checkpoints the selection may still pick stay out of the keep-N rotation.
        self.checkpointer = Checkpointer(
            c.directory, keep=c.keep, async_save=c.async_save, protected=lambda: self.evaluation.selection.protected()
        )
        latest = self.checkpointer.latest_step()
        if latest is not None and not c.resume:
            raise CheckpointError(
                f"checkpoint.directory={c.directory!r} already holds checkpoints (steps "
                f"{self.checkpointer.all_steps()}) and checkpoint.resume=false; pick an empty directory"
            )
        return latest

    def _restore(self, fresh: step_lib.TrainState) -> tuple[step_lib.TrainState, list]:
        """The newest good checkpoint, checked to be of the same run, in place of ``fresh``."""
        cfg, changes = self.cfg, []
        # Programs on simulated/in-process devices share one collective rendezvous pool: never let the init or
        # restore programs overlap the first training step.
        jax.block_until_ready(fresh)
        frozen = fresh.frozen  # a LoRA base is not in the checkpoint: it stays as loaded
        del fresh  # free the fresh state before the restored one lands in the same shardings

        def same_run(step: int, meta: dict) -> None:
            changes[:] = resume_lib.check_same_run(
                meta,
                config_lib.to_dict(cfg),
                self.inputs.fingerprint,
                step=step,
                accept=cfg.checkpoint.accept_config_change,
            )
            resume_lib.check_same_base(meta, self.frozen_digest, step=step)

        _, state, meta, corrupt = self.checkpointer.restore_newest(
            self.program.abstract_state,
            fall_back=cfg.checkpoint.on_corrupt == "previous",
            before_restore=same_run,
        )
        for bad in corrupt:  # only with on_corrupt=previous: moved aside, so new saves can take their steps
            print(f"checkpoint: moved corrupt step {bad} to {self.checkpointer.quarantine(bad)}", flush=True)
        jax.block_until_ready(state)
        self.loader.load_state_dict(meta["loader"])
        self.start_step = int(meta["step"])
        self.evaluation.resume([selection_lib.Evaluation(**e) for e in meta.get("evaluations", [])])
        return state._replace(frozen=frozen), changes

    def _prepare_run_folder(self, params: Any, frozen: Any, config_changes: list) -> None:
        if not self.is_main:
            return
        cfg, inputs, out = self.cfg, self.inputs, self.out
        self.folder.pull()  # a gs:// run folder's metrics and config, to append to and compare with
        if config_changes:  # accepted on resume: the config the earlier steps ran with stays beside the new one
            resume_lib.keep_previous_config(out, self.start_step)
        if self.start_step > 0:  # steps logged after the checkpoint by a run that then died are about to run again
            resume_lib.trim_metrics(out, self.start_step)
        config_lib.save_config(cfg, os.path.join(out, "config.yaml"))
        self.folder.push()
        if inputs.model_name == cfg.model.source and models.parse_source(cfg.model.source).is_random_init:
            print(summary_lib.random_init_warning(cfg.model.source), flush=True)
        uses_chat = any(s.chats for s in inputs.train.sources)
        summary = summary_lib.start_summary(
            cfg,
            model_name=inputs.model_name,
            params=params,
            frozen=frozen,
            params_shardings=self.program.params_shardings,
            mesh=self.program.mesh,
            train=inputs.train,
            validation=inputs.validation,
            start_step=self.start_step,
            chat_template=(cfg.data.chat_template or "the model's chat template") if uses_chat else None,
        )
        print(summary, flush=True)

    # -- what happens between steps -------------------------------------------------------------------------------

    def evaluate(self, step: int) -> None:
        """Validation loss, retain KL and generations at ``step``; sets :attr:`stopped` when the run should end."""
        evaluation = self.evaluation(step, self.state)
        if self.evaluation.validator is not None:
            self.validation.append((step, evaluation.val_loss))
        self.stopped = self.evaluation.stop_reason()

    def save(self, step: int) -> None:
        self.clock.saved()
        if self.checkpointer is not None and step not in self.checkpointer.all_steps():
            runlock.check_held(self.locks)
            # Let the step finish first, so the save's device-to-host copies never interleave with a running step's
            # collectives; the file writes still happen in the background while the next steps run.
            jax.block_until_ready(self.state)
            meta = {
                "config": config_lib.to_dict(self.cfg),
                "chat_template": self.inputs.chat_template,
                "data_fingerprint": self.inputs.fingerprint,
                "loader": self.loader.state_dict(),
                "frozen_digest": self.frozen_digest,
                "evaluations": [e.record() for e in self.evaluation.history if e.step <= step],
            }
            # The run folder first: its files in the bucket then always reach at least the newest checkpoint.
            self.sync()
            self.checkpointer.save(step, self.state, meta)

    def sync(self) -> None:
        """Uploads the run folder's new and changed files (a gs:// one; nothing to do for a local one)."""
        if self.folder is not None and self.folder.staged:
            if self.logger is not None:
                self.logger.flush()
            self.folder.push()

    def export(self, step: int | None) -> None:
        # Every process joins the gather; process 0 writes.
        jax.block_until_ready(self.state)
        frozen = None if self.state.frozen is None else export_lib.host_params(self.state.frozen)
        host_model = self.program.merge(export_lib.host_params(self.state.params), frozen)
        if self.is_main:
            export_lib.export_run(
                host_model,
                self.inputs.tokenizer,
                self.cfg,
                run_folder.hf_directory(self.out, step),
                chat_template=self.inputs.chat_template,
                overwrite=True,  # <run>/hf and hf-step-N are the run folder's own
            )
            self.sync()

    # -- the loop and its end ---------------------------------------------------------------------------------------

    def train(self) -> None:
        cfg, logger = self.cfg, self.logger
        delayed = DelayedMetrics(logger)
        last_good = None if self.checkpointer is None else self.checkpointer.latest_step
        skip_watch = guard_lib.SkipWatch(cfg.guard.max_consecutive_skips, last_good_step=last_good)
        if self.evaluation.active and self.start_step == 0:  # a resumed run's earlier session logged its own
            self.evaluate(0)
        t_start = time.perf_counter()
        logger.start_clock()
        self.clock.saved()  # the wall-time cadence counts from the first step
        try:
            self._steps(delayed, skip_watch)
        finally:
            self.seconds = time.perf_counter() - t_start

    def _steps(self, delayed: DelayedMetrics, skip_watch: guard_lib.SkipWatch) -> None:
        cfg, total, logger = self.cfg, self.cfg.steps, self.logger
        evaluate_now = self.evaluation.active and cfg.output.select != "last"
        for step in range(self.start_step + 1, total + 1):
            self.state, metrics = self.program.step(self.state, self.program.place_batch(self.loader.next_batch()))
            delayed.push(step, metrics)
            skip_watch.check(logger.records)
            if self.checkpointer is not None:
                self.checkpointer.check_for_errors()  # a failed background save stops the run now, not later
            evaluated = self.evaluation.active and _every(cfg.data.validation_every, step, total)
            # A checkpoint the selection may pick must exist: save at every evaluation when selecting.
            saved = _every(cfg.checkpoint.every, step, total) or (evaluated and evaluate_now)
            # ... and at least every checkpoint.every_minutes (all processes agree on process 0's clock).
            saved = saved or (self.checkpointer is not None and step < total and self.clock.due(step))
            if saved:
                delayed.flush()  # this step's metrics are logged (and uploaded) before its checkpoint
                self.save(step)
            if evaluated:
                self.evaluate(step)
                if self.stopped is not None:  # early stopping or the forgetting budget: this step is the last
                    self.final_step = step
                    if not saved:
                        self.save(step)
                    break
            if self.hf_dir is not None and _every(cfg.output.hf_every, step, total):
                self.export(step)
            if self.on_step is not None:
                self.on_step(step, self.state)
            if step < total and self.preemption.requested(step):
                delayed.flush()
                self._stop_for_preemption(step, saved)
        delayed.flush()
        skip_watch.check(logger.records)

    def _stop_for_preemption(self, step: int, saved: bool) -> None:
        if self.checkpointer is None:
            raise Preempted(f"stopped by SIGTERM after step {step}; checkpoints are off, nothing saved", step)
        if not saved:
            self.save(step)
        self.checkpointer.wait()
        raise Preempted(
            f"stopped by SIGTERM after step {step}, saved as checkpoint {self.checkpointer.latest_step()} in "
            f"{self.checkpointer.directory}; run the same command again to resume",
            step,
        )

    def finish(self) -> None:
        """The last checkpoint and evaluation, then the export of the selected checkpoint (or the last)."""
        last = self.final_step
        if last > self.start_step and self.stopped is None:
            self.save(last)
            if self.evaluation.active:
                self.evaluate(last)
        if self.hf_dir is not None and (last > self.start_step or not storage.exists(self.hf_dir)):
            selected = self.evaluation.selection.selected
            if selected is not None and selected.step != int(self.state.step):
                self._export_selected(selected.step)
            else:
                self.export(None)
        if self.is_main:
            evaluation_lib.plot_selection(
                self.evaluation.history,
                self.evaluation.selection.selected,
                os.path.join(self.out, "selection.png"),
                f"{self.cfg.model.source}: output.select={self.cfg.output.select}",
            )

    def _export_selected(self, step: int) -> None:
        """Exports checkpoint ``step`` (the selection's) as ``hf/`` instead of the final state."""
        self.checkpointer.wait()
        restored, _ = self.checkpointer.restore(step, self.program.abstract_state)
        final, self.state = self.state, restored._replace(frozen=self.state.frozen)
        try:
            self.export(None)
        finally:
            self.state = final

    def close(self) -> None:
        try:
            if self.checkpointer is not None:
                self.checkpointer.close()
        finally:
            if self.logger is not None:
                self.logger.close()
            if self.folder is not None:
                self.folder.close()  # a gs:// run folder: the last upload, then the staging folder is deleted

    def report(self, interrupted: str | None = None) -> None:
        """The end summary: printed and written as ``summary.json`` (process 0); ``interrupted``: the error that
        ended the run before its last step (then a summary.json that cannot be written is not a second error)."""
        if self.is_main and self.logger is not None:
            steps = [] if self.checkpointer is None else self.checkpointer.all_steps()
            selected = self.evaluation.selection.selected
            run_end = summary_lib.RunEnd(
                self.cfg,
                self.start_step,
                self.logger.records,
                self.validation,
                self.seconds,
                steps,
                self.hf_dir,
                interrupted=interrupted,
                selected=None if selected is None else selected.record(),
                stopped=self.stopped,
                evaluation_seconds=self.evaluation.seconds,
            )
            print(run_end.text(), flush=True)
            try:
                run_end.write()
            except OSError:
                if interrupted is None:
                    raise

    def result(self) -> FinetuneResult:
        records = self.logger.records
        return FinetuneResult(
            state=self.state,
            params=self.state.params,
            model=self.program.merge(self.state.params, self.state.frozen) if jax.process_count() == 1 else None,
            tokenizer=self.inputs.tokenizer,
            metrics=records,
            lr_trace=[r["lr"] for r in records],
            start_step=self.start_step,
            config=self.cfg,
            validation=self.validation,
            hf_dir=self.hf_dir,
        )


def _every(period: int, step: int, total: int) -> bool:
    """Whether a periodic action falls on ``step`` (the last step has its own, unconditional one)."""
    return period > 0 and step % period == 0 and step < total

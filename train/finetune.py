"""Fine-tuning run: config → model, data, mesh, optimizer → jit steps with checkpoints and metrics.

``python -m train finetune --config run.yaml optimizer.max_learning_rate=1e-4 ...`` runs it from the shell;
:func:`run` is the same from Python and also accepts an already-loaded model, so one process can fine-tune several
copies of one base model with different methods (the forgetting lab does that).

Everything that can be wrong with the input (config keys, data files, sizes, mesh, an incompatible checkpoint) is
checked before the first step, and an existing checkpoint directory is only ever read until the first new save.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import yaml
from flax import nnx

from models import lora as lora_lib
from train import config as config_lib
from train import data as data_lib
from train import distributed, paths, readers, run_folder, runlock, storage
from train import evaluation as evaluation_lib
from train import guard as guard_lib
from train import program as program_lib
from train import resume as resume_lib
from train import selection as selection_lib
from train import step as step_lib
from train import trackers as trackers_lib
from train.checkpoint import CheckpointSaveError
from train.config import TrainConfig
from train.preemption import EXIT_CODE as PREEMPTED_EXIT_CODE
from train.preemption import Preempted, PreemptionWatch
from train.session import FinetuneResult, Inputs, Session

__all__ = ["FinetuneResult", "main", "run"]


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
    selection_lib.check_settings(cfg)
    trackers_lib.check_available(cfg.wandb_project)
    _check_files_to_read(cfg, read_model=model is None, read_data=documents is None)
    program_lib.preflight(cfg)  # mesh, batch and optimizer settings: refused before anything loads
    _check_locations(cfg)  # a URL that cannot work (s3://, a missing bucket): refused before anything loads
    if model is not None and tokenizer is None:
        raise ValueError("finetune.run(cfg, model=...) also needs the model's tokenizer")
    # One writer per run folder, taken before anything is loaded: a second run is refused at once.
    written = [cfg.output.dir] + ([cfg.checkpoint.directory] if cfg.checkpoint.enabled else [])
    with runlock.hold(written if jax.process_index() == 0 else []) as locks, PreemptionWatch() as preemption:
        inputs = _load_inputs(cfg, model, tokenizer, documents, transform_rows)
        cfg = inputs.config  # with steps set by data.epochs, when that is on
        program, params, frozen = program_lib.build_program(cfg, inputs.model)
        session = Session(cfg, program, inputs, preemption, on_step)
        interrupted = None
        session.locks = locks
        try:
            session.start(params, frozen)
            del params, frozen
            session.train()
            session.finish()
        except _INTERRUPTIONS as e:
            interrupted = e
            raise
        finally:
            session.close()  # waits for the last checkpoint save: the end summary lists only finished ones
            if interrupted is not None:  # the summary says why the run did not finish; the error itself goes on up
                session.report(interrupted=str(interrupted).split("\n")[0])
        session.report()
        return session.result()


# Errors that end a run before its last step and leave a run folder worth summarising (an early stop by
# guard.patience or guard.max_retain_kl is no error: the run finishes, exports and exits 0).
_INTERRUPTIONS = (guard_lib.DivergenceError, Preempted, CheckpointSaveError)


def _check_files_to_read(cfg: TrainConfig, *, read_model: bool, read_data: bool) -> None:
    """The data (training, validation, retain), template and model files exist as what they are named for (the model's config is read, no
    weight): a wrong path is refused before the run folder is locked or anything loads."""
    files = [("data.validation_files", f) for f in cfg.data.validation_files]
    # ``builtin`` is refused here, with the command that prepares it, when it has not been prepared yet.
    files += [("data.retain_files", f) for f in evaluation_lib.retain_paths(cfg.data.retain_files)]
    if read_data:
        files = [("data.train_files", f) for f in cfg.data.train_files] + files
    if cfg.data.chat_template:
        files.append(("data.chat_template", cfg.data.chat_template))
    for setting, path in files:
        if storage.is_url(path):
            continue  # checked in the bucket by _check_locations
        if setting.endswith("_files") and readers.is_datasets_directory(path):
            continue  # a datasets save_to_disk directory is an input; any other folder is refused below
        paths.check_file_to_read(path, setting)
    if read_model:
        program_lib.model_config(cfg.model)


def _check_locations(cfg: TrainConfig) -> None:
    """Every location may be a local path or a ``gs://`` URL: a URL must have a reachable bucket, and a data file
    given as a URL must exist there — refused here, before anything loads, rather than inside a reader."""
    storage.check(cfg.output.dir, "output.dir")
    if cfg.checkpoint.enabled:
        storage.check(cfg.checkpoint.directory, "checkpoint.directory")
    d = cfg.data
    if d.cache_dir:
        storage.check(d.cache_dir, "data.cache_dir")
    for key, files in (
        ("data.train_files", d.train_files),
        ("data.validation_files", d.validation_files),
        ("data.retain_files", d.retain_files),
        ("data.chat_template", [d.chat_template] if d.chat_template else []),
    ):
        for name in files or ():
            if storage.is_url(str(name)):
                storage.check(name, key)
                if not storage.exists(name):
                    raise storage.StorageError(f"{key}: {name} does not exist")


def _load_inputs(cfg, model, tokenizer, documents, transform_rows) -> Inputs:
    """Loads the model (unless given) and the data, and checks that they fit each other.

    Training and validation files come from the token cache (``data.cache_dir``): mapped, not held in memory; the
    data fingerprint checked on resume is then the cache key and row count. In-memory ``documents`` are packed in
    memory, and ``transform_rows`` gets (and returns) dense in-memory rows; both fingerprint the rows themselves.
    """
    model_name = f"{cfg.model.source} (given to finetune.run)" if model is not None else cfg.model.source
    if model is None:
        model, tokenizer = program_lib.load_model(cfg.model)
    elif cfg.model.lora.enabled and not lora_lib.has_lora(model):
        # A base model given by the caller (the lab reuses one for every run) stays as it is: adapt a copy.
        model = program_lib.with_adapters(nnx.clone(model), cfg.model)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    cache_dir = data_lib.cache_directory(cfg.data)
    progress = cfg.progress and jax.process_index() == 0
    train = data_lib.load_split(
        tokenizer,
        cfg.data,
        cfg.data.train_files,
        documents=documents,
        max_context=context,
        cache_dir=cache_dir,
        progress=progress,
    )
    rows = train.rows if transform_rows is None else transform_rows(train.rows.materialize())
    validation = retain = None
    if cfg.data.validation_files:
        validation = data_lib.load_split(
            tokenizer,
            cfg.data,
            cfg.data.validation_files,
            max_context=context,
            what="validation",
            cache_dir=cache_dir,
            progress=progress,
        )
    if cfg.data.retain_files:
        retain_files = evaluation_lib.retain_paths(cfg.data.retain_files)
        retain = data_lib.load_split(tokenizer, cfg.data, retain_files, max_context=context, what="retain")
        retain = evaluation_lib.subsample(retain, cfg.data.retain_rows)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    for split_rows in (rows, *(None if split is None else split.rows for split in (validation, retain))):
        if vocab is not None and split_rows is not None and split_rows.max_token_id >= vocab:
            raise data_lib.DataError(f"token id {split_rows.max_token_id} is outside the model's vocabulary of {vocab}")
    chat_template = None
    if cfg.data.chat_template:
        with open(storage.local_copy(cfg.data.chat_template), encoding="utf-8") as f:
            chat_template = f.read()
    if train.cache is not None and transform_rows is None:
        fingerprint = train.cache.fingerprint
    else:
        fingerprint = resume_lib.rows_fingerprint(rows)
    config = data_lib.steps_for_epochs(cfg, len(rows))
    return Inputs(model, tokenizer, model_name, train, rows, validation, retain, chat_template, fingerprint, config)


def build_parser(prog: str = "finch-train finetune") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune a causal LM with FINCH (or a baseline) on text/JSONL data. Files go to the run "
        "folder, runs/<model>-<data>/ unless output.dir is set: metrics, checkpoints and a Hugging Face export.",
        epilog=config_lib.help_text()
        + "\n\nexample: finch-train finetune --config configs/smollm2-chat.yaml steps=20 optimizer.max_learning_rate=3e-4",
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
        _exit_now(f"finch-train finetune: error: {e}", 2)
    return 0


def _exit_now(message: str, code: int) -> None:
    """Writes ``message`` to stderr and leaves the process with ``code`` without waiting for other threads."""
    sys.stdout.flush()
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()
    os._exit(code)

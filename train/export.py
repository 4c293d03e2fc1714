"""Hugging Face export of a fine-tuned model, and loading a model back from a training checkpoint.

A finetune exports ``<run>/hf`` at the end (and ``<run>/hf-step-N`` every ``output.hf_every`` steps);
``finch-train export RUN_OR_CHECKPOINT [--step N]`` turns any checkpoint into the same kind of directory:
safetensors weights (files of at most ``output.hf_shard_size``, 5 GB by default, with ``model.safetensors.index.json``
when there are several, as transformers writes them), ``config.json``, ``tokenizer.json`` + ``tokenizer_config.json``
with the chat template the model was fine-tuned with, and ``generation_config.json``.
``transformers.AutoModelForCausalLM`` loads it with the same logits as ours (``tests/test_train_export.py``), and so
does ``models.load("hf:DIR")``.

An export is written beside its destination and renamed into place, so an interrupted export never leaves a
half-written directory where a complete one was. It replaces only what this tool wrote: a missing or empty folder, or
an earlier export (marked by :data:`train.paths.OUTPUT_MARKER`); anything else at the destination is refused unless
``overwrite`` (``--overwrite``) asks for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

import models
from models import hub
from models import lora as lora_lib
from train import config as config_lib
from train import paths, run_folder
from train import program as program_lib
from train.checkpoint import Checkpointer, CheckpointError
from train.config import ConfigError

__all__ = [
    "EXPORT_DTYPES",
    "LoadedCheckpoint",
    "adapter_directory",
    "export_hf",
    "export_run",
    "host_params",
    "load_checkpoint",
    "main",
]

EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def host_params(params: Any) -> Any:
    """The params as host NumPy arrays; in a multi-process run every process must call this (it gathers)."""
    if all(x.is_fully_addressable for x in jax.tree.leaves(params)):
        return jax.device_get(params)
    from jax.experimental import multihost_utils  # only multi-process runs need it

    return multihost_utils.process_allgather(params, tiled=True)


def export_hf(
    model: Any,
    tokenizer: Any,
    directory: str | os.PathLike,
    *,
    dtype: str = "float32",
    chat_template: str | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Writes ``model`` as a Hugging Face directory (see the module docstring), replacing ``directory`` atomically.

    Args:
      model: a ``models.CausalLM``.
      tokenizer: its tokenizer (a preset's byte-level tokenizer is written as an equivalent ``tokenizer.json``).
      directory: the destination.
      dtype: storage dtype of the weights, one of :data:`EXPORT_DTYPES`.
      chat_template: written instead of the tokenizer's own (the template the fine-tune rendered chats with).
      overwrite: replace whatever is at ``directory``; otherwise only a missing or empty folder or an earlier export.

    Raises:
      PathError: ``directory`` holds something this tool did not write, and ``overwrite`` is off.
      max_shard_size: largest safetensors file (``5GB``, ``500MB``, bytes): larger weights are written as shards
        ``model-0000I-of-0000N.safetensors`` with ``model.safetensors.index.json``, as transformers does.
    """
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"output.hf_dtype={dtype!r} is not one of {sorted(EXPORT_DTYPES)}")
    shard_bytes = config_lib.parse_size(max_shard_size, "output.hf_shard_size")

    def write(staging: Path) -> None:
        models.save_hf(
            model,
            tokenizer,
            staging,
            dtype=EXPORT_DTYPES[dtype],
            chat_template=chat_template,
            max_shard_bytes=shard_bytes,
        )

    return _replace_directory(Path(directory), write, "a Hugging Face export", overwrite=overwrite)


def adapter_directory(hf_dir: str | os.PathLike) -> Path:
    """Where a LoRA run's PEFT adapter goes beside its merged export: ``<hf_dir>-adapter`` (``runs/NAME/hf-adapter``)."""
    hf_dir = Path(hf_dir)
    return hf_dir.parent / f"{hf_dir.name}-adapter"


def export_run(
    model: Any,
    tokenizer: Any,
    cfg: config_lib.TrainConfig,
    directory: str | os.PathLike,
    *,
    dtype: str | None = None,
    chat_template: str | None = None,
    overwrite: bool = False,
    max_shard_size: str | int | None = None,
) -> list[Path]:
    """A fine-tuned model as a run exports it: the Hugging Face directory ``directory``; for a LoRA model also its
    PEFT adapter (:func:`adapter_directory`), and the directory then holds the merged model.

    ``model`` is changed in place (the adapters are merged into it). ``dtype`` and ``max_shard_size`` default to
    the run's ``output.hf_dtype`` and ``output.hf_shard_size``. Returns the directories written. Both destinations
    are checked (see :func:`export_hf`'s ``overwrite``) before either is written.
    """
    dtype = dtype or cfg.output.hf_dtype
    max_shard_size = max_shard_size or cfg.output.hf_shard_size
    written = []
    lora = lora_lib.has_lora(model)
    destinations = [Path(directory)] + ([adapter_directory(directory)] if lora else [])
    for destination in destinations:
        paths.check_folder_to_replace(destination, "the export destination", overwrite=overwrite)
    if lora:
        spec = program_lib.lora_spec(cfg.model) or lora_lib.LoraSpec()
        adapter = adapter_directory(directory)
        base = models.parse_source(cfg.model.source)
        base_name, revision = str(base), None
        if base.kind == "hf":
            base_name = str(Path(base.value).resolve())
        elif base.kind == "hub":  # PEFT's convention: the bare repo id, and the revision beside it
            base_name, revision = hub.parse_ref(base.value)
        written.append(
            _replace_directory(
                adapter,
                lambda d: lora_lib.save_peft(model, spec, d, base_model=base_name, revision=revision),
                "a PEFT LoRA adapter",
                overwrite=overwrite,
            )
        )
        lora_lib.merge_lora(model)
    written.insert(
        0,
        export_hf(
            model,
            tokenizer,
            directory,
            dtype=dtype,
            chat_template=chat_template,
            overwrite=overwrite,
            max_shard_size=max_shard_size,
        ),
    )
    return written


def _replace_directory(directory: Path, write: Any, what: str, *, overwrite: bool) -> Path:
    """``write(staging)`` beside ``directory``, marked as this tool's ``what``, then renamed into its place (a
    complete directory or none); what is at ``directory`` is replaced only if this tool wrote it, or ``overwrite``."""
    paths.check_folder_to_replace(directory, "the export destination", overwrite=overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.partial-{os.getpid()}"
    retired = directory.parent / f".{directory.name}.old-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    paths.mark_own_output(staging, what)
    if os.path.lexists(directory):
        directory.rename(retired)
    staging.rename(directory)
    if retired.is_dir() and not retired.is_symlink():
        shutil.rmtree(retired, ignore_errors=True)
    elif os.path.lexists(retired):
        retired.unlink()  # a file (or link) that --overwrite replaced
    return directory


@dataclasses.dataclass
class LoadedCheckpoint:
    """A model rebuilt from a training checkpoint.

    Attributes:
      model: the ``models.CausalLM`` with the checkpoint's params.
      tokenizer: the tokenizer of the run's base model.
      config: the run's config.
      step: the checkpoint's step.
      directory: the orbax checkpoint directory it came from.
      chat_template: the chat template the run rendered chats with (``None`` when it had none).
    """

    model: Any
    tokenizer: Any
    config: config_lib.TrainConfig
    step: int
    directory: str
    chat_template: str | None


def load_checkpoint(path: str, step: int | None = None, *, dtype: str | None = None) -> LoadedCheckpoint:
    """Loads a run folder's (or checkpoint directory's) checkpoint at ``step`` (default: the newest).

    The base model named in the checkpoint's config is loaded for its structure and tokenizer, then the fine-tuned
    params are restored into it on one device. ``dtype`` overrides the run's compute dtype (e.g. float32 on CPU).

    Raises:
      CheckpointError: no such directory, no complete checkpoint in it, or unreadable files.
    """
    directory = run_folder.checkpoint_directory(path)
    if not os.path.isdir(directory):
        why = "it is a file" if os.path.exists(directory) else "it does not exist"
        raise CheckpointError(f"{path!r} is neither a run folder nor a checkpoint directory: {why}")
    ckpt = Checkpointer(directory, async_save=False)
    try:
        steps = ckpt.all_steps()
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {directory!r}")
        if step not in steps:
            raise CheckpointError(f"{directory!r} has no checkpoint for step {step}; it has steps {steps}")
        meta = ckpt.read_meta(step)
        cfg = config_lib.from_dict(meta["config"])
        overrides = {} if dtype is None else {"dtype": dtype}
        if cfg.model.attention_impl == "splash" and jax.default_backend() != "tpu":
            overrides["attention_impl"] = "blockwise"  # the TPU kernel the run trained with runs only on TPUs
        model, tokenizer = program_lib.load_model(cfg.model, **overrides)
        # The run's state layout on one device: its mesh settings may name devices this process does not have.
        one_device = dataclasses.replace(
            cfg, mesh=config_lib.MeshConfig(rules=cfg.mesh.rules), data=dataclasses.replace(cfg.data, grad_accum=1)
        )
        program, _, frozen = program_lib.build_program(one_device, model, devices=jax.devices()[:1])
        del model  # the restored params replace the base weights (a LoRA model's: its adapters)
        state, _ = ckpt.restore(step, program.abstract_state)
    finally:
        ckpt.close()
    template = meta.get("chat_template") or getattr(tokenizer, "chat_template", None)
    return LoadedCheckpoint(program.merge(state.params, frozen), tokenizer, cfg, step, directory, template)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="finch-train export",
        description="Write a Hugging Face model directory (safetensors, config, tokenizer, chat template) from a "
        "fine-tuning checkpoint.",
    )
    parser.add_argument("path", help="a run folder (runs/NAME) or an orbax checkpoint directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--out", default=None, help="destination (default: <run folder>/hf-step-<step>)")
    parser.add_argument("--dtype", default="float32", choices=sorted(EXPORT_DTYPES), help="weight storage dtype")
    parser.add_argument(
        "--max-shard-size",
        default=None,
        help="largest safetensors file, e.g. 5GB, 500MB, 2GiB; larger weights are split into shards with "
        "model.safetensors.index.json (default: the run's output.hf_shard_size, 5GB unless set)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what is at --out even if this tool did not write it (default: only an earlier export, or an "
        "empty or missing folder)",
    )
    args = parser.parse_args(argv)
    # Everything the command is given is checked before the checkpoint (and its base model) loads.
    if args.step is not None and args.step < 0:
        raise ConfigError(f"--step must be >= 0, got {args.step}")
    if args.max_shard_size is not None:
        config_lib.parse_size(args.max_shard_size, "--max-shard-size")
    if args.out:
        paths.check_folder_to_replace(args.out, "--out", overwrite=args.overwrite)
    loaded = load_checkpoint(args.path, args.step)
    run_dir = os.path.dirname(os.path.abspath(loaded.directory))
    # Without --out the export goes into the run folder, whose hf-step-N folders are this tool's own.
    out = args.out or run_folder.hf_directory(run_dir, loaded.step)
    written = export_run(
        loaded.model,
        loaded.tokenizer,
        loaded.config,
        out,
        dtype=args.dtype,
        chat_template=loaded.chat_template,
        overwrite=args.overwrite or not args.out,
        max_shard_size=args.max_shard_size,
    )
    shards = len(list(Path(out).glob("model-*-of-*.safetensors")))
    print(
        f"exported step {loaded.step} of {loaded.directory} to {out} ({args.dtype} safetensors"
        f"{f' in {shards} shards' if shards else ''}, tokenizer{', chat template' if loaded.chat_template else ''})"
    )
    if len(written) > 1:
        print(f"  the LoRA adapters, merged into {out}, are also a PEFT adapter in {written[1]}")
    print(f"  chat with it:  finch-train chat {out}")
    print(f"  transformers:  AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0

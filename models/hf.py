"""Hugging Face directory import/export: ``config.json`` + safetensors (single or sharded) + ``tokenizer.json``.

Weights are read with the safetensors NumPy API (no torch). Export writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads, so a fine-tuned model can be served by the usual tools.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import tokenizers
from safetensors import safe_open
from safetensors.numpy import save_file

from models.config import ModelConfig
from models.tokenizer import ByteTokenizer, Tokenizer
from models.transformer import CausalLM
from models.weights import WeightError, model_from_hf_tensors, model_to_hf_tensors

__all__ = ["load_hf", "save_hf", "read_safetensors", "byte_level_tokenizer", "HFDirectoryError"]

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# transformers' default largest shard (``save_pretrained(max_shard_size="5GB")``).
DEFAULT_SHARD_BYTES = 5 * 10**9


class HFDirectoryError(FileNotFoundError):
    """A Hugging Face model directory that lacks a required file or has an inconsistent index."""


class SafetensorsTensors(Mapping[str, np.ndarray]):
    """Read-only mapping name -> NumPy array over one or more safetensors files, read lazily one tensor at a time.

    Lazy reading keeps peak host memory near one copy of the model even for multi-shard checkpoints.
    """

    def __init__(self, files: dict[str, Path]):
        self._files = files  # tensor name -> file holding it
        self._handles: dict[Path, Any] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        file = self._files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="np")
        return self._handles[file].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def read_safetensors(directory: str | Path) -> SafetensorsTensors:
    """All tensors of a HF directory (``model.safetensors`` or the sharded index), as a lazy name -> array mapping."""
    directory = Path(directory)
    single, index = directory / SINGLE_FILE, directory / INDEX_FILE
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise HFDirectoryError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        files = sorted({directory / shard for shard in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise HFDirectoryError(f"{index}: lists shard files that do not exist: {missing}")
    else:
        present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        hint = (
            " (PyTorch .bin checkpoints are not supported; convert to safetensors)"
            if any(p.endswith(".bin") for p in present)
            else ""
        )
        raise HFDirectoryError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found{hint}; files: {present}")
    located: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="np") as handle:
                names = list(handle.keys())
        except Exception as e:
            raise HFDirectoryError(f"{file}: cannot be read as safetensors ({type(e).__name__}: {e})") from None
        duplicated = set(names) & set(located)
        if duplicated:
            raise WeightError(f"{file}: tensors also present in another shard: {sorted(duplicated)[:5]}")
        located.update({name: file for name in names})
    return SafetensorsTensors(located)


def load_hf(
    directory: str | Path, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, **config_overrides: Any
) -> tuple[CausalLM, Tokenizer | None]:
    """Loads a Hugging Face Llama / Qwen2 / Qwen3 directory.

    Args:
      directory: holds ``config.json``, ``model.safetensors`` (or ``model.safetensors.index.json`` + shards) and,
        optionally, ``tokenizer.json``.
      dtype: compute dtype; param_dtype: storage dtype.
      **config_overrides: extra :class:`ModelConfig` fields (``remat``, ``scan_layers``, ...).

    Returns:
      ``(model, tokenizer)``; ``tokenizer`` is ``None`` when the directory has no ``tokenizer.json``.

    Raises:
      HFDirectoryError: the directory or a required file is missing.
      ConfigError: unsupported architecture/option in ``config.json`` (names the field).
      WeightError: tensors missing, unexpected, or shaped differently from the config (names the tensor).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise HFDirectoryError(f"model directory not found: {directory}")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise HFDirectoryError(f"{directory}: config.json is missing")
    cfg = ModelConfig.from_hf_config(config_path, dtype=dtype, param_dtype=param_dtype, **config_overrides)
    tensors = read_safetensors(directory)
    model = model_from_hf_tensors(cfg, tensors, source=str(directory))
    tokenizer = None
    if (directory / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_hf_dir(directory)
    else:
        log.warning("%s: no tokenizer.json; returning tokenizer=None", directory)
    return model, tokenizer


def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table: the alphabet of the ``ByteLevel`` pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def byte_level_tokenizer(chat_template: str | None = None) -> Tokenizer:
    """:class:`ByteTokenizer` as a ``tokenizers`` BPE without merges, so an export of a preset model has a
    ``tokenizer.json`` that transformers loads: byte ``b`` is id ``b``, then BOS, EOS and PAD as 256-258.

    The special tokens are plain vocabulary entries that no text encodes to, exactly as with :class:`ByteTokenizer`.
    """
    vocab = {char: b for b, char in _byte_to_char().items()}
    specials = ("<|bos|>", "<|eos|>", "<|pad|>")
    vocab.update({token: ByteTokenizer.bos_id + i for i, token in enumerate(specials)})
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    return Tokenizer(
        backend,
        bos_id=ByteTokenizer.bos_id,
        eos_id=ByteTokenizer.eos_id,
        pad_id=ByteTokenizer.pad_id,
        chat_template=chat_template,
    )


def save_hf(
    model: CausalLM,
    tokenizer: Tokenizer | ByteTokenizer | None,
    directory: str | Path,
    *,
    dtype: Any = np.float32,
    max_shard_bytes: int | None = DEFAULT_SHARD_BYTES,
    chat_template: str | None = None,
) -> Path:
    """Writes ``config.json``, safetensors weights and (if given) the tokenizer, loadable by transformers.

    Args:
      model: the model to export.
      tokenizer: written as ``tokenizer.json`` + ``tokenizer_config.json`` (with its chat template); a
        :class:`ByteTokenizer` is written as the equivalent :func:`byte_level_tokenizer`.
      directory: created if needed.
      dtype: storage dtype of the exported weights (float32 default; ``ml_dtypes.bfloat16`` halves the size).
      max_shard_bytes: when the weights are larger, they are split into files ``model-0000I-of-0000N.safetensors``
        of at most this size (a tensor larger than it gets a file of its own) with ``model.safetensors.index.json``,
        as transformers writes them (default 5 GB); ``None``: one ``model.safetensors`` of any size.
      chat_template: written instead of the tokenizer's own chat template (e.g. the one a fine-tune used).

    Returns:
      The directory.
    """
    if isinstance(tokenizer, ByteTokenizer):
        tokenizer = byte_level_tokenizer()
    if isinstance(tokenizer, Tokenizer) and chat_template is not None:
        tokenizer = Tokenizer(
            tokenizer.backend,
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            chat_template=chat_template,
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    hf_config = cfg.to_hf_config()
    hf_config["torch_dtype"] = np.dtype(dtype).name
    if tokenizer is not None:
        for name in ("bos", "eos", "pad"):
            token_id = getattr(tokenizer, f"{name}_id", None)
            if token_id is not None:
                hf_config[f"{name}_token_id"] = int(token_id)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
    tensors = model_to_hf_tensors(model, dtype=dtype)
    for stale in [directory / SINGLE_FILE, directory / INDEX_FILE, *directory.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    total = sum(t.nbytes for t in tensors.values())
    metadata = {"format": "pt"}  # transformers refuses safetensors files without this marker
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, str(directory / SINGLE_FILE), metadata=metadata)
    else:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for name, tensor in tensors.items():
            if shards[-1] and size + tensor.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensor
            size += tensor.nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / file), metadata=metadata)
            weight_map.update({name: file for name in shard})
        (directory / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    if isinstance(tokenizer, Tokenizer):
        tokenizer.save(directory)
    generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_config}
    if generation:
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return directory

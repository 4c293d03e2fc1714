"""Conversion between a :class:`CausalLM` and a flat dict of Hugging Face-named tensors.

Both checkpoint formats go through this one table: the HF importer reads safetensors into such a dict, the GGUF
importer renames and un-permutes its tensors into it, and the exporter writes it back out. HF stores linear
weights as ``[out_features, in_features]``; we store ``[in, ...out]`` with heads split out, so every entry of the
table says how to reshape in each direction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.transformer import CausalLM

__all__ = ["WeightError", "hf_tensor_specs", "model_from_hf_tensors", "model_to_hf_tensors", "abstract_model"]


class WeightError(ValueError):
    """Checkpoint tensors that do not match the config (missing, unexpected, or wrong shape)."""


@dataclasses.dataclass(frozen=True)
class _Spec:
    """How one HF tensor maps onto one of our parameters (``path`` inside a block when ``layer`` is set)."""

    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def hf_tensor_specs(cfg: ModelConfig) -> tuple[dict[str, _Spec], dict[str, _Spec]]:
    """(global specs keyed by HF name, per-layer specs keyed by the name after ``model.layers.{i}.``)."""
    e, h, k, d, m, v = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size

    def proj(path: tuple[str, ...], heads: int) -> _Spec:
        # HF [heads*d, e]  <->  ours [e, heads, d]
        return _Spec(path, (heads * d, e), lambda w: w.T.reshape(e, heads, d), lambda w: w.reshape(e, heads * d).T)

    def bias(path: tuple[str, ...], heads: int) -> _Spec:
        return _Spec(path, (heads * d,), lambda b: b.reshape(heads, d), lambda b: b.reshape(heads * d))

    def dense(path: tuple[str, ...], n_in: int, n_out: int) -> _Spec:
        return _Spec(path, (n_out, n_in), lambda w: w.T, lambda w: w.T)

    def vector(path: tuple[str, ...], n: int) -> _Spec:
        return _Spec(path, (n,), _identity, _identity)

    layer = {
        "self_attn.q_proj.weight": proj(("attn", "q_proj"), h),
        "self_attn.k_proj.weight": proj(("attn", "k_proj"), k),
        "self_attn.v_proj.weight": proj(("attn", "v_proj"), k),
        "self_attn.o_proj.weight": _Spec(
            ("attn", "o_proj"), (e, h * d), lambda w: w.T.reshape(h, d, e), lambda w: w.reshape(h * d, e).T
        ),
        "mlp.gate_proj.weight": dense(("mlp", "gate_proj"), e, m),
        "mlp.up_proj.weight": dense(("mlp", "up_proj"), e, m),
        "mlp.down_proj.weight": dense(("mlp", "down_proj"), m, e),
        "input_layernorm.weight": vector(("input_norm", "weight"), e),
        "post_attention_layernorm.weight": vector(("post_attention_norm", "weight"), e),
    }
    if cfg.attention_bias:
        layer["self_attn.q_proj.bias"] = bias(("attn", "q_bias"), h)
        layer["self_attn.k_proj.bias"] = bias(("attn", "k_bias"), k)
        layer["self_attn.v_proj.bias"] = bias(("attn", "v_bias"), k)
    if cfg.qk_norm:
        layer["self_attn.q_norm.weight"] = vector(("attn", "q_norm", "weight"), d)
        layer["self_attn.k_norm.weight"] = vector(("attn", "k_norm", "weight"), d)
    glob = {
        "model.embed_tokens.weight": _Spec(("embed",), (v, e), _identity, _identity),
        "model.norm.weight": vector(("final_norm", "weight"), e),
    }
    if not cfg.tie_embeddings:
        glob["lm_head.weight"] = dense(("lm_head",), e, v)
    return glob, layer


def abstract_model(cfg: ModelConfig) -> CausalLM:
    """A CausalLM whose parameters are shape/dtype placeholders (no random init, no memory)."""
    return nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def model_from_hf_tensors(
    cfg: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    source: str = "checkpoint",
    strict: bool = True,
    file_names: Mapping[str, str] | None = None,
) -> CausalLM:
    """Builds a CausalLM from HF-named tensors, checking names and shapes against ``cfg``.

    Args:
      cfg: the model config (its ``param_dtype`` decides storage, ``scan_layers`` the layout).
      tensors: HF name -> array (anything ``np.asarray`` accepts).
      source: the file or directory the tensors came from, used in error messages.
      strict: raise on tensors the config has no place for (tied ``lm_head.weight`` is always tolerated).
      file_names: HF name -> the tensor's name inside the file (GGUF), so errors name what the user can look up.

    Raises:
      WeightError: naming the tensor and ``source`` for missing, unexpected or mis-shaped tensors, tensors that are
        not floating point or hold NaN/inf, and an LM head the config ties to the embedding that differs from it.
    """

    def label(name: str) -> str:
        if file_names and name in file_names:
            return f"{file_names[name]!r} (= {name})"
        return repr(name)

    if cfg.tie_embeddings and "lm_head.weight" in tensors and "model.embed_tokens.weight" in tensors:
        if not np.array_equal(np.asarray(tensors["lm_head.weight"]), np.asarray(tensors["model.embed_tokens.weight"])):
            raise WeightError(
                f"{source}: the config ties the LM head to the embedding (tie_word_embeddings), but tensor "
                f"{label('lm_head.weight')} differs from the embedding; set tie_word_embeddings to false in its config"
            )
    glob, layer = hf_tensor_specs(cfg)
    model = abstract_model(cfg)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)

    storage_dtype = np.dtype(cfg.param_dtype)

    def convert(name: str, spec: _Spec) -> np.ndarray:
        if name not in tensors:
            raise WeightError(f"{source}: tensor {name!r} is missing (config expects shape {spec.hf_shape})")
        array = np.asarray(tensors[name])
        _check_values(array, label(name), source)
        if tuple(array.shape) != spec.hf_shape:
            raise WeightError(
                f"{source}: tensor {label(name)} has shape {tuple(array.shape)}, but the config implies {spec.hf_shape}"
            )
        # Straight to the storage dtype: no float32 copy of a bf16 checkpoint (ml_dtypes gives NumPy bfloat16).
        return spec.to_ours(array.astype(storage_dtype, copy=False))

    def assign(path: tuple[str, ...], value: np.ndarray) -> None:
        parent = _get(params, path[:-1])
        expected = parent[path[-1]].shape
        if tuple(value.shape) != tuple(expected):
            raise WeightError(f"{source}: internal shape mismatch for {'.'.join(path)}: {value.shape} vs {expected}")
        parent[path[-1]] = jnp.asarray(value, dtype=cfg.param_dtype)

    used = set()
    for name, spec in glob.items():
        assign(spec.path, convert(name, spec))
        used.add(name)
    for sub, spec in layer.items():
        per_layer = []
        for i in range(cfg.num_layers):
            name = f"model.layers.{i}.{sub}"
            per_layer.append(convert(name, spec))
            used.add(name)
        if cfg.scan_layers:
            assign(("layers",) + spec.path, np.stack(per_layer))
        else:
            for i, value in enumerate(per_layer):
                assign(("layers", i) + spec.path, value)
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        used.add("lm_head.weight")  # transformers may write the tied copy; it must equal the embedding anyway
    extra = sorted(set(tensors) - used)
    extra = [label(n) for n in extra if not n.endswith("rotary_emb.inv_freq")]
    if strict and extra:
        shown = ", ".join(extra[:5]) + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else "")
        raise WeightError(f"{source}: tensors not used by the {cfg.architecture} config: {shown}")
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _check_values(array: np.ndarray, label: str, source: str) -> None:
    """Refuses a tensor that is not floating point (not model weights) or that holds NaN or inf (a broken file)."""
    if not jnp.issubdtype(array.dtype, jnp.floating):  # (NumPy alone does not count bfloat16 as floating)
        raise WeightError(
            f"{source}: tensor {label} is {array.dtype}, not floating point: this is not a model's weights file (or "
            "one quantized in a way this loader does not read)"
        )
    if not np.isfinite(array).all():
        raise WeightError(
            f"{source}: tensor {label} holds NaN or inf values; the file is broken (export or download it again)"
        )


def model_to_hf_tensors(model: CausalLM, dtype: np.dtype | None = np.float32) -> dict[str, np.ndarray]:
    """The model's parameters as HF-named NumPy arrays in HF layout (float32 by default)."""
    cfg = model.config
    glob, layer = hf_tensor_specs(cfg)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def fetch(path):
        array = np.asarray(jax.device_get(_get(params, path)))
        return array.astype(dtype) if dtype is not None else array

    out = {}
    for name, spec in glob.items():
        out[name] = np.ascontiguousarray(spec.to_hf(fetch(spec.path)))
    for sub, spec in layer.items():
        for i in range(cfg.num_layers):
            if cfg.scan_layers:
                value = fetch(("layers",) + spec.path)[i]
            else:
                value = fetch(("layers", i) + spec.path)
            out[f"model.layers.{i}.{sub}"] = np.ascontiguousarray(spec.to_hf(value))
    return out

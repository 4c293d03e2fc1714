"""LoRA adapters and a quantized frozen base (QLoRA) for :class:`models.CausalLM`, and their PEFT format.

An adapter of a projection ``W`` (``[*in, *out]``, e.g. ``q_proj`` ``[embed, heads, head_dim]``) is two
``nnx.LoRAParam`` s beside it: ``<name>_lora_a`` ``[*in, r]`` and ``<name>_lora_b`` ``[r, *out]``, and the
projection computes ``x @ W + scale · (dropout(x) @ A) @ B`` with ``scale = alpha / r`` (``alpha / sqrt(r)`` with
rsLoRA). ``A`` starts uniform in ``±1/sqrt(fan_in)`` and ``B`` at zero, as PEFT initialises them, so a fresh adapter
changes nothing. The adapters carry their kernel's logical axes (the rank axis unsharded), so the mesh rules shard
them like the weights they adapt.

``LoRAParam`` is a subclass of ``nnx.Param``: split a model with ``nnx.split(model, nnx.LoRAParam, nnx.Param, ...)``
(adapters first) to train only them. A quantized base replaces each target kernel by a :class:`QuantizedKernel`
(codes and per-block scales, not a ``Param``, so it can never be trained by mistake) that the projection
dequantizes where it is used: under ``scan_layers`` and remat one layer's weights exist at a time.

* ``nf4``: QLoRA's 4-bit NormalFloat (Dettmers et al. 2023): 16 levels, one absmax per block of 64 values along the
  kernel's last axis, two codes per byte. 0.56 bytes per weight.
* ``int8``: symmetric 8-bit integers, one absmax per block. 1.06 bytes per weight.

Why written here rather than with qwix or ``nnx.LoRA`` (docs/training.md, "LoRA"): qwix finds the matmuls to adapt by
intercepting them during a call, which misses this model's kernels (its blocks run through ``nnx.split``/``merge``
for remat and scan, and its multi-dimensional kernels are reshaped before the dot), and its quantized kernels do not
survive this model's ``kernel[...].astype(dtype)``; ``nnx.LoRA`` is ``x @ a @ b`` without scaling or dropout on 2-D
kernels. Adapters as ``LoRAParam`` attributes keep every path (eager, jit, scan, remat, decoding) and the logical
sharding exact.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ConfigError

__all__ = [
    "PEFT_FILES",
    "QUANTIZATIONS",
    "TARGETS",
    "LoraSpec",
    "QuantizedKernel",
    "add_lora",
    "adapted",
    "dequantize",
    "dropout_rate",
    "has_lora",
    "load_peft",
    "merge_lora",
    "merged_params",
    "peft_tensors",
    "quantize_base",
    "quantized_kinds",
    "save_peft",
]

# Our projection name -> (the block's sub-module, the HF module inside a layer, leading "in" axes of the kernel).
TARGETS: dict[str, tuple[str, str, int]] = {
    "q_proj": ("attn", "self_attn.q_proj", 1),
    "k_proj": ("attn", "self_attn.k_proj", 1),
    "v_proj": ("attn", "self_attn.v_proj", 1),
    "o_proj": ("attn", "self_attn.o_proj", 2),
    "gate_proj": ("mlp", "mlp.gate_proj", 1),
    "up_proj": ("mlp", "mlp.up_proj", 1),
    "down_proj": ("mlp", "mlp.down_proj", 1),
}
QUANTIZATIONS = ("none", "nf4", "int8")
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")

# QLoRA's NormalFloat-4 levels (Dettmers et al. 2023, appendix E), the values bitsandbytes uses.
NF4_LEVELS = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    np.float32,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how (``model.lora`` of a run's config builds one).

    Attributes:
      rank: the adapters' rank ``r``.
      alpha: the scale numerator: updates are scaled by ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
      targets: projections to adapt, of :data:`TARGETS`.
      dropout: dropout on the adapter's input during training (as PEFT's ``lora_dropout``).
      rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
      quantize: the frozen base's storage: ``none``, ``nf4`` (QLoRA) or ``int8``.
      block: values per quantization scale, along each kernel's last axis.
    """

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = tuple(TARGETS)
    dropout: float = 0.0
    rslora: bool = False
    quantize: str = "none"
    block: int = 64

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"model.lora.rank must be >= 1, got {self.rank}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"model.lora.alpha must be a finite number > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ConfigError(
                f"model.lora.targets: {unknown or 'none given'}; choose from {', '.join(TARGETS)} (a list)"
            )
        if self.quantize not in QUANTIZATIONS:
            raise ConfigError(f"model.lora.quantize must be one of {', '.join(QUANTIZATIONS)}, got {self.quantize!r}")
        if self.block < 2 or self.block % 2:
            raise ConfigError(f"model.lora.block must be an even number >= 2, got {self.block}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class QuantizedKernel(nnx.Variable):
    """A frozen quantized kernel's codes or scales. Not an ``nnx.Param``: optimizers never see it."""


# --------------------------------------------------------------------------------------------------------------------
# the model side


def _projections(model: Any, targets: Sequence[str] = tuple(TARGETS)) -> Iterator[tuple[int | None, str, Any]]:
    """``(layer index or None for a stacked scan block, name, the module holding it)`` of every target projection."""
    blocks = [(None, model.layers)] if model.config.scan_layers else list(enumerate(model.layers))
    for index, block in blocks:
        for name in targets:
            yield index, name, getattr(block, TARGETS[name][0])


def has_lora(model: Any) -> bool:
    """Whether ``model`` carries adapters."""
    return any(getattr(module, f"{name}_lora_a", None) is not None for _, name, module in _projections(model))


def dropout_rate(model: Any) -> float:
    """The adapters' dropout rate (0 without adapters)."""
    return max((getattr(module, "lora_dropout", 0.0) for _, _, module in _projections(model)), default=0.0)


def add_lora(model: Any, spec: LoraSpec, *, seed: int = 0) -> Any:
    """Attaches adapters (A uniform, B zero) beside every target kernel of ``model``, in place; returns it."""
    if has_lora(model):
        raise ConfigError("the model already has LoRA adapters")
    stacked = (model.config.num_layers,) if model.config.scan_layers else ()
    lead_axes = ("layers",) if stacked else ()
    key = jax.random.key(seed)
    for i, (_, name, module) in enumerate(_projections(model, spec.targets)):
        kernel = getattr(module, name)
        axes = tuple(kernel.get_metadata()["out_sharding"])[len(stacked) :]
        shape = kernel.shape[len(stacked) :]
        n_in = TARGETS[name][2]
        bound = 1.0 / math.sqrt(math.prod(shape[:n_in]))  # PEFT's kaiming_uniform(a=sqrt(5)): U(±1/sqrt(fan_in))
        dtype = jnp.float32  # the trained params: fp32 master weights whatever the base's storage
        a = jax.random.uniform(jax.random.fold_in(key, i), stacked + shape[:n_in] + (spec.rank,), dtype, -bound, bound)
        b = jnp.zeros(stacked + (spec.rank,) + shape[n_in:], dtype)
        a_axes, b_axes = lead_axes + axes[:n_in] + (None,), lead_axes + (None,) + axes[n_in:]
        setattr(module, f"{name}_lora_a", nnx.LoRAParam(a, out_sharding=a_axes, eager_sharding=False))
        setattr(module, f"{name}_lora_b", nnx.LoRAParam(b, out_sharding=b_axes, eager_sharding=False))
        module.lora_scale = spec.scale
        module.lora_dropout = spec.dropout
    return model


def quantize_base(model: Any, spec: LoraSpec) -> Any:
    """Replaces every target kernel by its ``spec.quantize`` codes and per-block scales, in place; returns it.

    Call after :func:`add_lora` (the adapters take the kernel's shape and axes).
    """
    if spec.quantize == "none":
        return model
    for _, name, module in _projections(model, spec.targets):
        kernel = getattr(module, name)
        if kernel.shape[-1] % spec.block:
            raise ConfigError(
                f"model.lora.block={spec.block} does not divide {name}'s last dimension {kernel.shape[-1]}; pick a "
                "block that does (64 for the released models' head and MLP sizes)"
            )
        axes = tuple(kernel.get_metadata()["out_sharding"])
        codes, scales = _QUANTIZE[spec.quantize](jnp.asarray(kernel[...], jnp.float32), spec.block)
        delattr(module, name)
        setattr(module, f"{name}_codes", QuantizedKernel(codes, out_sharding=axes, eager_sharding=False))
        setattr(module, f"{name}_scales", QuantizedKernel(scales, out_sharding=axes, eager_sharding=False))
        module.quantized = (*quantized_kinds(module).items(), (name, spec.quantize))
    return model


def quantized_kinds(module: Any) -> dict[str, str]:
    """``{kernel name: nf4 | int8}`` of the module's quantized kernels. (Kept on the module as a tuple of pairs: a
    module's static attributes must be hashable, they are part of its graph definition.)"""
    return dict(getattr(module, "quantized", ()))


def _blocks_of(w: jax.Array, block: int) -> jax.Array:
    return w.reshape(*w.shape[:-1], w.shape[-1] // block, block)


def _nf4_quantize(w: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    blocks = _blocks_of(w, block)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    normed = blocks / jnp.where(absmax == 0, 1.0, absmax)[..., None]
    midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    codes = jnp.searchsorted(midpoints, normed).astype(jnp.uint8).reshape(w.shape)  # the nearest level
    return (codes[..., 0::2] << 4) | codes[..., 1::2], absmax  # two codes per byte, the first in the high nibble


def _int8_quantize(w: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    blocks = _blocks_of(w, block)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    step = jnp.where(absmax == 0, 1.0, absmax)[..., None] / 127.0
    return jnp.clip(jnp.round(blocks / step), -127, 127).astype(jnp.int8).reshape(w.shape), absmax


_QUANTIZE = {"nf4": _nf4_quantize, "int8": _int8_quantize}


def dequantize(kind: str, codes: jax.Array, scales: jax.Array, dtype: Any) -> jax.Array:
    """The kernel that ``kind`` codes and per-block absmax ``scales`` stand for, in ``dtype``."""
    if kind == "nf4":
        values = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(*codes.shape[:-1], codes.shape[-1] * 2)
        values = jnp.asarray(NF4_LEVELS)[values]
    else:
        values = codes.astype(jnp.float32) / 127.0
    block = values.shape[-1] // scales.shape[-1]
    values = _blocks_of(values, block) * scales[..., None].astype(jnp.float32)
    return values.reshape(*values.shape[:-2], -1).astype(dtype)


def adapted(module: Any, name: str, x: jax.Array, y: jax.Array, dtype: Any, contract: int, rng: Any) -> jax.Array:
    """``y`` plus the adapter's ``scale · (dropout(x) @ A) @ B`` when ``module.<name>`` has one (else ``y``).

    ``rng`` (a key, or ``None`` outside training) drives the adapter dropout.
    """
    a = getattr(module, f"{name}_lora_a", None)
    if a is None:
        return y
    b = getattr(module, f"{name}_lora_b")
    rate = getattr(module, "lora_dropout", 0.0)
    if rate > 0 and rng is not None:
        keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
    size_in, rank = math.prod(a.shape[:contract]), a.shape[-1]
    h = jnp.dot(x.reshape(-1, size_in), a[...].astype(dtype).reshape(size_in, rank))
    delta = jnp.dot(h, b[...].astype(dtype).reshape(rank, -1)).reshape(y.shape)
    return y + delta * jnp.asarray(module.lora_scale, dtype)


# --------------------------------------------------------------------------------------------------------------------
# merging and the PEFT format


def _adapter_arrays(module: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(jax.device_get(getattr(module, f"{name}_lora_a")[...]), np.float32)
    b = np.asarray(jax.device_get(getattr(module, f"{name}_lora_b")[...]), np.float32)
    return a, b


def _delta(a: jax.Array, b: jax.Array, scale: float, kernel_shape: tuple[int, ...], stacked: bool) -> jax.Array:
    """``scale · A @ B`` in the kernel's layout, in float32 (``stacked``: a leading layer axis on all three)."""
    rank, lead = a.shape[-1], a.shape[:1] if stacked else ()
    a2 = jnp.asarray(a, jnp.float32).reshape(*lead, -1, rank)
    b2 = jnp.asarray(b, jnp.float32).reshape(*lead, rank, -1)
    return (jnp.matmul(a2, b2) * scale).reshape(kernel_shape)


def merged_params(adapters: Any, frozen: Any, spec: LoraSpec, *, stacked: bool) -> Any:
    """The plain model's params (a pure dict, as ``nnx.to_pure_dict`` gives them) from a LoRA model's ``adapters``
    and ``frozen`` base dicts: every kernel with its adapter's update folded in, quantized ones dequantized.

    A pure function of arrays (jit it): evaluating a LoRA run with code written for the plain model.
    """

    def merge(adapter_node: Any, frozen_node: Any) -> Any:
        if not isinstance(frozen_node, dict):
            return frozen_node
        out = {}
        for key, value in frozen_node.items():
            name = str(key)
            if name.endswith("_scales"):
                continue
            if name.endswith("_codes"):
                kernel_name = name[: -len("_codes")]
                kernel = dequantize(spec.quantize, value, frozen_node[f"{kernel_name}_scales"], jnp.float32)
                out[kernel_name] = _with_adapter(kernel, adapter_node, kernel_name)
            elif isinstance(value, dict):
                out[key] = merge((adapter_node or {}).get(key), value)
            else:
                out[key] = _with_adapter(value, adapter_node, name)
        return out

    def _with_adapter(kernel: jax.Array, adapter_node: Any, name: str) -> jax.Array:
        a = (adapter_node or {}).get(f"{name}_lora_a")
        if a is None:
            return kernel
        delta = _delta(a, adapter_node[f"{name}_lora_b"], spec.scale, kernel.shape, stacked)
        return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)

    return merge(adapters, frozen)


def merge_lora(model: Any) -> Any:
    """Folds every adapter into its kernel and removes the adapters, in place; returns the plain model.

    A quantized kernel is dequantized first (the weights the adapters were trained against), so the merged model's
    logits equal the adapted model's up to float rounding.
    """
    stacked = model.config.scan_layers
    for _, name, module in _projections(model):
        kind = quantized_kinds(module).get(name)
        if getattr(module, f"{name}_lora_a", None) is None and kind is None:
            continue
        if kind is not None:
            codes, scales = getattr(module, f"{name}_codes")[...], getattr(module, f"{name}_scales")[...]
            kernel = np.asarray(jax.device_get(dequantize(kind, codes, scales, jnp.float32)))
            axes = tuple(getattr(module, f"{name}_codes").get_metadata()["out_sharding"])
            delattr(module, f"{name}_codes")
            delattr(module, f"{name}_scales")
            setattr(module, name, nnx.Param(jnp.asarray(kernel), out_sharding=axes, eager_sharding=False))
        if getattr(module, f"{name}_lora_a", None) is not None:
            a, b = _adapter_arrays(module, name)
            kernel = getattr(module, name)
            delta = _delta(a, b, module.lora_scale, kernel.shape, stacked)
            kernel.set_value((jnp.asarray(kernel[...], jnp.float32) + delta).astype(kernel.dtype))
            delattr(module, f"{name}_lora_a")
            delattr(module, f"{name}_lora_b")
    for _, _, module in _projections(model):
        for attribute in ("lora_scale", "lora_dropout", "quantized"):
            if hasattr(module, attribute):
                delattr(module, attribute)
    return model


def _peft_prefix(layer: int, name: str) -> str:
    return f"base_model.model.model.layers.{layer}.{TARGETS[name][1]}"


def peft_tensors(model: Any) -> dict[str, np.ndarray]:
    """The adapters under PEFT's names: ``...layers.{i}.<module>.lora_A.weight`` ``[r, in]``, ``lora_B`` ``[out, r]``."""
    out = {}
    for index, name, module in _projections(model):
        if getattr(module, f"{name}_lora_a", None) is None:
            continue
        a, b = _adapter_arrays(module, name)
        per_layer = enumerate(zip(a, b)) if index is None else [(index, (a, b))]
        for layer, (a_i, b_i) in per_layer:
            rank = a_i.shape[-1]
            out[f"{_peft_prefix(layer, name)}.lora_A.weight"] = np.ascontiguousarray(a_i.reshape(-1, rank).T)
            out[f"{_peft_prefix(layer, name)}.lora_B.weight"] = np.ascontiguousarray(b_i.reshape(rank, -1).T)
    return out


def save_peft(model: Any, spec: LoraSpec, directory: str | Path, *, base_model: str | None = None) -> Path:
    """Writes ``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained`` loads
    onto the base model (``base_model`` is recorded as ``base_model_name_or_path``)."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(peft_tensors(model), str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.rslora,
        "target_modules": sorted(spec.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _spec_from_peft(config: dict[str, Any], where: str) -> LoraSpec:
    unsupported = [
        key
        for key in ("use_dora", "fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern")
        if config.get(key)
    ]
    if config.get("peft_type", "LORA") != "LORA" or unsupported or config.get("bias", "none") != "none":
        raise ConfigError(f"{where}: only plain LoRA adapters load here (unsupported: {unsupported or 'peft_type'})")
    targets = config.get("target_modules") or []
    if isinstance(targets, str) or any(t not in TARGETS for t in targets):
        raise ConfigError(f"{where}: target_modules {targets!r} are not among {', '.join(TARGETS)}")
    return LoraSpec(
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        targets=tuple(sorted(targets, key=list(TARGETS).index)),
        rslora=bool(config.get("use_rslora", False)),
    )


def load_peft(model: Any, directory: str | Path) -> tuple[Any, LoraSpec]:
    """Adds the adapters of a PEFT directory to ``model`` (its base), in place; returns ``(model, spec)``.

    Raises:
      ConfigError: not a LoRA adapter directory, an unsupported PEFT option, or tensors that do not fit the model.
    """
    from safetensors.numpy import load_file

    directory = Path(directory)
    if not all((directory / name).is_file() for name in PEFT_FILES):
        raise ConfigError(f"{directory} is not a PEFT adapter directory (it needs {' and '.join(PEFT_FILES)})")
    spec = _spec_from_peft(json.loads((directory / "adapter_config.json").read_text()), str(directory))
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    add_lora(model, dataclasses.replace(spec, dropout=0.0))
    for index, name, module in _projections(model, spec.targets):
        a_var, b_var = getattr(module, f"{name}_lora_a"), getattr(module, f"{name}_lora_b")
        layers = range(model.config.num_layers) if index is None else [index]
        a_parts, b_parts = [], []
        for layer in layers:
            prefix = _peft_prefix(layer, name)
            try:
                a_hf, b_hf = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
            except KeyError as e:
                raise ConfigError(f"{directory}: no tensor {e.args[0]}") from None
            a_parts.append(a_hf.T)
            b_parts.append(b_hf.T)
        a = np.stack(a_parts) if index is None else a_parts[0]
        b = np.stack(b_parts) if index is None else b_parts[0]
        if a.size != a_var.size or b.size != b_var.size:
            raise ConfigError(f"{directory}: {name}'s adapters do not fit the base model ({a.shape}, {b.shape})")
        a_var.set_value(jnp.asarray(a.reshape(a_var.shape), a_var.dtype))
        b_var.set_value(jnp.asarray(b.reshape(b_var.shape), b_var.dtype))
    return model, spec

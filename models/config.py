"""Model configuration: one dataclass for the Llama-family decoders, named presets, and Hugging Face conversion.

The same :class:`ModelConfig` describes Llama / Llama-3, SmolLM2 (a Llama), Qwen2 (q/k/v bias) and Qwen3 (per-head
q/k RMSNorm). Only the options the transformer implements are representable; :func:`ModelConfig.from_hf_config`
refuses anything else with an error naming the field, so an unsupported checkpoint never loads silently wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from models.attention import ATTENTION_IMPLS

__all__ = ["ModelConfig", "RopeScaling", "ConfigError", "get_preset", "PRESETS", "REMAT_POLICIES"]

# What a rematerialised block saves for the backward pass (everything else is recomputed there).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class ConfigError(ValueError):
    """A configuration that cannot be used (a file, key, value, preset or model name); the message names it."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling ("rope_type": "llama3" in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only Llama-family LM.

    Attributes:
      vocab_size: number of token embeddings (rows of the embedding matrix).
      d_model: residual stream width (HF ``hidden_size``).
      num_layers: transformer blocks.
      num_heads: query heads.
      num_kv_heads: key/value heads (grouped-query attention when < ``num_heads``).
      head_dim: width of one attention head.
      mlp_dim: SwiGLU hidden width (HF ``intermediate_size``).
      rms_norm_eps: epsilon inside every RMSNorm.
      rope_theta: RoPE base frequency.
      rope_scaling: Llama-3 rope scaling, or ``None``.
      tie_embeddings: output projection shares the token embedding matrix.
      attention_bias: q/k/v projections carry a bias (Qwen2).
      qk_norm: per-head RMSNorm on queries and keys before RoPE (Qwen3).
      max_position_embeddings: the context length the checkpoint was trained for (informational, and exported).
      architecture: "llama", "qwen2" or "qwen3"; only decides the HF ``model_type`` on export.
      bos_token_id / eos_token_id: exported into ``config.json``; the tokenizer is the source of truth.
      dtype: compute dtype of activations and matmuls. Logits are always float32.
      param_dtype: storage dtype of parameters.
      remat: rematerialise each block in the backward pass (``jax.checkpoint``).
      remat_policy: what a rematerialised block keeps from its forward pass, a key of :data:`REMAT_POLICIES`
        (``full``: nothing but its input; ``dots``: every matmul output; ``dots_no_batch``: the weight matmuls'
        outputs, recomputing attention). Used only when ``remat`` is on.
      scan_layers: stack the blocks along a leading "layers" axis and ``lax.scan`` over them (faster compiles).
      attention_impl: a key of :data:`models.attention.ATTENTION_IMPLS` (``dense``, ``dot_product``, ``blockwise``,
        ``splash``). Default ``blockwise``: on CPU it trains SmolLM2 at 4 x 512 tokens 1.47× faster than ``dense``
        (interleaved A/B, docs/bench.md) with the same loss and gradients.
      loss_chunk_size: the training loss (:func:`models.loss.token_nll`) runs the LM head and cross-entropy this
        many positions at a time, so the fp32 ``[B, T, vocab]`` logits never exist at once; a value ≥ the sequence
        length computes them in one piece (the unchunked loss, e.g. to measure what chunking costs).
      fuse_projections: compute q/k/v as one matmul and gate/up as one, against their kernels concatenated at run
        time (the parameters, checkpoints and exports stay as they are). Same numbers up to float rounding.
      fuse_rmsnorm / fuse_rope / fuse_swiglu: RMSNorm, rotary embeddings and ``silu(gate) * up`` with hand-written
        backward passes (:mod:`models.elementwise`) instead of autodiff's. The same function and gradients up to float
        rounding; off by default because they measured no faster here (docs/bench.md).
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = True
    attention_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 2048
    architecture: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    remat_policy: str = "full"
    scan_layers: bool = False
    attention_impl: str = "blockwise"
    loss_chunk_size: int = 512
    fuse_projections: bool = False
    fuse_rmsnorm: bool = False
    fuse_rope: bool = False
    fuse_swiglu: bool = False

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "d_model",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "mlp_dim",
            "loss_chunk_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"ModelConfig.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"ModelConfig.head_dim={self.head_dim} must be even for rotary embeddings")
        if self.architecture not in _MODEL_TYPES:
            raise ConfigError(
                f"ModelConfig.architecture={self.architecture!r} is not supported; choose one of {sorted(_MODEL_TYPES)}"
            )
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(
                f"ModelConfig.remat_policy={self.remat_policy!r} is unknown; choose one of {sorted(REMAT_POLICIES)}"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(
                f"ModelConfig.attention_impl={self.attention_impl!r} is unknown; choose one of {sorted(ATTENTION_IMPLS)}"
            )

    @property
    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        attn = self.d_model * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.attention_bias:
            attn += self.head_dim * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * self.head_dim
        block = attn + 3 * self.d_model * self.mlp_dim + 2 * self.d_model
        embed = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        return self.num_layers * block + embed + self.d_model

    # The fields that decide which parameters a model has and their shapes: two configs that agree on them hold
    # params of one tree structure (a base model and its fine-tune, for instance).
    STRUCTURE_FIELDS = (
        "vocab_size",
        "d_model",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "mlp_dim",
        "tie_embeddings",
        "attention_bias",
        "qk_norm",
    )

    def structure_differences(self, other: ModelConfig) -> list[tuple[str, Any, Any]]:
        """``(field, mine, other's)`` for every :attr:`STRUCTURE_FIELDS` entry on which the two configs differ.

        >>> get_preset("tiny").structure_differences(get_preset("tiny", tie_embeddings=False))
        [('tie_embeddings', True, False)]
        """
        return [
            (name, getattr(self, name), getattr(other, name))
            for name in self.STRUCTURE_FIELDS
            if getattr(self, name) != getattr(other, name)
        ]

    # ----------------------------------------------------------------------------------------------------------------
    # Hugging Face config.json
    # ----------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any] | str | Path, **overrides: Any) -> ModelConfig:
        """Builds a config from a Hugging Face ``config.json`` (path or parsed dict).

        Raises:
          ConfigError: naming the field when the architecture or an option is not supported.
        """
        source = "config.json"
        if not isinstance(hf, dict):
            source = str(hf)
            try:
                hf = json.loads(Path(hf).read_text())
            except FileNotFoundError:
                raise ConfigError(f"{source}: file not found") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{source}: not valid JSON ({e})") from None
        model_type = hf.get("model_type")
        architecture = {v: k for k, v in _MODEL_TYPES.items()}.get(model_type)
        if architecture is None:
            raise ConfigError(
                f"{source}: model_type={model_type!r} is not supported; supported: {sorted(_MODEL_TYPES.values())}"
            )

        def need(key: str) -> Any:
            if key not in hf or hf[key] is None:
                raise ConfigError(f"{source}: required field {key!r} is missing")
            return hf[key]

        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act={act!r} is not supported (only 'silu' / SwiGLU)")
        if hf.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=True is not supported")
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"{source}: pretraining_tp={hf['pretraining_tp']} is not supported")
        if hf.get("use_sliding_window") and architecture != "llama":
            raise ConfigError(f"{source}: use_sliding_window=True is not supported")
        if hf.get("layer_types") and any(t != "full_attention" for t in hf["layer_types"]):
            raise ConfigError(f"{source}: layer_types other than 'full_attention' are not supported")
        if hf.get("attention_dropout", 0.0):
            raise ConfigError(f"{source}: attention_dropout={hf['attention_dropout']} is not supported")

        num_heads = need("num_attention_heads")
        d_model = need("hidden_size")
        head_dim = hf.get("head_dim") or d_model // num_heads
        if architecture == "qwen2":
            attention_bias = True  # Qwen2 always has q/k/v biases and no o bias; the config has no flag for it.
        else:
            attention_bias = bool(hf.get("attention_bias", False))
            if attention_bias:
                raise ConfigError(
                    f"{source}: attention_bias=True is only supported for model_type 'qwen2' (bias on q/k/v but not o)"
                )

        rope_theta = hf.get("rope_theta")
        rope_params = hf.get("rope_parameters")  # transformers >= 5 keeps theta and scaling here
        rope_scaling_dict = hf.get("rope_scaling")
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling_dict = rope_params
        rope_scaling = None
        if rope_scaling_dict:
            rope_type = rope_scaling_dict.get("rope_type", rope_scaling_dict.get("type"))
            if rope_type == "default":
                pass
            elif rope_type == "llama3":
                rope_scaling = RopeScaling(
                    factor=float(rope_scaling_dict["factor"]),
                    low_freq_factor=float(rope_scaling_dict["low_freq_factor"]),
                    high_freq_factor=float(rope_scaling_dict["high_freq_factor"]),
                    original_max_position_embeddings=int(rope_scaling_dict["original_max_position_embeddings"]),
                )
            else:
                raise ConfigError(f"{source}: rope_scaling type {rope_type!r} is not supported (only 'llama3')")

        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        kwargs = dict(
            vocab_size=need("vocab_size"),
            d_model=d_model,
            num_layers=need("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            mlp_dim=need("intermediate_size"),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10_000.0),
            rope_scaling=rope_scaling,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            qk_norm=architecture == "qwen3",
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            architecture=architecture,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict that transformers loads into the equivalent model."""
        model_type = _MODEL_TYPES[self.architecture]
        hf: dict[str, Any] = {
            "architectures": [_HF_CLASSES[self.architecture]],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "intermediate_size": self.mlp_dim,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_dropout": 0.0,
            "torch_dtype": "float32",
            "use_cache": True,
        }
        if self.architecture == "llama":
            hf["attention_bias"] = False
            hf["mlp_bias"] = False
        if self.architecture == "qwen2":
            hf["use_sliding_window"] = False
        if self.architecture == "qwen3":
            hf["attention_bias"] = False
            hf["use_sliding_window"] = False
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.bos_token_id is not None:
            hf["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            hf["eos_token_id"] = self.eos_token_id
        return hf


_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

_QWEN3_0_6B = ModelConfig(
    vocab_size=151936,
    d_model=1024,
    num_layers=28,
    num_heads=16,
    num_kv_heads=8,
    head_dim=128,
    mlp_dim=3072,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    qk_norm=True,
    architecture="qwen3",
    max_position_embeddings=40960,
    bos_token_id=151643,
    eos_token_id=151645,
)

PRESETS: dict[str, ModelConfig] = {
    # Small enough for unit tests on CPU; vocab 512 covers a byte-level vocabulary plus specials.
    "tiny": ModelConfig(
        vocab_size=512,
        d_model=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        mlp_dim=128,
        rope_theta=10_000.0,
        max_position_embeddings=512,
    ),
    "smollm2-135m": ModelConfig(
        vocab_size=49152,
        d_model=576,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        mlp_dim=1536,
        rms_norm_eps=1e-5,
        rope_theta=100_000.0,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen3-0.6b": _QWEN3_0_6B,
    # Qwen3-4B: the same architecture at another size.
    "qwen3-4b": dataclasses.replace(_QWEN3_0_6B, d_model=2560, num_layers=36, num_heads=32, mlp_dim=9728),
    "llama3-8b": ModelConfig(
        vocab_size=128256,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        mlp_dim=14336,
        rms_norm_eps=1e-5,
        rope_theta=500_000.0,
        tie_embeddings=False,
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    # Llama-2-70B (meta-llama/Llama-2-70b-hf config.json): the model MaxText reports its training MFU for on TPU
    # pods, compiled by docs/scale.md to check the roofline estimate against those measurements.
    "llama2-70b": ModelConfig(
        vocab_size=32000,
        d_model=8192,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        mlp_dim=28672,
        rms_norm_eps=1e-5,
        rope_theta=10_000.0,
        tie_embeddings=False,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """Returns the named preset config, optionally with fields replaced.

    Example:
      >>> get_preset("tiny").d_model
      64
    """
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}") from None
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def _check_rope_scaling(scaling: RopeScaling) -> None:
    if not (math.isfinite(scaling.factor) and scaling.factor > 0):
        raise ConfigError(f"RopeScaling.factor must be positive, got {scaling.factor}")
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise ConfigError(
            f"RopeScaling.high_freq_factor ({scaling.high_freq_factor}) must exceed "
            f"low_freq_factor ({scaling.low_freq_factor})"
        )

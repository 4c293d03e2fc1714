r"""Model FLOPs of a decoder-only transformer, counted matmul by matmul.

The count is the *model* FLOPs used for MFU (PaLM, Chowdhery et al. 2022, appendix B): every matrix multiply the
architecture needs, at 2 FLOPs per multiply-add, and nothing else. Elementwise work (norms, rotary, softmax,
SwiGLU gating, the loss) is left out, and so is any recomputation from rematerialisation: a remat step does more
work but the model does not, so MFU stays comparable across remat choices.

For one token at position t of a sequence of length T, per layer (``d`` = embed, ``H``/``K`` = query/KV heads,
``h`` = head dim, ``F`` = MLP hidden):

.. math::

  \underbrace{2dHh}_{q} + \underbrace{2 \cdot 2dKh}_{k,\,v} + \underbrace{2Hhd}_{o}
  + \underbrace{2HhT}_{q k^\top} + \underbrace{2HhT}_{p\,v} + \underbrace{3 \cdot 2dF}_{\text{SwiGLU}}

plus the LM head :math:`2dV` once per token. The embedding lookup is a gather, not a matmul (even when its table is
tied with the head). Attention counts all T keys per query, as a dense masked implementation computes them and as
PaLM's MFU convention does; ``causal_attention=True`` counts only the unmasked half, (T + 1) / 2 on average.

Training is forward × 3: the backward pass multiplies every matmul twice (one for the input gradient, one for the
weight gradient).
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = [
    "TransformerShape",
    "shape_of",
    "forward_flops_per_token",
    "training_flops_per_token",
    "training_flops_per_step",
    "matmul_param_count",
    "mfu",
]


@dataclasses.dataclass(frozen=True)
class TransformerShape:
    """The sizes that determine a Llama-family decoder's matmul FLOPs."""

    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TransformerShape.{field.name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"TransformerShape: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )


# Field names tried, in order, on a model config object (ours first, then Hugging Face's spelling).
_ALIASES: dict[str, tuple[str, ...]] = {
    "vocab_size": ("vocab_size",),
    "embed_dim": ("embed_dim", "d_model", "hidden_size", "emb_dim"),
    "num_layers": ("num_layers", "n_layers", "num_hidden_layers"),
    "num_heads": ("num_heads", "n_heads", "num_attention_heads"),
    "num_kv_heads": ("num_kv_heads", "n_kv_heads", "num_key_value_heads"),
    "head_dim": ("head_dim",),
    "mlp_dim": ("mlp_dim", "hidden_dim", "ffn_dim", "intermediate_size"),
}


def shape_of(cfg: Any) -> TransformerShape:
    """Reads a :class:`TransformerShape` from a model config (``models`` dataclass or a HF ``LlamaConfig``).

    Args:
      cfg: an object with the fields listed in ``_ALIASES`` (any one spelling each); ``head_dim`` may be absent,
        then it is ``embed_dim // num_heads`` as in Hugging Face Llama.

    Returns:
      The shape.
    """
    if isinstance(cfg, TransformerShape):
        return cfg
    values: dict[str, int] = {}
    for name, aliases in _ALIASES.items():
        for alias in aliases:
            value = getattr(cfg, alias, None)
            if value is not None:
                values[name] = int(value)
                break
    if "head_dim" not in values and "embed_dim" in values and "num_heads" in values:
        values["head_dim"] = values["embed_dim"] // values["num_heads"]
    missing = [name for name in _ALIASES if name not in values]
    if missing:
        raise ValueError(
            f"shape_of: config {type(cfg).__name__} lacks {missing}; "
            f"accepted spellings: { {m: _ALIASES[m] for m in missing} }"
        )
    return TransformerShape(**values)


def matmul_param_count(shape: TransformerShape) -> int:
    """Number of weights that take part in a matmul per token (all layers plus the LM head)."""
    d, h = shape.embed_dim, shape.head_dim
    attention = d * shape.num_heads * h * 2 + d * shape.num_kv_heads * h * 2
    mlp = 3 * d * shape.mlp_dim
    return shape.num_layers * (attention + mlp) + d * shape.vocab_size


def forward_flops_per_token(
    shape: TransformerShape, seq_len: int, *, causal_attention: bool = False
) -> dict[str, float]:
    """Forward matmul FLOPs per token, by part.

    Args:
      shape: model sizes.
      seq_len: tokens per sequence (T); attention reads T keys per query.
      causal_attention: count only the unmasked keys, (T + 1) / 2 on average, instead of all T.

    Returns:
      ``{"attention_projections", "attention_scores", "attention_values", "mlp", "lm_head", "total"}``.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    d, h, layers = shape.embed_dim, shape.head_dim, shape.num_layers
    keys = (seq_len + 1) / 2 if causal_attention else seq_len
    parts = {
        "attention_projections": layers * 2 * d * h * (2 * shape.num_heads + 2 * shape.num_kv_heads),
        "attention_scores": layers * 2 * shape.num_heads * h * keys,
        "attention_values": layers * 2 * shape.num_heads * h * keys,
        "mlp": layers * 3 * 2 * d * shape.mlp_dim,
        "lm_head": 2 * d * shape.vocab_size,
    }
    parts = {k: float(v) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def training_flops_per_token(shape: TransformerShape, seq_len: int, *, causal_attention: bool = False) -> float:
    """Forward + backward matmul FLOPs per token: 3 × forward."""
    return 3.0 * forward_flops_per_token(shape, seq_len, causal_attention=causal_attention)["total"]


def training_flops_per_step(
    shape: TransformerShape, batch_size: int, seq_len: int, *, causal_attention: bool = False
) -> float:
    """Model FLOPs of one optimizer step over ``batch_size`` sequences of ``seq_len`` tokens."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return batch_size * seq_len * training_flops_per_token(shape, seq_len, causal_attention=causal_attention)


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak FLOP/s, a fraction in [0, ~1].

    Examples:
      >>> round(mfu(1e12, 2.0, 1e12), 3)
      0.5
    """
    if step_seconds <= 0 or peak_flops_per_second <= 0:
        raise ValueError(f"mfu needs positive step time and peak, got {step_seconds=} {peak_flops_per_second=}")
    return flops_per_step / step_seconds / peak_flops_per_second

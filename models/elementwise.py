"""The transformer's elementwise ops — RMSNorm, rotary embeddings, SiLU × gate — each two ways: plain (autodiff
takes the gradient) and ``*_fused``, the same function with a hand-written backward.

Autodiff of these ops is correct but leaves XLA a backward made of many small pieces: RMSNorm's keeps the float32
copy of its input and the normalised activations alive and reduces twice; RoPE's transposes its slices and
concatenation into pads and adds; the gated unit's saves ``silu(gate)`` beside ``gate`` and ``up``. Each function
``*_fused`` here is a ``jax.custom_vjp`` whose backward is one closed-form expression over the fewest residuals (the input and,
for RMSNorm, one reciprocal norm per row), so XLA can emit it as one loop fusion.

Both compute the same function; the gradients agree up to float rounding (``tests/test_models_elementwise.py``,
float32 and bfloat16). The model uses the fused ones when
``ModelConfig.fuse_rmsnorm`` / ``fuse_rope`` / ``fuse_swiglu`` is on. Whether that is faster is a measurement
(``python -m train bench --sections variants``, docs/bench.md), not an assumption.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["rms_norm", "rms_norm_fused", "rope", "rope_fused", "swiglu", "swiglu_fused"]


# --- RMSNorm -------------------------------------------------------------------------------------------------------


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``x / rms(x) * weight`` over the last axis, the statistics in float32, the result cast back to ``x.dtype``
    before the weight multiplies it (as Hugging Face's RMSNorm does, for bf16 parity)."""
    return _rms_norm_forward(x, weight, eps)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm_fused(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """:func:`rms_norm` with a hand-written backward that keeps only ``x`` and one reciprocal norm per row."""
    return rms_norm(x, weight, eps)


def _rms_norm_forward(x, weight, eps):
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    y = (x32 * inv_rms).astype(x.dtype) * weight.astype(x.dtype)
    return y, (x, weight, inv_rms)


def _rms_norm_backward(eps, residuals, g):
    del eps  # lives in inv_rms
    x, weight, inv_rms = residuals
    normed = x.astype(jnp.float32) * inv_rms
    # d weight: the cotangent against the normalised input, summed over every token (in the compute dtype's product,
    # float32 sum).
    per_token = (g * normed.astype(x.dtype)).astype(jnp.float32)
    d_weight = jnp.sum(per_token, axis=tuple(range(g.ndim - 1))).astype(weight.dtype)
    # d x: with n = x * r and r = (mean(x^2) + eps)^(-1/2), dx = r * (gn - n * mean(gn * n)) where gn = g * weight.
    gn = (g * weight.astype(g.dtype)).astype(jnp.float32)
    d_x = inv_rms * (gn - normed * jnp.mean(gn * normed, axis=-1, keepdims=True))
    return d_x.astype(x.dtype), d_weight


rms_norm_fused.defvjp(_rms_norm_forward, _rms_norm_backward)


# --- rotary embeddings ----------------------------------------------------------------------------------------------


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE of ``x [B, T, heads, D]`` by the angles whose cosines and sines are ``cos``/``sin``
    ``[B, T, D/2]``, in float32, cast back to ``x.dtype``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@jax.custom_vjp
def rope_fused(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """:func:`rope` with the rotation by the opposite angle as its backward. Gradients flow to ``x`` only: the
    tables are functions of the positions, never of parameters."""
    return rope(x, cos, sin)


def _rope_forward(x, cos, sin):
    return rope(x, cos, sin), (cos, sin)


def _rope_backward(residuals, g):
    # A rotation's transpose is the rotation by the opposite angle: the cotangent rotated with -sin.
    cos, sin = residuals
    return rope(g, cos, -sin), jnp.zeros_like(cos), jnp.zeros_like(sin)


rope_fused.defvjp(_rope_forward, _rope_backward)


# --- SiLU x gate ------------------------------------------------------------------------------------------------------


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up``: the SwiGLU hidden activation."""
    return jax.nn.silu(gate) * up


@jax.custom_vjp
def swiglu_fused(gate: jax.Array, up: jax.Array) -> jax.Array:
    """:func:`swiglu` with a backward from the saved ``gate`` and ``up`` alone."""
    return swiglu(gate, up)


def _swiglu_forward(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_backward(residuals, g):
    # silu(a) = a * s(a) with s the sigmoid; silu'(a) = s(a) * (1 + a * (1 - s(a))). Recomputing s from the saved
    # gate is cheaper on memory than saving silu(gate) and s beside it.
    gate, up = residuals
    a, u, g32 = gate.astype(jnp.float32), up.astype(jnp.float32), g.astype(jnp.float32)
    s = jax.nn.sigmoid(a)
    d_gate = g32 * u * s * (1.0 + a * (1.0 - s))
    d_up = g32 * a * s
    return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


swiglu_fused.defvjp(_swiglu_forward, _swiglu_backward)

"""A Llama-family decoder-only transformer in Flax NNX.

One implementation covers Llama / Llama-3 (rope scaling), SmolLM2, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k
RMSNorm). Numerics follow the Hugging Face reference implementations: RMSNorm and softmax in float32, rotary
embeddings in the rotate-half layout, grouped-query attention where query head ``h`` reads key/value head
``h // (num_heads // num_kv_heads)``.

Every parameter is an ``nnx.Param`` whose ``out_sharding`` metadata holds its logical axis names;
:func:`logical_axes` returns them as a plain pytree so training code can map them to a mesh with a rules table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import elementwise, lora
from models.attention import attend
from models.config import REMAT_POLICIES, ModelConfig, RopeScaling
from models.sharding import constrain

__all__ = ["CausalLM", "KVCache", "logical_axes", "rope_inverse_frequencies", "init_cache"]

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


def _scaled_normal(fan_in: int) -> Initializer:
    """LeCun-normal: unit-variance activations at init whatever the layer width."""
    return _normal(fan_in**-0.5)


def _normal(stddev: float) -> Initializer:
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        return jax.random.normal(key, shape, dtype) * stddev

    return init


def _constant(value: float) -> Initializer:
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        del key
        return jnp.full(shape, value, dtype)

    return init


def _param(
    rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: Any, init: Initializer
) -> nnx.Param:
    # eager_sharding=False: logical names are metadata only; train/ places parameters on a mesh with its own rules.
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm, computed in float32 like the HF reference."""

    def __init__(
        self, dim: int, axis_name: str, eps: float, param_dtype: Any, *, rngs: nnx.Rngs, fused_backward: bool = False
    ):
        self.eps, self.fused_backward = eps, fused_backward
        self.weight = _param(rngs, (dim,), (axis_name,), param_dtype, _constant(1.0))

    def __call__(self, x: jax.Array) -> jax.Array:
        norm = elementwise.rms_norm_fused if self.fused_backward else elementwise.rms_norm
        return norm(x, self.weight[...], self.eps)


def _norm(cfg: ModelConfig, dim: int, axis_name: str, rngs: nnx.Rngs) -> RMSNorm:
    return RMSNorm(dim, axis_name, cfg.rms_norm_eps, cfg.param_dtype, rngs=rngs, fused_backward=cfg.fuse_rmsnorm)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    r"""RoPE inverse frequencies :math:`\theta^{-2i/d}`, with Llama-3 scaling when given.

    Llama-3 scaling divides low frequencies (wavelength above ``original_max / low_freq_factor``) by ``factor``,
    keeps high frequencies, and interpolates smoothly in between.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
    return jnp.cos(angles), jnp.sin(angles)


def _token_matmul(x: jax.Array, kernel: jax.Array, contract: int = 1) -> jax.Array:
    """``x [..., *in] @ kernel [*in, *out]`` with the token dims of ``x`` flattened into one (``contract`` = len(in)).

    Why flatten: the weight gradient of a matmul over two token dims (``[B, T, ...]``) is a dot contracting two
    dims, which XLA:CPU lowers with the incoming gradient transposed, fusing that transpose into the elementwise op
    that produces the gradient (the SiLU's, RoPE's): a strided loop, measured 15x slower than the same op without
    the transpose. Over one flattened token dim the gradient dot reads its operands as they are (docs/bench.md).
    """
    in_shape, out_shape = kernel.shape[:contract], kernel.shape[contract:]
    size_in = math.prod(in_shape)
    y = jnp.dot(x.reshape(-1, size_in), kernel.reshape(size_in, -1))
    return y.reshape(*x.shape[: x.ndim - contract], *out_shape)


def _kernel(module: nnx.Module, name: str, dtype: Any) -> jax.Array:
    """``module.<name>`` in ``dtype``: the kernel itself, or its dequantized codes (a QLoRA base, :mod:`models.lora`)."""
    kind = lora.quantized_kinds(module).get(name)
    if kind is None:
        return getattr(module, name)[...].astype(dtype)
    return lora.dequantize(kind, getattr(module, f"{name}_codes")[...], getattr(module, f"{name}_scales")[...], dtype)


def _proj(x: jax.Array, module: nnx.Module, name: str, dtype: Any, rng: jax.Array | None, contract: int = 1):
    """``x @ module.<name>`` over ``contract`` trailing axes of ``x``, plus its LoRA adapter's update if it has one
    (``rng``: the adapter dropout's key, ``None`` outside training)."""
    y = _token_matmul(x, _kernel(module, name, dtype), contract)
    return lora.adapted(module, name, x, y, dtype, contract, rng)


def _fused_proj(
    x: jax.Array, module: nnx.Module, names: Sequence[str], dtype: Any, rngs: Sequence[jax.Array | None]
) -> list[jax.Array]:
    """``[x @ module.<name> for name in names]`` as one matmul against the kernels concatenated along their outputs
    (the parameters stay separate), each part plus its LoRA update. One wider dot instead of two or three narrow
    ones over the same ``x`` (``ModelConfig.fuse_projections``); its backward is one dot for ``dx`` as well."""
    kernels = [_kernel(module, name, dtype) for name in names]
    size_in = kernels[0].shape[0]
    widths = [math.prod(k.shape[1:]) for k in kernels]
    y = jnp.dot(x.reshape(-1, size_in), jnp.concatenate([k.reshape(size_in, -1) for k in kernels], axis=1))
    parts = jnp.split(y, np.cumsum(widths)[:-1].tolist(), axis=1)
    return [
        lora.adapted(module, name, x, part.reshape(*x.shape[:-1], *k.shape[1:]), dtype, 1, rng)
        for name, part, k, rng in zip(names, parts, kernels, rngs, strict=True)
    ]


def _key(rng: jax.Array | None, index: int) -> jax.Array | None:
    return None if rng is None else jax.random.fold_in(rng, index)


class Attention(nnx.Module):
    """Grouped-query self-attention with optional q/k/v bias (Qwen2) and per-head q/k RMSNorm (Qwen3)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, h, k, d, pd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.param_dtype
        self.num_heads, self.num_kv_heads, self.head_dim, self.dtype = h, k, d, cfg.dtype
        self.impl = cfg.attention_impl
        self.fuse, self.fuse_rope = cfg.fuse_projections, cfg.fuse_rope
        self.q_proj = _param(rngs, (e, h, d), ("embed", "heads", "head_dim"), pd, _scaled_normal(e))
        self.k_proj = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), pd, _scaled_normal(e))
        self.v_proj = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), pd, _scaled_normal(e))
        self.o_proj = _param(rngs, (h, d, e), ("heads", "head_dim", "embed"), pd, _scaled_normal(h * d))
        if cfg.attention_bias:
            self.q_bias = _param(rngs, (h, d), ("heads", "head_dim"), pd, _constant(0.0))
            self.k_bias = _param(rngs, (k, d), ("kv_heads", "head_dim"), pd, _constant(0.0))
            self.v_bias = _param(rngs, (k, d), ("kv_heads", "head_dim"), pd, _constant(0.0))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        if cfg.qk_norm:
            self.q_norm = _norm(cfg, d, "head_dim", rngs)
            self.k_norm = _norm(cfg, d, "head_dim", rngs)
        else:
            self.q_norm = self.k_norm = None

    def _project_qkv(self, x: jax.Array, rng: jax.Array | None) -> list[jax.Array]:
        """q, k, v, each ``[B, T, heads, D]``."""
        names, rngs = ("q_proj", "k_proj", "v_proj"), [_key(rng, i) for i in range(3)]
        if self.fuse:
            ys = _fused_proj(x, self, names, self.dtype, rngs)
        else:
            ys = [_proj(x, self, name, self.dtype, r) for name, r in zip(names, rngs, strict=True)]
        biases = (self.q_bias, self.k_bias, self.v_bias)
        return [y if b is None else y + b[...].astype(self.dtype) for y, b in zip(ys, biases, strict=True)]

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        q, k, v = self._project_qkv(x, rng)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        rope = elementwise.rope_fused if self.fuse_rope else elementwise.rope
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        new_cache = None
        if cache is not None:
            cache_k, cache_v = cache
            start = (0, cache_index, 0, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
            new_cache = (cache_k, cache_v)
            k, v = cache_k.astype(self.dtype), cache_v.astype(self.dtype)
        # Decoding reads a cache longer than the queries: only the dense path takes that shape.
        out = attend(self.impl if cache is None else "dense", q, k, v, mask, segment_ids)
        out = constrain(out, ("batch", "length", "heads", "head_dim"))
        return _proj(out, self, "o_proj", self.dtype, _key(rng, 3), contract=2), new_cache


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, m, pd = cfg.d_model, cfg.mlp_dim, cfg.param_dtype
        self.dtype, self.fuse = cfg.dtype, cfg.fuse_projections
        self.fuse_swiglu = cfg.fuse_swiglu
        self.gate_proj = _param(rngs, (e, m), ("embed", "mlp"), pd, _scaled_normal(e))
        self.up_proj = _param(rngs, (e, m), ("embed", "mlp"), pd, _scaled_normal(e))
        self.down_proj = _param(rngs, (m, e), ("mlp", "embed"), pd, _scaled_normal(m))

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        if self.fuse:
            gate, up = _fused_proj(x, self, ("gate_proj", "up_proj"), self.dtype, [_key(rng, 4), _key(rng, 5)])
        else:
            gate = _proj(x, self, "gate_proj", self.dtype, _key(rng, 4))
            up = _proj(x, self, "up_proj", self.dtype, _key(rng, 5))
        swiglu = elementwise.swiglu_fused if self.fuse_swiglu else elementwise.swiglu
        hidden = constrain(swiglu(gate, up), ("batch", "length", "mlp"))
        return _proj(hidden, self, "down_proj", self.dtype, _key(rng, 6))


class Block(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.input_norm = _norm(cfg, cfg.d_model, "embed", rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attention_norm = _norm(cfg, cfg.d_model, "embed", rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, segment_ids=None, rng=None):
        attn_out, new_cache = self.attn(self.input_norm(x), cos, sin, mask, cache, cache_index, segment_ids, rng)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_norm(x), rng)
        return constrain(x, ("batch", "length", "embed")), new_cache


class KVCache(NamedTuple):
    """Functional key/value cache for incremental decoding.

    Attributes:
      k, v: [num_layers, batch, max_len, num_kv_heads, head_dim] keys (after RoPE) and values.
      valid: bool [batch, max_len]: the slot holds a real token (not left padding, not yet written).
      index: int32 scalar, the next slot to write.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype: Any | None = None) -> KVCache:
    """An empty cache for ``batch_size`` sequences of at most ``max_len`` tokens."""
    shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype or cfg.dtype
    return KVCache(
        jnp.zeros(shape, dtype),
        jnp.zeros(shape, dtype),
        jnp.zeros((batch_size, max_len), bool),
        jnp.zeros((), jnp.int32),
    )


class CausalLM(nnx.Module):
    """Decoder-only LM: embeddings, ``num_layers`` blocks, final RMSNorm, (tied) output projection.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from models.config import get_preset
      >>> model = CausalLM(get_preset("tiny"), rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 5), jnp.int32)).shape
      (2, 5, 512)
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = _param(
            rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.param_dtype, _normal(0.02)
        )  # HF's initializer_range
        if cfg.scan_layers:

            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs: nnx.Rngs) -> Block:
                return Block(cfg, rngs=rngs)

            self.layers = make_blocks(rngs)
        else:
            self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = _norm(cfg, cfg.d_model, "embed", rngs)
        if cfg.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _param(
                rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype, _scaled_normal(cfg.d_model)
            )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        cache: KVCache | None = None,
        rng: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Forward pass.

        Args:
          tokens: int32 [B, T].
          positions: int32 [B, T] rotary positions; default ``arange(T)`` per row (offset by ``cache.index``).
          segment_ids: int32 [B, T]; tokens attend only to earlier tokens with the same id; 0 marks padding.
            With a ``cache``, only "0 = padding" is used (one sequence per row).
          cache: a :class:`KVCache`; when given, the new keys/values are written at ``cache.index`` and the call
            returns ``(logits, new_cache)``.
          rng: a key for the LoRA adapters' dropout (training); ``None`` (the default) runs without dropout.

        Returns:
          float32 logits [B, T, vocab] (and the updated cache when one was passed).
        """
        x, new_cache = self._trunk(tokens, positions, segment_ids, cache, rng)
        logits = self.logits(x)
        return logits if cache is None else (logits, new_cache)

    def hidden_states(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """The final-normed hidden states [B, T, d_model] in the compute dtype: ``model(...) == logits(these)``.

        Training computes its loss from these a few positions at a time (:func:`models.loss.token_nll`), so the full
        fp32 ``[B, T, vocab]`` logits never exist at once.
        """
        return self._trunk(tokens, positions, segment_ids, None, rng)[0]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits [..., vocab] of final-normed hidden states [..., d_model] (the tied or separate head)."""
        dtype = self.config.dtype
        flat = hidden.reshape(-1, hidden.shape[-1])  # one token dim: see _token_matmul
        if self.lm_head is None:
            out = jnp.einsum("ne,ve->nv", flat, self.embed[...].astype(dtype), preferred_element_type=jnp.float32)
        else:
            out = jnp.einsum("ne,ev->nv", flat, self.lm_head[...].astype(dtype), preferred_element_type=jnp.float32)
        return out.reshape(*hidden.shape[:-1], -1).astype(jnp.float32)

    def _trunk(
        self,
        tokens: jax.Array,
        positions: jax.Array | None,
        segment_ids: jax.Array | None,
        cache: KVCache | None,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        cfg = self.config
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
        b, t = tokens.shape
        offset = 0 if cache is None else cache.index
        if positions is None:
            positions = jnp.broadcast_to(offset + jnp.arange(t, dtype=jnp.int32), (b, t))
        if cache is None:
            idx = jnp.arange(t)
            mask = jnp.broadcast_to(idx[:, None] >= idx[None, :], (b, t, t))
            if segment_ids is not None:
                seg = jnp.asarray(segment_ids)
                mask = mask & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
            new_valid = None
        else:
            s = cache.valid.shape[1]
            real = jnp.ones((b, t), bool) if segment_ids is None else jnp.asarray(segment_ids) != 0
            new_valid = jax.lax.dynamic_update_slice(cache.valid, real, (0, cache.index))
            slots = jnp.arange(s)
            query_slot = cache.index + jnp.arange(t)
            mask = (slots[None, None, :] <= query_slot[None, :, None]) & new_valid[:, None, :]

        cos, sin = _rope_tables(positions, rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
        x = jnp.take(self.embed[...], tokens, axis=0).astype(cfg.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        seg = None if segment_ids is None else jnp.asarray(segment_ids)

        def run_block(graphdef, state, x, kv, key):
            block = nnx.merge(graphdef, state)
            return block(x, cos, sin, mask, kv, None if cache is None else cache.index, seg, key)

        if cfg.remat:
            # Inside lax.scan, CSE cannot merge the recomputation with the forward anyway; skipping the barrier is
            # what the jax docs recommend there.
            run_block = jax.checkpoint(
                run_block,
                static_argnums=(0,),
                prevent_cse=not cfg.scan_layers,
                policy=REMAT_POLICIES[cfg.remat_policy],
            )

        if cfg.scan_layers:
            graphdef, state = nnx.split(self.layers)

            def body(x, layer):
                layer_state, kv, key = layer
                x, new_kv = run_block(graphdef, layer_state, x, kv, key)
                return x, new_kv

            keys = None if rng is None else jax.random.split(rng, cfg.num_layers)  # one dropout key per layer
            xs = (state, None if cache is None else (cache.k, cache.v), keys)
            x, new_kvs = jax.lax.scan(body, x, xs)
            new_k, new_v = (None, None) if cache is None else new_kvs
        else:
            new_ks, new_vs = [], []
            keys = None if rng is None else jax.random.split(rng, cfg.num_layers)  # as the scan's: same numbers
            for i, block in enumerate(self.layers):
                graphdef, state = nnx.split(block)
                kv = None if cache is None else (cache.k[i], cache.v[i])
                x, new_kv = run_block(graphdef, state, x, kv, None if keys is None else keys[i])
                if cache is not None:
                    new_ks.append(new_kv[0])
                    new_vs.append(new_kv[1])
            if cache is not None:
                new_k, new_v = jnp.stack(new_ks), jnp.stack(new_vs)

        x = self.final_norm(x)
        return x, (None if cache is None else KVCache(new_k, new_v, new_valid, cache.index + t))


def _axes_of(variable: nnx.Variable) -> tuple[str | None, ...]:
    axes = variable.get_metadata().get("out_sharding")
    if axes is None:
        return (None,) * len(variable.shape)
    return tuple(axes)


def logical_axes(model_or_state: nnx.Module | nnx.State) -> nnx.State:
    """Logical axis names of every parameter.

    Args:
      model_or_state: a :class:`CausalLM` (or any module) or ``nnx.state(model, nnx.Param)``.

    Returns:
      A pytree with the structure of ``nnx.state(model, nnx.Param)`` whose leaves are tuples of axis names
      (``"vocab"``, ``"embed"``, ``"heads"``, ``"kv_heads"``, ``"head_dim"``, ``"mlp"``, ``"layers"`` or ``None``),
      one per array dimension. Map it against the param state with ``is_leaf=lambda x: isinstance(x, tuple)``.
    """
    if isinstance(model_or_state, nnx.Module):
        state = nnx.state(model_or_state, (nnx.Param, lora.QuantizedKernel))
    else:
        state = model_or_state
    return jax.tree.map(_axes_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))

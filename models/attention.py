"""Causal grouped-query attention, by name: the same maths through four implementations.

==================  ==============================================================================================
``dense``           our einsum path: fp32 scores ``[B, K, G, T, S]`` masked with an explicit boolean mask; runs
                    everywhere and is the reference (default)
``dot_product``     ``jax.nn.dot_product_attention``: XLA's fused-softmax path on CPU/TPU, cuDNN flash attention on
                    NVIDIA GPUs when shapes and dtypes allow
``blockwise``       query blocks against the keys up to the block's end, flash-style backward, plain XLA
                    (``models/blockwise_attention.py``): no ``T × S`` probabilities kept; the fastest on CPU
``splash``          Pallas splash attention (TPU only): a blockwise kernel that never materialises the ``T × S``
                    scores, run per device under ``shard_map`` (Mosaic kernels cannot be partitioned automatically)
==================  ==============================================================================================

Every implementation takes queries ``[B, T, H, D]`` and keys/values ``[B, S, K, D]`` after RoPE, with query head
``h`` reading key/value head ``h // (H // K)``, and returns ``[B, T, H, D]`` in the queries' dtype. Tokens attend to
earlier tokens of the same segment; segment 0 is padding. Padding *queries* are the one place the implementations
differ (dense gives them a uniform average, splash lets them attend to other padding): their outputs never reach a
loss, because their loss weight is 0.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from models import sharding
from models.blockwise_attention import blockwise_attention

__all__ = ["ATTENTION_IMPLS", "attend"]

# Masked attention scores get this instead of -inf, so a fully masked (padding) query row gives a uniform, finite
# softmax instead of NaNs that would poison gradients through `where`.
MASKED_SCORE = -0.7 * float(np.finfo(np.float32).max)

# Splash kernels tile the sequence; these are the tile sizes tried, largest first (TPU lanes are 128 wide).
_SPLASH_BLOCKS = (512, 256, 128)


def _dense(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    del segment_ids  # already folded into `mask`
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (d**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


def _dot_product(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    del segment_ids
    # implementation=None: cuDNN where it applies (GPU), XLA otherwise.
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :])


def _splash_block(seq_len: int) -> int:
    for block in _SPLASH_BLOCKS:
        if seq_len % block == 0:
            return block
    raise ValueError(
        f"attention_impl='splash' needs a sequence length that is a multiple of {_SPLASH_BLOCKS[-1]}, got {seq_len}"
    )


def _splash_per_device(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, interpret: bool) -> jax.Array:
    """Splash on one device's shard: q ``[b, T, h, D]``, k/v ``[b, T, k, D]``, segment ids ``[b, T]``."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    groups = h // kv_heads
    block = _splash_block(t)
    sizes = kernel_lib.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((t, t)) for _ in range(groups)])
    # One multi-query kernel per KV head: the G query heads of a group share that head's keys and values.
    kernel = kernel_lib.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    q = jnp.transpose(q * jnp.asarray(d**-0.5, q.dtype), (0, 2, 1, 3)).reshape(b, kv_heads, groups, t, d)
    k = jnp.transpose(k, (0, 2, 1, 3))  # [b, k, T, D]
    v = jnp.transpose(v, (0, 2, 1, 3))

    def one_row(q_row, k_row, v_row, seg_row):
        ids = kernel_lib.SegmentIds(q=seg_row, kv=seg_row)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(q_row, k_row, v_row)

    out = jax.vmap(one_row)(q, k, v, segment_ids)  # [b, k, G, T, D]
    return jnp.transpose(out.reshape(b, h, t, d), (0, 2, 1, 3))


def _splash(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, segment_ids: jax.Array | None, *, interpret: bool
) -> jax.Array:
    del mask  # causality and segments are the kernel's own (CausalMask + SegmentIds)
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    run = lambda q, k, v, s: _splash_per_device(q, k, v, s, interpret)
    context = sharding.current()
    if context is None:
        return run(q, k, v, segment_ids)
    # The kernel sees whole sequences and whole KV groups: batch split as the activations are, heads split only
    # when both head counts divide (so every device keeps complete groups).
    q_spec = context.spec_for(("batch", "length", "heads", "head_dim"), q.shape)
    kv_spec = context.spec_for(("batch", "length", "kv_heads", "head_dim"), k.shape)
    if (q_spec[2] is None) != (kv_spec[2] is None):
        q_spec = P(q_spec[0], None, None, None)
        kv_spec = P(kv_spec[0], None, None, None)
    seg_spec = P(q_spec[0], None)
    return jax.shard_map(
        run,
        mesh=context.mesh,
        in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
        out_specs=q_spec,
        check_vma=False,
    )(q, k, v, segment_ids)


ATTENTION_IMPLS: dict[str, Callable[..., jax.Array]] = {
    "dense": _dense,
    "dot_product": _dot_product,
    # Query blocks with a flash-style backward in plain XLA (models/blockwise_attention.py): no T x S
    # probabilities kept, the blocks above the causal diagonal skipped.
    "blockwise": lambda q, k, v, mask, segment_ids: blockwise_attention(q, k, v, mask, masked_score=MASKED_SCORE),
    "splash": lambda *a: _splash(*a, interpret=False),
    # The same kernel run by the Pallas interpreter: slow, but lets CPU tests check splash's numerics.
    "splash_interpret": lambda *a: _splash(*a, interpret=True),
}


def attend(
    impl: str, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, segment_ids: jax.Array | None = None
) -> jax.Array:
    """Causal GQA with the implementation named ``impl`` (a key of :data:`ATTENTION_IMPLS`).

    Args:
      impl: ``dense``, ``dot_product``, ``splash`` or ``splash_interpret``.
      q: queries ``[B, T, H, D]``; k, v: keys and values ``[B, S, K, D]`` (``H`` a multiple of ``K``).
      mask: bool ``[B, T, S]``, True where a query may attend (causal, same segment, not padding); the dense
        implementations use it, splash rebuilds it from ``segment_ids`` (and needs ``S == T``).
      segment_ids: int ``[B, T]``, or ``None`` for one unpadded sequence per row.

    Returns:
      ``[B, T, H, D]`` in ``q``'s dtype.
    """
    try:
        fn = ATTENTION_IMPLS[impl]
    except KeyError:
        raise ValueError(
            f"unknown attention implementation {impl!r}; choose one of {sorted(ATTENTION_IMPLS)}"
        ) from None
    return fn(q, k, v, mask, segment_ids)

r"""Causal attention a block of queries at a time, with a flash-style backward pass, in plain XLA.

The dense path (``models.attention``, ``dense``) computes all ``T × S`` fp32 scores, masks the upper triangle away,
and autodiff keeps the ``[B, K, G, T, S]`` probabilities for the backward pass. On a CPU the passes over those
scores (mask, softmax, its gradient) cost more than the attention matmuls themselves. This implementation:

* cuts the queries into ``n`` blocks; query block ``[a, e)`` meets only keys ``[0, e)`` — the keys a causal mask
  can let through — so the blocks above the diagonal are never computed: :math:`\tfrac{n+1}{2n}` of the dense
  work and memory traffic;
* keeps from the forward pass only the output :math:`O` and each row's log-sum-exp :math:`\ell`, and in the
  backward pass recomputes a block's probabilities :math:`P = \exp(S - \ell)` from :math:`Q, K` (one more
  :math:`QK^\top` per block), with the row sums :math:`\sum_s P \circ dP = \sum_d O \circ dO` (FlashAttention's
  identity) instead of a reduction over the scores:

.. math::

  dV = P^\top dO, \quad dP = dO\, V^\top, \quad dS = P \circ (dP - \textstyle\sum_d O \circ dO)\,/\sqrt{D},
  \quad dQ = dS\, K, \quad dK = dS^\top Q.

The mask must be causal in index order (``mask[b, t, s]`` true only where ``s <= t``), as the training forward's
causal-and-segment mask is: keys after a query block are skipped without looking at it. Values and gradients equal
the dense path's (tests/test_blockwise_attention.py), except for fully masked (padding) query rows, whose uniform
average runs over the keys of their block instead of all keys; their loss weight is 0, so no gradient sees them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["QUERY_BLOCKS", "blockwise_attention", "query_blocks"]

# Query blocks per sequence: the skipped upper triangle is (n-1)/2n of the scores. One layer's forward + backward at
# SmolLM2's shapes (4 x 512 tokens) on a 2-core CPU, time relative to dense (scripts/attention_ab.py, 10 interleaved
# rounds): 1 block (flash backward only) 0.70, 2 blocks 0.64, 4 blocks 0.48, 8 blocks 0.45, 16 blocks 0.44.
QUERY_BLOCKS = 8
_MIN_BLOCK = 16


def query_blocks(seq_len: int, blocks: int = QUERY_BLOCKS) -> list[tuple[int, int]]:
    """``[a, e)`` spans of the query blocks: ``blocks`` equal spans, none shorter than 16 positions.

    >>> query_blocks(512)[:2], query_blocks(40)
    ([(0, 64), (64, 128)], [(0, 16), (16, 32), (32, 40)])
    """
    size = max(-(-seq_len // blocks), _MIN_BLOCK)
    return [(a, min(a + size, seq_len)) for a in range(0, seq_len, size)]


def _scores(q: jax.Array, k: jax.Array, mask: jax.Array, masked_score: float) -> jax.Array:
    """fp32 ``[B, K, G, t, s]`` scaled, masked scores of a query block ``q [B, K, G, t, D]`` against ``k``."""
    s = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    return jnp.where(mask[:, None, None], s, masked_score)


def _forward(q, k, v, mask, masked_score, blocks):
    outs, lses = [], []
    for a, e in query_blocks(q.shape[3], blocks):
        s = _scores(q[:, :, :, a:e], k[:, :, :e], mask[:, a:e, :e], masked_score)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        total = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v[:, :, :e], preferred_element_type=jnp.float32)
        outs.append((o / total).astype(q.dtype))
        lses.append(m + jnp.log(total))
    return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend(q, k, v, mask, masked_score, blocks):
    return _forward(q, k, v, mask, masked_score, blocks)[0]


def _attend_fwd(q, k, v, mask, masked_score, blocks):
    out, lse = _forward(q, k, v, mask, masked_score, blocks)
    return out, (q, k, v, mask, out, lse)


def _attend_bwd(masked_score, blocks, residuals, d_out):
    q, k, v, mask, out, lse = residuals
    scale = q.shape[-1] ** -0.5
    f32 = jnp.float32
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)  # = rowsum(P * dP)
    dq_blocks = []
    dk = jnp.zeros(k.shape, f32)
    dv = jnp.zeros(v.shape, f32)
    for a, e in query_blocks(q.shape[3], blocks):
        q_blk, do_blk = q[:, :, :, a:e], d_out[:, :, :, a:e]
        p = jnp.exp(_scores(q_blk, k[:, :, :e], mask[:, a:e, :e], masked_score) - lse[:, :, :, a:e])
        dv = dv.at[:, :, :e].add(
            jnp.einsum("bkgts,bkgtd->bksd", p.astype(do_blk.dtype), do_blk, preferred_element_type=f32)
        )
        dp = jnp.einsum("bkgtd,bksd->bkgts", do_blk, v[:, :, :e], preferred_element_type=f32)
        ds = (p * (dp - delta[:, :, :, a:e]) * scale).astype(q.dtype)
        dq_blocks.append(jnp.einsum("bkgts,bksd->bkgtd", ds, k[:, :, :e], preferred_element_type=f32))
        dk = dk.at[:, :, :e].add(jnp.einsum("bkgts,bkgtd->bksd", ds, q_blk, preferred_element_type=f32))
    dq = jnp.concatenate(dq_blocks, axis=3).astype(q.dtype)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)


def blockwise_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, masked_score: float, blocks: int = QUERY_BLOCKS
) -> jax.Array:
    """Causal grouped-query attention, computed a query block at a time (see the module docstring).

    Args:
      q: queries ``[B, T, H, D]``; k, v: keys and values ``[B, T, K, D]`` (``H`` a multiple of ``K``; query head
        ``h`` reads key/value head ``h // (H // K)``).
      mask: bool ``[B, T, T]``, true where a query may attend; causal in index order.
      masked_score: the score masked positions get (finite, so fully masked rows stay finite).
      blocks: how many query blocks (:func:`query_blocks`); 1 computes all scores, with the same backward.

    Returns:
      ``[B, T, H, D]`` in ``q``'s dtype.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    if k.shape[1] != t or mask.shape[-2:] != (t, t):
        raise ValueError(
            f"blockwise attention needs as many keys as queries (training, no cache): q {q.shape}, k {k.shape}, "
            f"mask {mask.shape}"
        )
    q = q.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    out = _attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, masked_score, blocks)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)

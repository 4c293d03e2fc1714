r"""Next-token cross-entropy computed a few positions at a time, so the fp32 ``[B, T, vocab]`` logits never exist.

At 4B–8B parameters the logits are the largest activation of a training step: Qwen3's vocabulary has 151,936 entries,
so 8k tokens on one chip are ~5 GB of fp32 logits, and as much again for their gradient. :func:`token_nll` cuts the
sequence into chunks of at most ``chunk_size`` positions and runs

.. math::

  \ell_i = \operatorname{logsumexp}_v z_{iv} - z_{i, y_i}, \qquad z_i = \text{logits}(h_i)

chunk by chunk under ``lax.scan``, each chunk wrapped in ``jax.checkpoint``: the backward pass recomputes one chunk's
logits at a time instead of keeping them all, at the price of one more LM-head matmul per token. The scan stays a
loop (its carry accumulates the LM head's gradient in one buffer; unrolled, XLA kept one full-size fp32 gradient per
chunk alive); ``unroll=True`` is for counting FLOPs, since XLA's cost analysis counts a loop body once. The values and
gradients equal the unchunked ``optax.losses.softmax_cross_entropy_with_integer_labels`` (tests/test_loss.py).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from models.sharding import constrain

__all__ = ["CHUNK_SIZE", "chunk_layout", "token_nll"]

# Positions per chunk (ModelConfig.loss_chunk_size's default): per row, 512 × vocab fp32 logits (311 MB for Qwen3's
# vocabulary) live at a time.
CHUNK_SIZE = 512


def chunk_layout(seq_len: int, chunk_size: int = CHUNK_SIZE) -> tuple[int, int]:
    """``(chunks, positions per chunk)``: the fewest chunks of at most ``chunk_size``, as even as possible.

    The last chunk is padded when they do not tile the sequence exactly.

    >>> chunk_layout(2048), chunk_layout(100), chunk_layout(1032), chunk_layout(1021)
    ((4, 512), (1, 100), (3, 344), (2, 511))
    """
    if seq_len < 1 or chunk_size < 1:
        raise ValueError(f"seq_len and chunk_size must be positive, got {seq_len} and {chunk_size}")
    chunks = -(-seq_len // chunk_size)
    return chunks, -(-seq_len // chunks)


def _chunk_nll(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array) -> jax.Array:
    hidden = constrain(hidden, ("batch", "length", "embed"))
    logits = constrain(logits_fn(hidden).astype(jnp.float32), ("batch", "length", "vocab"))
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def token_nll(
    hidden: jax.Array,
    targets: jax.Array,
    logits_fn: Callable[[jax.Array], jax.Array],
    *,
    chunk_size: int = CHUNK_SIZE,
    unroll: bool = False,
) -> jax.Array:
    """Per-token negative log-likelihood ``[B, T]`` (fp32) of ``targets`` under ``logits_fn(hidden)``.

    Args:
      hidden: final hidden states ``[B, T, d_model]`` (``CausalLM.hidden_states``).
      targets: int ``[B, T]`` next-token ids.
      logits_fn: ``[b, c, d_model] -> [b, c, vocab]`` logits (``CausalLM.logits``); called once per chunk.
      chunk_size: at most this many positions per chunk (:func:`chunk_layout`).
      unroll: unroll the loop over chunks (same values; for XLA's cost analysis, not for training).

    Returns:
      ``[B, T]`` float32 losses, equal to ``optax.losses.softmax_cross_entropy_with_integer_labels`` on the full
      logits.
    """
    b, t, e = hidden.shape
    n, c = chunk_layout(t, chunk_size)
    if n == 1:
        return _chunk_nll(logits_fn, hidden, targets)
    if n * c > t:  # pad the last chunk; its extra positions are cut off below and get no gradient
        hidden = jnp.pad(hidden, ((0, 0), (0, n * c - t), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, n * c - t)))
    hidden = jnp.swapaxes(hidden.reshape(b, n, c, e), 0, 1)  # [n, B, c, E]: batch stays where the mesh put it
    targets = jnp.swapaxes(targets.reshape(b, n, c), 0, 1)
    one_chunk = jax.checkpoint(lambda h, y: _chunk_nll(logits_fn, h, y))
    _, nll = jax.lax.scan(lambda carry, xs: (carry, one_chunk(*xs)), None, (hidden, targets), unroll=unroll)
    return jnp.swapaxes(nll, 0, 1).reshape(b, n * c)[:, :t]

"""The chunked LM head + cross-entropy equals the plain one (values and gradients), and training uses it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from models import loss as loss_lib
from models.config import get_preset
from models.transformer import CausalLM
from train import step as step_lib


def _batch(rows=2, seq=12, vocab=512, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (rows, seq)).astype(np.int32)
    segments = np.ones((rows, seq), np.int32)
    segments[0, 9:] = 0  # padding at the end of row 0
    return {
        "tokens": tokens,
        "targets": rng.integers(0, vocab, (rows, seq)).astype(np.int32),
        "loss_mask": (segments != 0).astype(np.float32) * rng.uniform(0.5, 1.5, (rows, seq)).astype(np.float32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy(),
        "segment_ids": segments,
    }


@pytest.mark.parametrize("seq, chunk", [(12, 4), (12, 5), (7, 3), (8, 512)])
def test_chunked_nll_equals_plain_cross_entropy_values_and_gradients(seq, chunk):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k1, (3, seq, 16))
    head = jax.random.normal(k2, (16, 40))
    targets = jax.random.randint(k3, (3, seq), 0, 40)
    weights = jnp.linspace(0.0, 2.0, 3 * seq).reshape(3, seq)

    def plain(h, w):
        return jnp.sum(optax.losses.softmax_cross_entropy_with_integer_labels(h @ w, targets) * weights)

    def chunked(h, w):
        return jnp.sum(loss_lib.token_nll(h, targets, lambda x: x @ w, chunk_size=chunk) * weights)

    want, want_grads = jax.value_and_grad(plain, argnums=(0, 1))(hidden, head)
    got, got_grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, head)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_chunk_layout_covers_the_sequence_with_the_fewest_even_chunks():
    assert [loss_lib.chunk_layout(t, 4) for t in (12, 7, 3, 1)] == [(3, 4), (2, 4), (1, 3), (1, 1)]
    with pytest.raises(ValueError, match="positive"):
        loss_lib.chunk_layout(0)


@pytest.mark.parametrize("tied", [True, False])
def test_training_loss_of_the_model_equals_the_loss_from_full_logits(tied):
    """token_loss_sums through split_model (chunked, no full logits) == optax on model(...)'s logits, and grads."""
    cfg = get_preset("tiny", tie_embeddings=tied, num_layers=1)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    apply_fn, params, _ = step_lib.split_model(model)
    batch = {k: jnp.asarray(v) for k, v in _batch(seq=1024 + 8).items()}  # 3 chunks of 344
    plain_apply = lambda p, *a: apply_fn(p, *a)  # any callable that is not a ModelApply: the full-logits path

    def sums(fn, p):
        loss, weight = step_lib.token_loss_sums(fn, p, batch)
        return loss / weight

    want, want_grads = jax.jit(jax.value_and_grad(lambda p: sums(plain_apply, p)))(params)
    got, got_grads = jax.jit(jax.value_and_grad(lambda p: sums(apply_fn, p)))(params)
    assert loss_lib.chunk_layout(batch["tokens"].shape[1]) == (3, 344)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * float(jnp.abs(w).max()))


def test_hidden_states_and_logits_compose_to_the_forward_pass():
    model = CausalLM(dataclasses.replace(get_preset("tiny"), num_layers=1), rngs=nnx.Rngs(1))
    batch = _batch(seq=10)
    hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
    full = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    assert hidden.shape == (2, 10, 64)
    np.testing.assert_array_equal(model.logits(hidden), full)

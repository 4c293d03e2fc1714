"""Attention implementations by name compute the same thing on CPU (splash through the Pallas interpreter)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import ConfigError
from models.attention import ATTENTION_IMPLS, attend
from models.config import get_preset
from models.transformer import CausalLM


def _inputs(batch=2, seq=128, heads=4, kv_heads=2, dim=16):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (batch, seq, heads, dim))
    k = jax.random.normal(ks[1], (batch, seq, kv_heads, dim))
    v = jax.random.normal(ks[2], (batch, seq, kv_heads, dim))
    segments = np.ones((batch, seq), np.int32)
    segments[0, seq // 2 :] = 2  # two packed documents in row 0
    segments[-1, seq - 20 :] = 0  # padding at the end of the last row
    idx = np.arange(seq)
    mask = (idx[:, None] >= idx[None, :])[None] & (segments[:, :, None] == segments[:, None, :])
    mask &= segments[:, None, :] != 0
    return q, k, v, jnp.asarray(mask), jnp.asarray(segments)


def _loss(impl, q, k, v, mask, segments):
    real = (segments != 0)[:, :, None, None]  # padding queries are the one place impls may differ (never trained)
    return jnp.sum(jnp.where(real, attend(impl, q, k, v, mask, segments), 0.0) ** 2)


_attend = jax.jit(attend, static_argnums=0)
_grads = jax.jit(jax.grad(_loss, argnums=(1, 2, 3)), static_argnums=0)


@pytest.mark.parametrize("impl", ["dot_product", "splash_interpret"])
def test_attention_impls_equal_the_dense_reference_values_and_gradients(impl):
    q, k, v, mask, segments = _inputs(batch=1 if impl.startswith("splash") else 2)
    real = np.asarray(segments != 0)
    want = _attend("dense", q, k, v, mask, segments)
    got = _attend(impl, q, k, v, mask, segments)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-6)
    want_grads = _grads("dense", q, k, v, mask, segments)
    got_grads = _grads(impl, q, k, v, mask, segments)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=2e-5 * float(jnp.abs(w).max()))


def test_model_logits_do_not_depend_on_the_attention_impl():
    cfg = dataclasses.replace(get_preset("tiny"), num_layers=1)
    tokens = jax.random.randint(jax.random.key(2), (2, 24), 0, cfg.vocab_size)
    segments = jnp.ones((2, 24), jnp.int32).at[1, 16:].set(2)
    dense = CausalLM(cfg, rngs=nnx.Rngs(0))
    other = CausalLM(dataclasses.replace(cfg, attention_impl="dot_product"), rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda model: model(tokens, segment_ids=segments))
    np.testing.assert_allclose(forward(other), forward(dense), atol=1e-5)


def test_unknown_names_are_config_errors():
    assert {"dense", "dot_product", "splash"} <= set(ATTENTION_IMPLS)
    with pytest.raises(ConfigError, match="attention_impl='flash'.*dense"):
        get_preset("tiny", attention_impl="flash")
    with pytest.raises(ConfigError, match="remat_policy='some'.*dots"):
        get_preset("tiny", remat_policy="some")
    with pytest.raises(ValueError, match="multiple of 128"):
        attend("splash_interpret", *_inputs(batch=1, seq=96))

"""Blockwise attention equals the dense reference: outputs, and gradients of a loss that ignores padding queries."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models.attention import attend
from models.blockwise_attention import query_blocks
from train import step as step_lib
from train.bench.runner import synthetic_batch


def _inputs(seed: int, b: int, t: int, h: int, kv: int, d: int, segments: bool):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, d)), jnp.float32) for n in (h, kv, kv))
    idx = np.arange(t)
    mask = np.broadcast_to(idx[:, None] >= idx[None, :], (b, t, t)).copy()
    seg = np.ones((b, t), np.int32)
    if segments:  # row 0: two packed documents then padding; the other rows one document
        seg[0, : t // 3] = 1
        seg[0, t // 3 : t - 5] = 2
        seg[0, t - 5 :] = 0
        mask &= (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    return q, k, v, jnp.asarray(mask), jnp.asarray(seg)


@pytest.mark.parametrize(
    "b, t, h, kv, d, segments",
    [(2, 64, 4, 2, 8, True), (1, 40, 3, 3, 16, True), (2, 128, 9, 3, 64, False), (1, 16, 2, 1, 4, False)],
)
def test_blockwise_matches_dense_values_and_gradients(b, t, h, kv, d, segments):
    q, k, v, mask, seg = _inputs(t, b, t, h, kv, d, segments)
    weight = jnp.asarray(np.random.default_rng(1).standard_normal((b, t, h, d)), jnp.float32)
    real = (seg != 0)[:, :, None, None]  # padding queries' outputs never reach a loss

    def loss(impl, q, k, v):
        return jnp.sum(jnp.where(real, attend(impl, q, k, v, mask, seg), 0.0) * weight)

    out_dense, out_block = (attend(impl, q, k, v, mask, seg) for impl in ("dense", "blockwise"))
    np.testing.assert_allclose(np.where(real, out_block, 0), np.where(real, out_dense, 0), rtol=1e-5, atol=1e-5)
    grads = {impl: jax.grad(loss, argnums=(1, 2, 3))(impl, q, k, v) for impl in ("dense", "blockwise")}
    for g_block, g_dense in zip(grads["blockwise"], grads["dense"]):
        scale = float(jnp.max(jnp.abs(g_dense)))
        np.testing.assert_allclose(g_block, g_dense, rtol=1e-5, atol=1e-5 * scale)


def test_blocks_tile_the_sequence():
    for t in (1, 7, 16, 40, 512, 2048):
        spans = query_blocks(t)
        assert spans[0][0] == 0 and spans[-1][1] == t
        assert all(a2 == e1 for (_, e1), (a2, _) in zip(spans, spans[1:]))
        assert all(e - a >= min(16, t) for a, e in spans[:-1])


def test_a_cache_longer_than_the_queries_is_refused():
    q, k, v, mask, seg = _inputs(0, 1, 8, 2, 2, 4, False)
    with pytest.raises(ValueError, match="as many keys as queries"):
        attend("blockwise", q[:, :4], k, v, mask[:, :4], seg)


def test_the_train_loss_and_its_gradients_are_unchanged_by_blockwise_attention():
    batch = synthetic_batch(512, 2, 48, 0)
    batch["segment_ids"][0, 30:] = 2  # two documents packed in row 0
    batch["loss_mask"][0, 44:] = 0
    batch["segment_ids"][0, 44:] = 0  # and padding
    results = {}
    for impl in ("dense", "blockwise"):
        model, _ = models.load("preset:tiny", attention_impl=impl)
        assert model.config.attention_impl == impl
        apply_fn, params, _ = step_lib.split_model(model)
        loss = functools.partial(lambda fn, p: step_lib.token_loss_sums(fn, p, batch)[0], apply_fn)
        results[impl] = jax.value_and_grad(loss)(params)
    (loss_d, grads_d), (loss_b, grads_b) = results["dense"], results["blockwise"]
    np.testing.assert_allclose(loss_b, loss_d, rtol=1e-6)
    for g_b, g_d in zip(jax.tree.leaves(grads_b), jax.tree.leaves(grads_d)):
        np.testing.assert_allclose(g_b, g_d, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(g_d))))


def test_blockwise_matches_dense_in_bfloat16():
    q, k, v, mask, seg = _inputs(3, 2, 64, 4, 2, 16, True)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    real = (seg != 0)[:, :, None, None]

    def loss(impl, q, k, v):
        return jnp.sum(jnp.where(real, attend(impl, q, k, v, mask, seg), 0.0).astype(jnp.float32))

    outs = {impl: attend(impl, q, k, v, mask, seg) for impl in ("dense", "blockwise")}
    assert outs["blockwise"].dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.where(real, outs["blockwise"], 0).astype(np.float32),
        np.where(real, outs["dense"], 0).astype(np.float32),
        atol=2e-2,
    )
    grads = {impl: jax.grad(loss, argnums=(1, 2, 3))(impl, q, k, v) for impl in ("dense", "blockwise")}
    for g_b, g_d in zip(grads["blockwise"], grads["dense"]):
        assert g_b.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(g_d.astype(jnp.float32))))
        np.testing.assert_allclose(g_b.astype(np.float32), g_d.astype(np.float32), atol=3e-2 * scale)

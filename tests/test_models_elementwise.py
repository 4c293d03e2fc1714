"""models.elementwise: each ``*_fused`` op (a hand-written backward) against its plain twin (autodiff's backward)
and against a NumPy reference; and the model with all three switched on gives the loss and gradients of the model
without them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import models
from models import elementwise
from models.weights import model_from_hf_tensors, model_to_hf_tensors

# (rtol, atol) of fused vs plain: float32 differs by summation order only; bfloat16 also by where it rounds (the
# fused backwards do their arithmetic in float32 and round once).
TOLERANCE = {jnp.float32: (1e-5, 1e-6), jnp.bfloat16: (2e-2, 2e-2)}


def _random(key, shape, dtype, scale=1.0):
    return (scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)).astype(dtype)


def _value_and_vjp(fn, args, cotangent):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cotangent)


def _assert_close(got, want, dtype):
    rtol, atol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=rtol, atol=atol)


def _rope_tables(b, t, half, seed):
    angles = jax.random.uniform(jax.random.key(seed), (b, t, half), jnp.float32, 0.0, 2 * np.pi)
    return jnp.cos(angles), jnp.sin(angles)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@settings(max_examples=4, deadline=None)  # each new shape compiles both versions op by op
@given(rows=st.integers(1, 5), dim=st.sampled_from([2, 8, 24]), scale=st.sampled_from([1e-3, 1.0, 30.0]))
def test_rms_norm_fused_matches_autodiff(dtype, rows, dim, scale):
    x = _random(0, (2, rows, dim), dtype, scale)
    weight = _random(1, (dim,), jnp.float32) + 1.0
    g = _random(2, (2, rows, dim), dtype)
    eps = 1e-5
    want_y, want_grads = _value_and_vjp(lambda a, w: elementwise.rms_norm(a, w, eps), (x, weight), g)
    got_y, got_grads = _value_and_vjp(lambda a, w: elementwise.rms_norm_fused(a, w, eps), (x, weight), g)
    assert got_y.dtype == dtype and got_grads[0].dtype == dtype and got_grads[1].dtype == jnp.float32
    _assert_close(got_y, want_y, dtype)
    for got, want in zip(got_grads, want_grads, strict=True):
        _assert_close(got, want, dtype)


def test_rms_norm_against_numpy():
    x = np.asarray(_random(3, (3, 7), jnp.float32, 2.0), np.float64)
    weight = np.linspace(0.5, 1.5, 7)
    want = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * weight
    for norm in (elementwise.rms_norm, elementwise.rms_norm_fused):
        got = norm(jnp.asarray(x, jnp.float32), jnp.asarray(weight, jnp.float32), 1e-6)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rope_fused_matches_autodiff(dtype):
    b, t, heads, d = 2, 5, 3, 8
    x = _random(4, (b, t, heads, d), dtype)
    cos, sin = _rope_tables(b, t, d // 2, seed=5)
    g = _random(6, (b, t, heads, d), dtype)
    want_y, (want_dx,) = _value_and_vjp(lambda a: elementwise.rope(a, cos, sin), (x,), g)
    got_y, (got_dx,) = _value_and_vjp(lambda a: elementwise.rope_fused(a, cos, sin), (x,), g)
    assert got_dx.dtype == dtype
    _assert_close(got_y, want_y, dtype)
    _assert_close(got_dx, want_dx, dtype)


def test_rope_is_a_rotation_numpy():
    """Each (i, i + D/2) pair is rotated by its angle: a NumPy reference, and the norm of every pair is kept."""
    b, t, heads, d = 1, 4, 2, 6
    x = np.asarray(_random(7, (b, t, heads, d), jnp.float32), np.float64)
    cos, sin = (np.asarray(a, np.float64) for a in _rope_tables(b, t, d // 2, seed=8))
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    want = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    for rope in (elementwise.rope, elementwise.rope_fused):
        got = np.asarray(rope(jnp.asarray(x, jnp.float32), jnp.asarray(cos), jnp.asarray(sin)), np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        pair_norms = np.hypot(got[..., : d // 2], got[..., d // 2 :])
        np.testing.assert_allclose(pair_norms, np.hypot(x1, x2), rtol=1e-5)


def test_rope_fused_passes_no_gradient_to_the_tables():
    x = _random(9, (1, 3, 1, 4), jnp.float32)
    cos, sin = _rope_tables(1, 3, 2, seed=10)
    d_cos, d_sin = jax.grad(lambda c, s: jnp.sum(elementwise.rope_fused(x, c, s)), argnums=(0, 1))(cos, sin)
    assert not np.any(np.asarray(d_cos)) and not np.any(np.asarray(d_sin))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_fused_matches_autodiff(dtype):
    gate = _random(11, (3, 4, 16), dtype, 4.0)  # wide enough to reach both tails of the sigmoid
    up = _random(12, (3, 4, 16), dtype)
    g = _random(13, (3, 4, 16), dtype)
    want_y, want_grads = _value_and_vjp(elementwise.swiglu, (gate, up), g)
    got_y, got_grads = _value_and_vjp(elementwise.swiglu_fused, (gate, up), g)
    _assert_close(got_y, want_y, dtype)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert got.dtype == dtype
        _assert_close(got, want, dtype)


def test_swiglu_against_numpy():
    a = np.linspace(-8.0, 8.0, 17)
    u = np.linspace(2.0, -2.0, 17)
    silu = a / (1.0 + np.exp(-a))
    for fn in (elementwise.swiglu, elementwise.swiglu_fused):
        got = fn(jnp.asarray(a, jnp.float32), jnp.asarray(u, jnp.float32))
        np.testing.assert_allclose(np.asarray(got), silu * u, rtol=1e-5, atol=1e-6)


FUSED_OPS = {"fuse_rmsnorm": True, "fuse_rope": True, "fuse_swiglu": True}


def test_the_model_with_fused_ops_gives_the_same_loss_and_gradients():
    """All three switched on, in a Qwen3-shaped tiny model (q/k norms use the fused RMSNorm too), its layers scanned
    and rematerialised (the custom backwards under both transforms): the loss and every parameter's gradient equal
    the plain model's."""
    cfg = models.get_preset("tiny", qk_norm=True, attention_bias=True, scan_layers=True, remat=True)
    plain = models.CausalLM(cfg, rngs=nnx.Rngs(0))
    fused = model_from_hf_tensors(dataclasses.replace(cfg, **FUSED_OPS), model_to_hf_tensors(plain))
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size, dtype=jnp.int32)

    @nnx.jit
    def loss_and_grads(model):
        return nnx.value_and_grad(lambda m: jnp.mean(jax.nn.log_softmax(m(tokens))[..., 0]))(model)

    (want_loss, want), (got_loss, got) = loss_and_grads(plain), loss_and_grads(fused)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
    flat_want, flat_got = dict(nnx.to_flat_state(nnx.state(want))), dict(nnx.to_flat_state(nnx.state(got)))
    assert flat_want.keys() == flat_got.keys() and len(flat_want) > 10
    for path, value in flat_want.items():
        np.testing.assert_allclose(
            np.asarray(flat_got[path][...]), np.asarray(value[...]), atol=1e-6, rtol=1e-4, err_msg=str(path)
        )


def test_each_switch_reaches_its_op():
    """The switches are not dead: each puts its op's custom_vjp (named after it) into the traced program."""
    tokens = jnp.zeros((1, 4), jnp.int32)

    def jaxpr_text(**overrides):
        model = models.CausalLM(models.get_preset("tiny", num_layers=1, **overrides), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        return str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens))(state))

    names = {"fuse_rmsnorm": "name=rms_norm_fused", "fuse_rope": "name=rope_fused", "fuse_swiglu": "name=swiglu_fused"}
    plain = jaxpr_text()
    assert not any(name in plain for name in names.values())
    for switch, name in names.items():
        assert name in jaxpr_text(**{switch: True}), switch

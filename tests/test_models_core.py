"""Core behaviour of models.CausalLM: shapes, dtypes, logical axes, layouts, masking, KV cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import models
from models.weights import WeightError, model_from_hf_tensors, model_to_hf_tensors

AXIS_NAMES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", None}


# Eager jax compiles every primitive per new shape; one jit per (config, shape) is much cheaper on 2 CPU cores.
_forward = nnx.jit(
    lambda model, tokens, positions=None, segment_ids=None: model(tokens, positions=positions, segment_ids=segment_ids)
)
_decode = nnx.jit(lambda model, tokens, cache: model(tokens, cache=cache))


def _tiny(**overrides):
    return models.get_preset("tiny", **overrides)


def _tokens(b=2, t=9, seed=1, vocab=512):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab, dtype=jnp.int32)


@pytest.fixture(scope="module")
def tiny_model():
    return models.CausalLM(_tiny(), rngs=nnx.Rngs(0))


def test_forward_shape_and_float32_logits(tiny_model):
    logits = _forward(tiny_model, _tokens())
    assert logits.shape == (2, 9, 512)
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("scan", [False, True])
def test_logical_axes_cover_every_param_with_known_names(scan):
    cfg = _tiny(scan_layers=scan, qk_norm=True, attention_bias=True, tie_embeddings=False)
    model = nnx.eval_shape(lambda cfg=cfg: models.CausalLM(cfg, rngs=nnx.Rngs(0)))  # metadata and shapes only
    state = nnx.state(model, nnx.Param)
    axes = models.logical_axes(model)
    assert jax.tree.structure(models.logical_axes(state), is_leaf=lambda x: isinstance(x, tuple)) == jax.tree.structure(
        axes, is_leaf=lambda x: isinstance(x, tuple)
    )
    flat_axes = dict(nnx.to_flat_state(axes))
    flat_params = dict(nnx.to_flat_state(state))
    assert flat_axes.keys() == flat_params.keys()
    for path, names in flat_axes.items():
        shape = flat_params[path].shape
        assert len(names) == len(shape), (path, names, shape)
        assert set(names) <= AXIS_NAMES
        assert ("layers" in names) == (scan and path[0] == "layers"), path
        if "layers" in names:
            assert names[0] == "layers" and shape[0] == 2
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(axes)}
    prefix = "layers/" if scan else "layers/0/"
    lead = ("layers",) if scan else ()
    assert flat["embed"] == ("vocab", "embed")
    assert flat["lm_head"] == ("embed", "vocab")
    assert flat[prefix + "attn/q_proj"] == lead + ("embed", "heads", "head_dim")
    assert flat[prefix + "attn/k_proj"] == lead + ("embed", "kv_heads", "head_dim")
    assert flat[prefix + "mlp/down_proj"] == lead + ("mlp", "embed")


def test_param_count_matches_config():
    for cfg in [_tiny(), _tiny(tie_embeddings=False, qk_norm=True), _tiny(attention_bias=True)]:
        model = nnx.eval_shape(lambda cfg=cfg: models.CausalLM(cfg, rngs=nnx.Rngs(0)))
        n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert n == cfg.num_params


def test_scan_layers_and_remat_match_plain_loop(tiny_model):
    tensors = model_to_hf_tensors(tiny_model)
    tokens = _tokens()
    scanned = model_from_hf_tensors(_tiny(scan_layers=True, remat=True), tensors)
    np.testing.assert_allclose(_forward(scanned, tokens), _forward(tiny_model, tokens), atol=1e-5, rtol=1e-5)

    @nnx.jit
    def grads(model):
        return nnx.grad(lambda m: jnp.mean(m(tokens) ** 2))(model)

    ref_grads = model_to_hf_tensors(_with_params(tiny_model, grads(tiny_model)))
    got_grads = model_to_hf_tensors(_with_params(scanned, grads(scanned)))
    for name in ref_grads:
        np.testing.assert_allclose(got_grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, err_msg=name)


def _with_params(model, grads_state):
    graphdef, _ = nnx.split(model)
    return nnx.merge(graphdef, grads_state)


def test_bf16_compute_with_fp32_params(tiny_model):
    tensors = model_to_hf_tensors(tiny_model)
    model = model_from_hf_tensors(_tiny(dtype=jnp.bfloat16, param_dtype=jnp.float32), tensors)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    tokens = _tokens()
    logits = _forward(model, tokens)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, _forward(tiny_model, tokens), atol=0.05)
    stored_bf16 = model_from_hf_tensors(_tiny(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), tensors)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(stored_bf16, nnx.Param)))
    assert _forward(stored_bf16, tokens).dtype == jnp.float32


def test_packed_segments_equal_separate_documents(tiny_model):
    a, b = _tokens(1, 5, seed=2), _tokens(1, 4, seed=3)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
    segment_ids = jnp.array([[1] * 5 + [2] * 4 + [0] * 3], jnp.int32)
    positions = jnp.array([list(range(5)) + list(range(4)) + [0] * 3], jnp.int32)
    logits = _forward(tiny_model, packed, positions, segment_ids)
    assert np.isfinite(np.asarray(logits)).all()  # padding rows attend to nothing but stay finite
    np.testing.assert_allclose(logits[:, :5], _forward(tiny_model, a), atol=1e-5)
    np.testing.assert_allclose(logits[:, 5:9], _forward(tiny_model, b), atol=1e-5)


def test_default_positions_are_arange(tiny_model):
    tokens = _tokens()
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    np.testing.assert_allclose(_forward(tiny_model, tokens), _forward(tiny_model, tokens, positions), atol=0)
    shifted = _forward(tiny_model, tokens, positions + 3)
    assert not np.allclose(shifted, _forward(tiny_model, tokens))  # positions do reach the rotary embedding


def test_causality_future_tokens_do_not_change_past_logits(tiny_model):
    tokens = _tokens(1, 8)
    changed = tokens.at[0, 5:].set((tokens[0, 5:] + 7) % 512)
    before, after = _forward(tiny_model, tokens), _forward(tiny_model, changed)
    np.testing.assert_allclose(before[:, :5], after[:, :5], atol=1e-6)
    assert not np.allclose(before[:, 5:], after[:, 5:])


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_decoding_matches_full_forward(tiny_model, scan):
    model = model_from_hf_tensors(_tiny(scan_layers=scan), model_to_hf_tensors(tiny_model))
    tokens = _tokens(2, 10)
    full = _forward(model, tokens)
    cache = models.init_cache(model.config, batch_size=2, max_len=16)
    logits, cache = _decode(model, tokens[:, :6], cache)
    np.testing.assert_allclose(logits, full[:, :6], atol=1e-5)
    for t in range(6, 10):
        step_logits, cache = _decode(model, tokens[:, t : t + 1], cache)
        np.testing.assert_allclose(step_logits[:, 0], full[:, t], atol=1e-5)
    assert int(cache.index) == 10


def test_jit_and_grad_through_nnx(tiny_model):
    @nnx.jit
    def loss_fn(model, tokens):
        logits = model(tokens[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    tokens = _tokens()
    loss = loss_fn(tiny_model, tokens)
    assert abs(float(loss) - np.log(512)) < 0.5  # near-uniform predictions at init
    grads = nnx.grad(lambda m: loss_fn(m, tokens))(tiny_model)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_config_errors_name_the_field():
    with pytest.raises(models.ConfigError, match="num_kv_heads"):
        _tiny(num_kv_heads=3)
    with pytest.raises(models.ConfigError, match="unknown model preset 'nope'"):
        models.get_preset("nope")
    with pytest.raises(models.ConfigError, match="model_type='gpt2'"):
        models.ModelConfig.from_hf_config({"model_type": "gpt2"})
    base = {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 16,
    }
    assert models.ModelConfig.from_hf_config(base).head_dim == 4
    with pytest.raises(models.ConfigError, match="hidden_act='gelu'"):
        models.ModelConfig.from_hf_config({**base, "hidden_act": "gelu"})
    with pytest.raises(models.ConfigError, match="rope_scaling type 'yarn'"):
        models.ModelConfig.from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(models.ConfigError, match="'intermediate_size' is missing"):
        models.ModelConfig.from_hf_config({k: v for k, v in base.items() if k != "intermediate_size"})


def test_weight_shape_mismatch_names_the_tensor(tiny_model):
    tensors = model_to_hf_tensors(tiny_model)
    bad = dict(tensors)
    bad["model.layers.1.mlp.up_proj.weight"] = bad["model.layers.1.mlp.up_proj.weight"][:, :-1]
    with pytest.raises(WeightError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*shape \(128, 63\)"):
        model_from_hf_tensors(_tiny(), bad, source="x.safetensors")
    missing = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
    with pytest.raises(WeightError, match="'model.norm.weight' is missing"):
        model_from_hf_tensors(_tiny(), missing)
    with pytest.raises(WeightError, match="not used"):
        model_from_hf_tensors(_tiny(), {**tensors, "model.layers.2.mlp.up_proj.weight": tensors["model.norm.weight"]})


def test_presets_have_expected_sizes():
    assert abs(models.get_preset("smollm2-135m").num_params / 134.5e6 - 1) < 0.01
    assert abs(models.get_preset("qwen3-0.6b").num_params / 0.596e9 - 1) < 0.02
    assert abs(models.get_preset("qwen3-4b").num_params / 4.02e9 - 1) < 0.02
    assert abs(models.get_preset("llama3-8b").num_params / 8.03e9 - 1) < 0.01


@st.composite
def _configs(draw):
    kv = draw(st.integers(1, 4))
    architecture = draw(st.sampled_from(["llama", "qwen2", "qwen3"]))
    scaling = draw(
        st.none()
        | st.builds(
            models.RopeScaling,
            factor=st.sampled_from([2.0, 8.0]),
            low_freq_factor=st.just(1.0),
            high_freq_factor=st.sampled_from([2.0, 4.0]),
            original_max_position_embeddings=st.sampled_from([64, 8192]),
        )
    )
    return models.ModelConfig(
        vocab_size=draw(st.integers(1, 1000)),
        d_model=draw(st.integers(1, 256)),
        num_layers=draw(st.integers(1, 8)),
        num_heads=kv * draw(st.integers(1, 4)),
        num_kv_heads=kv,
        head_dim=2 * draw(st.integers(1, 64)),
        mlp_dim=draw(st.integers(1, 512)),
        rms_norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
        rope_theta=draw(st.sampled_from([1e4, 1e5, 5e5, 1e6])),
        rope_scaling=scaling if architecture == "llama" else None,
        tie_embeddings=draw(st.booleans()),
        attention_bias=architecture == "qwen2",
        qk_norm=architecture == "qwen3",
        max_position_embeddings=draw(st.sampled_from([512, 8192])),
        architecture=architecture,
    )


@settings(max_examples=60, deadline=None)
@given(_configs())
def test_hf_config_round_trip(cfg):
    assert models.ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


@settings(max_examples=40, deadline=None)
@given(
    head_dim=st.sampled_from([2, 8, 64, 128]),
    theta=st.sampled_from([1e4, 5e5]),
    factor=st.sampled_from([2.0, 8.0]),
    original=st.sampled_from([32, 8192]),
)
def test_llama3_rope_scaling_matches_numpy_reference(head_dim, theta, factor, original):
    scaling = models.RopeScaling(
        factor=factor, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=original
    )
    got = models.rope_inverse_frequencies(head_dim, theta, scaling).astype(np.float64)
    base = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    expected = []
    for f in base:  # the piecewise definition from the Llama-3 paper's reference code, one frequency at a time
        wavelen = 2 * np.pi / f
        if wavelen < original / 4.0:
            expected.append(f)
        elif wavelen > original / 1.0:
            expected.append(f / factor)
        else:
            smooth = (original / wavelen - 1.0) / (4.0 - 1.0)
            expected.append((1 - smooth) * f / factor + smooth * f)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert np.all(got <= base * (1 + 1e-6)) and np.all(got >= base / factor * (1 - 1e-6))


@pytest.mark.parametrize("with_lora", [False, True])
def test_fused_projections_give_the_same_logits_and_gradients(with_lora):
    """``fuse_projections``: q/k/v and gate/up as one matmul each, against the same parameters (biases, q/k norms and
    LoRA adapters on some of the fused kernels included): the loss and every gradient equal the separate matmuls'."""
    from models import lora

    cfg = _tiny(attention_bias=True, qk_norm=True)
    plain = models.CausalLM(cfg, rngs=nnx.Rngs(0))
    fused = model_from_hf_tensors(dataclasses.replace(cfg, fuse_projections=True), model_to_hf_tensors(plain))
    if with_lora:
        spec = lora.LoraSpec(rank=4, alpha=8.0, targets=("k_proj", "up_proj"))  # one part of each fused matmul
        for model in (plain, fused):
            lora.add_lora(model, spec, seed=3)
            for i, (_, name, module) in enumerate(lora._projections(model)):
                b = getattr(module, f"{name}_lora_b", None)
                if b is not None:  # non-zero B: the adapters change the output
                    b.set_value(0.05 * jax.random.normal(jax.random.key(i), b.shape, b.dtype))
    tokens = _tokens()
    np.testing.assert_allclose(_forward(fused, tokens), _forward(plain, tokens), atol=1e-5, rtol=1e-5)

    @nnx.jit
    def grads(model):
        return nnx.grad(lambda m: jnp.mean(m(tokens) ** 2))(model)

    ref, got = nnx.state(grads(plain)), nnx.state(grads(fused))
    flat_ref, flat_got = dict(nnx.to_flat_state(ref)), dict(nnx.to_flat_state(got))
    assert flat_ref.keys() == flat_got.keys() and len(flat_ref) > 10
    for path, value in flat_ref.items():
        np.testing.assert_allclose(
            np.asarray(flat_got[path][...]), np.asarray(value[...]), atol=1e-6, rtol=1e-4, err_msg=str(path)
        )

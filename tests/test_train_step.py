"""The jit training step: token-weighted loss, accumulation, FINCH's value, L2-SP, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import finch_optax
import models
from train import mesh as mesh_lib
from train import step as step_lib
from train.config import MeshConfig, OptimizerConfig
from train.optimizers import make_optimizer

B, T = 8, 16


def _batch(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows with different numbers of real tokens and non-uniform weights: the mean of micro-batch means differs
    from the token-weighted global mean, so a wrong accumulation shows."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (B, T + 1)).astype(np.int32)
    lengths = np.array([16, 3, 9, 16, 1, 12, 5, 16])
    real = np.arange(T)[None, :] < lengths[:, None]
    weights = np.where(real, rng.choice([0.0, 0.5, 1.0, 2.0], (B, T), p=[0.2, 0.2, 0.4, 0.2]), 0.0)
    return step_lib.host_batch_arrays(
        dict(
            tokens=np.where(real, tokens[:, :-1], 0),
            targets=np.where(real, tokens[:, 1:], 0),
            loss_mask=weights,
            positions=np.where(real, np.arange(T)[None, :], 0),
            segment_ids=real.astype(np.int32),
        )
    )


@pytest.fixture(scope="module")
def tiny():
    cfg = dataclasses.replace(models.get_preset("tiny"), dtype=jnp.float32)
    model = models.CausalLM(cfg, rngs=nnx.Rngs(0))
    apply_fn, params, _ = step_lib.split_model(model)
    return model, apply_fn, params


def _reference_loss(apply_fn, params, batch) -> float:
    """NumPy float64 token-weighted cross-entropy from the model's logits."""
    logits = jax.jit(apply_fn)(params, batch["tokens"], batch["positions"], batch["segment_ids"])
    logits = np.asarray(logits, np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    w = batch["loss_mask"].astype(np.float64)
    return float((nll * w).sum() / w.sum())


_COMPILED = {}


def _run(apply_fn, params, opt_cfg, batch, *, grad_accum=1, mesh=None, params_shardings=None, steps=1, **kw):
    tx = make_optimizer(opt_cfg)
    state, shardings = step_lib.create_train_state(
        params, tx, mesh=mesh, params_shardings=params_shardings, l2sp=kw.get("l2sp_weight", 0) > 0
    )
    # Tests that need the same program share one compiled step (compiling the tiny LM dominates their time).
    key = (apply_fn, opt_cfg, grad_accum, None if mesh is None else tuple(mesh.shape.items()), tuple(kw.items()))
    if key not in _COMPILED:
        _COMPILED[key] = step_lib.make_train_step(
            apply_fn, tx, grad_accum=grad_accum, mesh=mesh, state_shardings=shardings, **kw
        )
    step = _COMPILED[key]
    metrics = []
    for _ in range(steps):
        state, m = step(state, batch)
        metrics.append(jax.device_get(m))
    return state, metrics


def _check_accumulation(apply_fn, params, batch, opt_cfg):
    want_loss = _reference_loss(apply_fn, params, batch)
    s1, [m1] = _run(apply_fn, params, opt_cfg, batch, grad_accum=1)
    s4, [m4] = _run(apply_fn, params, opt_cfg, batch, grad_accum=4)
    np.testing.assert_allclose(m1["loss"], want_loss, rtol=1e-5)
    np.testing.assert_allclose(m4["loss"], want_loss, rtol=1e-5)
    # FINCH saw the global token-weighted mean: its first EMA is the value itself
    for s in (s1, s4):
        [(_, finch)] = finch_optax.find_finch_states(s.opt_state)
        np.testing.assert_allclose(float(finch.ema_loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    if opt_cfg.name == "finch_adamw":
        # Adam's first moment after one update is (1 - b1) * g: equal moments mean equal gradients.
        for a, b in zip(jax.tree.leaves(_adam_state(s1).mu), jax.tree.leaves(_adam_state(s4).mu)):
            a, b = np.asarray(a), np.asarray(b)  # fp32 sums in another order: compare at the tensor's scale
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    else:
        # FINCH on plain SGD: the update is -lr * g (compared to a few fp32 ulps of the params).
        for a, b, p0 in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params), jax.tree.leaves(params)):
            np.testing.assert_allclose(np.asarray(b) - p0, np.asarray(a) - p0, rtol=1e-4, atol=1e-7)
    return want_loss, m1


ADAMW = OptimizerConfig(name="finch_adamw", max_learning_rate=1e-3, base_learning_rate=1e-3)


@pytest.mark.slow
def test_accumulation_gives_the_same_update_and_finch_value_as_one_big_batch(tiny):
    _, apply_fn, params = tiny
    batch = _batch(512)
    _, m1 = _check_accumulation(apply_fn, params, batch, ADAMW)
    assert m1["tokens"] == int((batch["segment_ids"] != 0).sum())
    assert m1["loss_tokens"] == int((batch["loss_mask"] > 0).sum())
    np.testing.assert_allclose(m1["lr_sqrt_loss"], m1["lr"] * np.sqrt(m1["loss"]), rtol=1e-6)


def test_accumulation_value_is_the_global_mean_not_a_mean_of_micro_means():
    params = _toy_params()
    batch = _batch(16, seed=4)
    opt_cfg = OptimizerConfig(name="finch_sgd", max_learning_rate=0.1, base_learning_rate=0.1)
    want_loss, _ = _check_accumulation(_toy_apply, params, batch, opt_cfg)
    micro_means = [_reference_loss(_toy_apply, params, {k: v[j::4] for k, v in batch.items()}) for j in range(4)]
    assert abs(np.mean(micro_means) - want_loss) > 1e-2  # so this batch tells the two apart


@pytest.mark.parametrize("fused", [False, True], ids=["autodiff", "fused-elementwise"])
def test_sharded_data_fsdp_tensor_step_matches_single_device(tiny, fused):
    """fused: the sharded step runs the model with the hand-written RMSNorm / RoPE / SwiGLU backwards
    (models.elementwise), against the same single-device autodiff reference."""
    model, apply_fn, params = tiny
    batch = _batch(512, seed=1)
    opt_cfg = ADAMW
    ref, ref_m = _run(apply_fn, params, opt_cfg, batch, steps=2)
    mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    psh = mesh_lib.param_shardings(params, models.logical_axes(model), mesh, mesh_lib.parse_rules())
    run_fn = apply_fn
    if fused:
        switches = {"fuse_rmsnorm": True, "fuse_rope": True, "fuse_swiglu": True}
        fused_model = models.CausalLM(dataclasses.replace(model.config, **switches), rngs=nnx.Rngs(0))
        run_fn, fused_params, _ = step_lib.split_model(fused_model)
        assert jax.tree.structure(fused_params) == jax.tree.structure(params)
    got, got_m = _run(run_fn, params, opt_cfg, batch, grad_accum=2, mesh=mesh, params_shardings=psh, steps=2)
    for a, b in zip(ref_m, got_m):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
        np.testing.assert_allclose(b["lr"], a["lr"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(got.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    # the state kept its layout: params sharded by the rules, Adam moments like their params, FINCH replicated
    emb = got.params["embed"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    [(_, finch)] = finch_optax.find_finch_states(got.opt_state)
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(finch))
    adam = _adam_state(got)
    assert adam.mu["embed"].sharding.spec == emb.sharding.spec


def _adam_state(state):
    """The one ``ScaleByAdamState`` in a train state's optimizer state, however deeply it is wrapped."""
    is_adam = lambda node: isinstance(node, optax.ScaleByAdamState)  # noqa: E731
    [adam] = [node for node in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(node)]
    return adam


# A toy "LM" compiles in well under a second: used for the exact-math checks below.
def _toy_apply(params, tokens, positions, segment_ids):
    return jnp.tanh(params["emb"][tokens]) @ params["out"]


def _toy_params(vocab=16, dim=4):
    k1, k2 = jax.random.split(jax.random.key(1))
    return {"emb": jax.random.normal(k1, (vocab, dim)), "out": jax.random.normal(k2, (dim, vocab))}


def test_l2sp_adds_the_pull_toward_the_anchor_and_keeps_the_anchor():
    params = _toy_params()
    batch = _batch(16, seed=2)
    lam, lr = 0.5, 0.1
    opt_cfg = OptimizerConfig(name="sgd", learning_rate=lr, momentum=0.0)
    state, metrics = _run(_toy_apply, params, opt_cfg, batch, steps=2, l2sp_weight=lam)

    def objective(p):
        loss_sum, weight = step_lib.token_loss_sums(_toy_apply, p, batch)
        sq = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params)))
        return loss_sum / weight + 0.5 * lam * sq

    want = params
    for _ in range(2):
        want = jax.tree.map(lambda p, g: p - lr * g, want, jax.grad(objective)(want))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(state.anchor), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert metrics[0]["l2sp"] == 0.0 and metrics[1]["l2sp"] > 0.0


def test_zero_weight_tokens_do_not_move_the_params_and_weights_are_scale_free():
    params = _toy_params()
    batch = _batch(16, seed=3)
    opt_cfg = OptimizerConfig(name="sgd", learning_rate=0.1, momentum=0.0)
    base, [m_base] = _run(_toy_apply, params, opt_cfg, batch)
    changed = dict(batch)
    changed["targets"] = np.where(batch["loss_mask"] == 0, (batch["targets"] + 5) % 16, batch["targets"])
    changed["loss_mask"] = batch["loss_mask"] * 3.0
    other, [m_other] = _run(_toy_apply, params, opt_cfg, changed)
    np.testing.assert_allclose(m_other["loss"], m_base["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(base.params), jax.tree.leaves(other.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_step_is_pure_and_never_recompiles():
    params = _toy_params()
    opt_cfg = OptimizerConfig(name="finch_sgd", max_learning_rate=0.1, base_learning_rate=0.1)
    tx = make_optimizer(opt_cfg)
    step = step_lib.make_train_step(_toy_apply, tx)
    state, _ = step_lib.create_train_state(params, tx)
    for seed in range(3):
        state, m = step(state, _batch(16, seed=seed))
    assert int(state.step) == 3 and step._cache_size() == 1
    assert np.isfinite(float(m["loss"]))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    with pytest.raises(ValueError, match="grad_accum"):
        step_lib.make_train_step(_toy_apply, tx, grad_accum=0)
    assert optax.tree.norm(state.params) > 0

"""Config loading/overrides, optimizers by name, the CLI dispatcher and the mesh/sharding rules (no training)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml

import finch_optax
from train import cli, optimizers
from train import mesh as mesh_lib
from train.config import (
    ConfigError,
    MeshConfig,
    OptimizerConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    save_config,
    to_dict,
    valid_keys,
)

# ---------------------------------------------------------------------------------------------------------- config


def test_yaml_and_overrides_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {"steps": 7, "optimizer": {"name": "adamw", "learning_rate": "3e-4"}, "data": {"train_files": ["a.txt"]}}
        )
    )
    cfg = load_config(path, ["data.batch_size=16", "optimizer.schedule=warmup_cosine", "data.train_files=[x,y.jsonl]"])
    assert cfg.steps == 7
    assert cfg.optimizer.name == "adamw" and cfg.optimizer.learning_rate == 3e-4  # YAML's "3e-4" string is a number
    assert cfg.data.batch_size == 16 and cfg.data.train_files == ("x", "y.jsonl")
    assert cfg.optimizer.schedule == "warmup_cosine"
    out = tmp_path / "back.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optimizer.learnin_rate=1", "unknown config key 'optimizer.learnin_rate'"),
        ("steps=ten", "must be an integer"),
        ("steps=1.5", "must be an integer"),
        ("progress=maybe", "must be true/false"),
        ("optimizer.learning_rate=fast", "must be a number"),
        ("no_equals_sign", "not of the form key=value"),
    ],
)
def test_bad_override_is_a_clear_error_listing_valid_keys(override, fragment):
    with pytest.raises(ConfigError) as info:
        apply_overrides(TrainConfig(), [override])
    assert fragment in str(info.value)
    if "unknown" in fragment or "form" in fragment:
        assert "optimizer.learning_rate" in str(info.value)  # the valid keys are listed


def test_unknown_yaml_key_names_file_and_lists_section_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  seq_length: 12\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "'data.seq_length'" in msg and "data.seq_len" in msg


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_valid_keys_cover_every_leaf():
    keys = valid_keys()
    assert "optimizer.lr_trace" in keys and "checkpoint.directory" in keys and "l2sp_weight" in keys
    assert len(keys) == len(set(keys))


# ------------------------------------------------------------------------------------------------------ optimizers


def _quadratic_params():
    return {"w": jnp.array([1.0, -2.0, 3.0], jnp.float32)}


@pytest.mark.parametrize("name", list(optimizers.OPTIMIZERS))
def test_every_named_optimizer_updates_with_value_and_reports_its_lr(name):
    rates = (
        dict(max_learning_rate=0.1, base_learning_rate=0.05) if name.startswith("finch_") else {"learning_rate": 0.1}
    )
    cfg = OptimizerConfig(name=name, **rates)
    tx = optimizers.make_optimizer(cfg)
    params = _quadratic_params()
    state = tx.init(params)
    grads = {"w": jnp.array([0.5, -0.5, 1.0])}
    updates, state = tx.update(grads, state, params, value=jnp.float32(4.0))
    assert np.all(np.isfinite(np.asarray(updates["w"]))) and np.any(np.asarray(updates["w"]) != 0)
    lr = float(optimizers.applied_learning_rate(state))
    if name.startswith("finch_"):
        # First update: EMA = value = 4 -> lr = min(0.1, 0.05 / sqrt(4)) = 0.025.
        np.testing.assert_allclose(lr, 0.025, rtol=1e-5)
    else:
        np.testing.assert_allclose(lr, 0.1, rtol=1e-6)


def test_finch_adamw_matches_the_library_alias():
    cfg = OptimizerConfig(name="finch_adamw", max_learning_rate=1e-2, base_learning_rate=5e-3, weight_decay=0.01)
    ours, ref = optimizers.make_optimizer(cfg), finch_optax.finch_adamw(5e-3, 1e-2, weight_decay=0.01)
    params = _quadratic_params()
    s1, s2 = ours.init(params), ref.init(params)
    for value in (2.0, 1.5, 0.7):
        g = {"w": params["w"] * value}
        u1, s1 = ours.update(g, s1, params, value=jnp.float32(value))
        u2, s2 = ref.update(g, s2, params, value=jnp.float32(value))
        np.testing.assert_array_equal(np.asarray(u1["w"]), np.asarray(u2["w"]))


def test_trace_schedule_replays_the_recorded_lrs_then_holds_the_last():
    trace = (0.1, 0.2, 0.05)
    cfg = OptimizerConfig(name="sgd", schedule="trace", lr_trace=trace, momentum=0.0)
    tx = optimizers.make_optimizer(cfg)
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    seen = []
    for _ in range(5):
        updates, state = tx.update({"w": jnp.ones(())}, state, params, value=jnp.float32(1.0))
        seen.append(-float(updates["w"]))
        np.testing.assert_allclose(float(optimizers.applied_learning_rate(state)), seen[-1], rtol=1e-6)
    np.testing.assert_allclose(seen, [0.1, 0.2, 0.05, 0.05, 0.05], rtol=1e-6)


def test_warmup_cosine_scales_both_finch_rates():
    cfg = OptimizerConfig(
        name="finch_sgd",
        max_learning_rate=1.0,
        base_learning_rate=1.0,
        schedule="warmup_cosine",
        warmup_steps=2,
        decay_steps=10,
    )
    tx = optimizers.make_optimizer(cfg)
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    lrs = []
    for _ in range(3):
        _, state = tx.update({"w": jnp.ones(())}, state, params, value=jnp.float32(0.25))
        lrs.append(float(finch_optax.current_learning_rate(state)))
    # lr_t = min(s(t), s(t)/sqrt(Lbar)) with Lbar = 0.25 -> the cap s(t): 0, 0.5, 1.0 (warmup).
    np.testing.assert_allclose(lrs, [0.0, 0.5, 1.0], atol=1e-6)


@pytest.mark.parametrize(
    "cfg, fragment",
    [
        (OptimizerConfig(name="rmsprop"), "optimizer.name='rmsprop' is unknown"),
        (OptimizerConfig(schedule="linear"), "optimizer.schedule='linear'"),
        (OptimizerConfig(name="adamw", schedule="trace"), "needs optimizer.lr_trace"),
        (OptimizerConfig(name="finch_adamw", schedule="trace", lr_trace=(1.0,)), "not FINCH"),
        (OptimizerConfig(max_learning_rate=0.0), "max_learning_rate must be > 0"),
        (OptimizerConfig(name="adamw", learning_rate=0.0), "optimizer.learning_rate must be > 0"),
        (OptimizerConfig(name="adamw", max_learning_rate=3e-4), "FINCH setting"),
        (OptimizerConfig(name="sgd", base_learning_rate=3e-4), "FINCH setting"),
        (OptimizerConfig(clip_norm=-1.0), "clip_norm"),
    ],
)
def test_bad_optimizer_config(cfg, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        optimizers.make_optimizer(cfg)


def test_clipping_bounds_the_global_norm():
    cfg = OptimizerConfig(name="sgd", learning_rate=1.0, momentum=0.0, clip_norm=1.0)
    tx = optimizers.make_optimizer(cfg)
    params = {"w": jnp.zeros(4)}
    updates, _ = tx.update({"w": jnp.full(4, 10.0)}, tx.init(params), params, value=jnp.float32(1.0))
    np.testing.assert_allclose(float(optax.tree.norm(updates)), 1.0, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------- cli


def test_cli_usage_and_unknown_subcommand(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in ("finetune", "generate", "demo", "prepare", "eval", "compare", "bench"):
        assert name in out
    assert cli.main(["frobnicate"]) == 2
    assert "unknown subcommand 'frobnicate'" in capsys.readouterr().err


def test_cli_dispatch_table_matches_the_interface():
    assert {k: v[0] for k, v in cli.SUBCOMMANDS.items()} == {
        "finetune": "train.finetune:main",
        "generate": "train.generate:main",
        "demo": "train.lab.demo:main",
        "prepare": "train.lab.sources:main",
        "eval": "train.lab.evaluate:main",
        "compare": "train.lab.compare:main",
        "bench": "train.bench.cli:main",
        "compile": "train.compile:main",
        "export": "train.export:main",
        "chat": "train.generate:chat_main",
    }


# ------------------------------------------------------------------------------------------------------------ mesh


@pytest.mark.parametrize(
    "cfg, shape",
    [
        (MeshConfig(), (1, 8, 1)),  # the default: params and optimizer state sharded over every device
        (MeshConfig(data=-1, fsdp=1), (8, 1, 1)),  # replication is opt-in
        (MeshConfig(data=2, fsdp=2, tensor=2), (2, 2, 2)),
        (MeshConfig(data=1, fsdp=-1, tensor=2), (1, 4, 2)),
    ],
)
def test_mesh_fills_minus_one(cfg, shape):
    mesh = mesh_lib.make_mesh(cfg)
    assert tuple(mesh.shape[a] for a in mesh_lib.MESH_AXES) == shape


@pytest.mark.parametrize(
    "cfg, fragment",
    [
        (MeshConfig(data=3, fsdp=1, tensor=1), "needs 3 devices, but 8"),
        (MeshConfig(data=-1, fsdp=-1), "at most one"),
        (MeshConfig(data=-1, fsdp=3), "do not divide"),
        (MeshConfig(data=0), "positive"),
    ],
)
def test_mesh_that_does_not_match_the_devices_is_an_error(cfg, fragment):
    with pytest.raises(mesh_lib.ShardingError, match=fragment):
        mesh_lib.make_mesh(cfg)


def test_default_mesh_shards_params_and_optimizer_state_over_every_device():
    mesh = mesh_lib.make_mesh(MeshConfig())
    params = {"w": np.zeros((64, 128), np.float32)}
    shardings = mesh_lib.param_shardings(params, {"w": ("embed", "mlp")}, mesh, mesh_lib.parse_rules())
    assert shardings["w"].spec == jax.sharding.PartitionSpec("fsdp", None)
    assert shardings["w"].shard_shape((64, 128)) == (8, 128)
    assert mesh_lib.batch_sharding(mesh).shard_shape((16, 4)) == (2, 4)  # the batch is split 8 ways too


def test_logical_rules_table():
    mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = mesh_lib.parse_rules()
    P = jax.sharding.PartitionSpec
    assert mesh_lib.logical_to_spec(("embed", "mlp"), (64, 128), mesh, rules) == P("fsdp", "tensor")
    assert mesh_lib.logical_to_spec(("vocab", "embed"), (512, 64), mesh, rules) == P("tensor", "fsdp")
    # 3 KV heads cannot split over tensor=2: replicated rather than failing
    assert mesh_lib.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 3, 16), mesh, rules) == P(
        "fsdp", None, None
    )
    with pytest.raises(mesh_lib.ShardingError, match="both map to mesh axis 'tensor'"):
        mesh_lib.logical_to_spec(("heads", "mlp"), (4, 8), mesh, rules)
    with pytest.raises(mesh_lib.ShardingError, match="no sharding rule"):
        mesh_lib.logical_to_spec(("experts",), (4,), mesh, rules)
    custom = mesh_lib.parse_rules(["mlp=fsdp+tensor", "vocab=none"])
    assert mesh_lib.logical_to_spec(("mlp",), (8,), mesh, custom) == P(("fsdp", "tensor"))
    assert mesh_lib.logical_to_spec(("vocab",), (8,), mesh, custom) == P(None)
    with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
        mesh_lib.parse_rules(["mlp=model"])


def test_optimizer_state_shardings_follow_params_by_path():
    mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    params = {"dense": {"kernel": jnp.zeros((8, 4))}, "bias": jnp.zeros((4,))}
    axes = {"dense": {"kernel": ("embed", "mlp")}, "bias": ("mlp",)}
    psh = mesh_lib.param_shardings(params, axes, mesh, mesh_lib.parse_rules())
    tx = optimizers.make_optimizer(OptimizerConfig())
    opt_state = jax.eval_shape(tx.init, params)
    osh = mesh_lib.state_shardings_like(opt_state, params, psh, mesh)
    flat = {mesh_lib.path_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(osh)[0]}
    P = jax.sharding.PartitionSpec
    mu = [k for k in flat if k.endswith("mu/dense/kernel")]
    assert mu and all(flat[k] == P("fsdp", "tensor") for k in mu)
    assert all(flat[k] == P("tensor") for k in flat if k.endswith("nu/bias"))
    finch = [k for k in flat if any(k.endswith(f) for f in ("ema_loss", "learning_rate", "count", "skipped"))]
    assert finch and all(flat[k] == P() for k in finch)


def test_dataclass_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().steps = 3  # type: ignore[misc]
    assert math.isclose(OptimizerConfig().ema_decay, 0.9)

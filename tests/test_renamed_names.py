"""The names of 0.1 that 0.2 replaced still work, for one release, with a message naming the new one."""

import jax.numpy as jnp
import pytest

import finch_optax
import models
from train.config import OptimizerConfig, load_config
from train.lab import compare, methods
from train.lab.config import CompareConfig


def test_optimizer_learning_rate_of_a_finch_optimizer_is_its_max_learning_rate():
    with pytest.warns(FutureWarning, match="optimizer.max_learning_rate"):
        cfg = load_config(None, ["optimizer.name=finch_adamw", "optimizer.learning_rate=3e-4"])
    assert cfg.optimizer.max_learning_rate == 3e-4 and cfg.optimizer.learning_rate == OptimizerConfig().learning_rate
    with pytest.raises(models.ConfigError, match="both set FINCH's cap"):
        OptimizerConfig(name="finch_adamw", learning_rate=3e-4, max_learning_rate=1e-3)


def test_bare_model_names_parse_with_a_warning():
    with pytest.warns(FutureWarning, match="preset:qwen3-4b"):
        assert str(models.parse_source("qwen3-4b")) == "preset:qwen3-4b"
    with pytest.warns(FutureWarning, match="gguf:smollm2"):
        assert str(models.parse_source("smollm2")) == "gguf:smollm2"
    with pytest.raises(models.ConfigError, match="use preset:NAME"):
        models.parse_source("no-such-model")


def test_skip_counter_names_of_0_1():
    tx = finch_optax.finch_adamw(1e-3, 1e-2)
    _, state = tx.update(jnp.ones(2), tx.init(jnp.ones(2)), jnp.ones(2), value=jnp.nan)
    counts = finch_optax.skip_counts(state)
    with pytest.warns(FutureWarning, match="skipped"):
        assert int(counts.total) == int(counts.skipped) == 1
    with pytest.warns(FutureWarning, match="consecutive_skips"):
        assert int(state.consecutive_skipped) == int(counts.consecutive_skips) == 1
    # A flattened state saved by 0.1 (as flax's nnx.state keeps it) still reads.
    old = {"total_skipped": jnp.int32(4), "consecutive_skipped": jnp.int32(2), "inner_state": ()}
    assert tuple(map(int, finch_optax.skip_counts({"opt": old}))) == (4, 2)


def test_lab_names_of_0_1():
    with pytest.warns(FutureWarning, match="max_learning_rate="):
        [run] = methods.expand_runs(CompareConfig(model="preset:tiny", methods=("finch:lr=0.1,base=0.05",)))
    assert (run.optimizer["max_learning_rate"], run.optimizer["base_learning_rate"]) == (0.1, 0.05)
    cfg, _ = compare.config_from_args(["--lr-max", "2e-4", "--method", "sft"], CompareConfig(), "compare")
    assert cfg.max_learning_rate == 2e-4

"""Parity with Hugging Face transformers: tiny random Llama / Qwen2 / Qwen3 checkpoints, export round trip, and
clear errors for bad directories. Needs torch + transformers (the test extra)."""

import dataclasses
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
import models.weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.torch

TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10_000.0,
)

HF_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY, tie_word_embeddings=False),
    "llama3-rope-scaling": lambda: transformers.LlamaConfig(
        **TINY,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=24, tie_word_embeddings=False),
}


def _randomize(hf_model, seed):
    # Default init leaves norms at 1 and biases at 0, which would hide ordering or transposition mistakes.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in hf_model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2 + (1.0 if param.ndim == 1 else 0.0))
    return hf_model


def _hf_logits(hf_model, tokens, positions=None):
    with torch.no_grad():
        kwargs = {} if positions is None else {"position_ids": torch.tensor(np.asarray(positions))}
        return hf_model(torch.tensor(np.asarray(tokens)), **kwargs).logits.float().numpy()


def _tokens(batch=2, length=12, vocab=300, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    torch.manual_seed(0)
    hf_model = _randomize(transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[name]()).float().eval(), seed=1)
    hf_model.save_pretrained(tmp_path)
    model, tokenizer = models.load_hf(tmp_path)
    assert tokenizer is None  # save_pretrained of a model alone writes no tokenizer
    tokens = _tokens()
    positions = np.broadcast_to(np.arange(12) + 40, (2, 12)).astype(np.int32)  # past the llama3 original length
    diff = max(
        np.abs(np.asarray(model(tokens)) - _hf_logits(hf_model, tokens)).max(),
        np.abs(np.asarray(model(tokens, positions=positions)) - _hf_logits(hf_model, tokens, positions)).max(),
    )
    print(f"\n[parity] {name}: max |logit diff| = {diff:.2e}")
    assert diff < 1e-4
    if name == "llama3-rope-scaling":
        # The scaling must matter at these positions, or this case would not test it.
        unscaled = models.weights.model_from_hf_tensors(
            dataclasses.replace(model.config, rope_scaling=None), models.weights.model_to_hf_tensors(model)
        )
        assert (
            np.abs(np.asarray(unscaled(tokens, positions=positions)) - _hf_logits(hf_model, tokens, positions)).max()
            > 1e-2
        )


def test_scan_and_bf16_load_from_hf(tmp_path):
    hf_model = _randomize(transformers.AutoModelForCausalLM.from_config(HF_CONFIGS["qwen3"]()).float().eval(), seed=2)
    hf_model.save_pretrained(tmp_path)
    tokens = _tokens()
    reference = _hf_logits(hf_model, tokens)
    scanned, _ = models.load_hf(tmp_path, scan_layers=True, remat=True)
    np.testing.assert_allclose(scanned(tokens), reference, atol=1e-4)
    half, _ = models.load_hf(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    logits = np.asarray(half(tokens))
    assert logits.dtype == np.float32
    # bf16 keeps ~3 significant digits; logits here are O(10), so agreement to a few tenths is the expectation.
    assert np.abs(logits - reference).max() < 0.5 * np.abs(reference).max() / 10


@pytest.mark.parametrize(
    "architecture,extra",
    [
        ("llama", dict(tie_embeddings=False)),
        ("qwen2", dict(attention_bias=True)),
        ("qwen3", dict(qk_norm=True, tie_embeddings=False)),
    ],
)
def test_export_round_trip_through_transformers(architecture, extra, tmp_path):
    cfg = models.get_preset("tiny", architecture=architecture, **extra)
    model = models.CausalLM(cfg, rngs=nnx.Rngs(3))
    # Non-trivial norms and biases so a dropped or misplaced tensor shows up in the logits.
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(0)
    for path, var in nnx.to_flat_state(state):
        if var[...].ndim <= 2 and path[-1] in ("weight", "q_bias", "k_bias", "v_bias"):
            var[...] = jnp.asarray(rng.normal(1.0, 0.2, var[...].shape), jnp.float32)
    nnx.update(model, state)
    models.save_hf(model, models.ByteTokenizer(), tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert hf_model.config.model_type == architecture
    tokens = _tokens(vocab=cfg.vocab_size)
    diff = np.abs(np.asarray(model(tokens)) - _hf_logits(hf_model, tokens)).max()
    print(f"\n[export] {architecture}: max |logit diff| ours vs transformers(our export) = {diff:.2e}")
    assert diff < 1e-4
    reloaded, _ = models.load_hf(tmp_path)
    np.testing.assert_array_equal(np.asarray(reloaded(tokens)), np.asarray(model(tokens)))


def test_sharded_export_loads_in_both(tmp_path):
    model = models.CausalLM(models.get_preset("tiny", tie_embeddings=False), rngs=nnx.Rngs(4))
    models.save_hf(model, None, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    tokens = _tokens(vocab=512)
    reloaded, _ = models.load_hf(tmp_path)
    np.testing.assert_array_equal(np.asarray(reloaded(tokens)), np.asarray(model(tokens)))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert np.abs(np.asarray(model(tokens)) - _hf_logits(hf_model, tokens)).max() < 1e-4


@pytest.fixture()
def saved_llama(tmp_path):
    hf_model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS["llama"]())
    hf_model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_bad_directories_give_clear_errors(saved_llama, tmp_path):
    with pytest.raises(models.HFDirectoryError, match="model directory not found"):
        models.load_hf(tmp_path / "nope")
    no_config = tmp_path / "no_config"
    shutil.copytree(saved_llama, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(models.HFDirectoryError, match="config.json is missing"):
        models.load_hf(no_config)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(saved_llama, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(models.HFDirectoryError, match="neither model.safetensors nor model.safetensors.index.json"):
        models.load_hf(no_weights)
    broken_index = tmp_path / "broken_index"
    shutil.copytree(saved_llama, broken_index)
    (broken_index / "model.safetensors").unlink()
    (broken_index / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(models.HFDirectoryError, match="model-00001-of-00002.safetensors"):
        models.load_hf(broken_index)


def test_config_weight_mismatch_and_unsupported_options(saved_llama):
    config_path = saved_llama / "config.json"
    original = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**original, "intermediate_size": 128}))
    with pytest.raises(models.WeightError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\(96, 64\).*\(128, 64\)"):
        models.load_hf(saved_llama)
    config_path.write_text(json.dumps({**original, "model_type": "mistral"}))
    with pytest.raises(models.ConfigError, match=r"config\.json: model_type='mistral' is not supported"):
        models.load_hf(saved_llama)
    config_path.write_text(json.dumps({**original, "attention_bias": True}))
    with pytest.raises(models.ConfigError, match="attention_bias=True"):
        models.load_hf(saved_llama)
    config_path.write_text(json.dumps({**original, "num_hidden_layers": 3}))
    with pytest.raises(models.WeightError, match=r"'model\.layers\.2\.self_attn\.q_proj\.weight' is missing"):
        models.load_hf(saved_llama)

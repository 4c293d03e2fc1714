"""The FLOP count of the benchmark (``models.flops``): by hand, against the models' parameter count, scaling."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import models
from models import flops as flops_lib

HAND = flops_lib.TransformerShape(
    vocab_size=10, embed_dim=4, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=2, mlp_dim=6
)


def test_forward_flops_hand_count():
    # Per layer, per token, T = 3 keys (2 FLOPs per multiply-add):
    #   q: x[4] @ W[4, 2*2] -> 2*4*4 = 32     k: x[4] @ W[4, 1*2] -> 2*4*2 = 16     v: 16
    #   o: a[2*2] @ W[4, 4] -> 32             q.k over 3 keys, 2 heads of 2 -> 2*2*2*3 = 24
    #   p.v: 24                                gate, up, down: 3 * 2*4*6 = 144
    # = 32+16+16+32 + 24+24 + 144 = 288 per layer; 2 layers = 576; LM head x[4] @ W[4, 10] = 80.
    parts = flops_lib.forward_flops_per_token(HAND, seq_len=3)
    assert parts == {
        "attention_projections": 2 * 96.0,
        "attention_scores": 2 * 24.0,
        "attention_values": 2 * 24.0,
        "mlp": 2 * 144.0,
        "lm_head": 80.0,
        "total": 656.0,
    }
    assert flops_lib.training_flops_per_token(HAND, 3) == 3 * 656.0
    assert flops_lib.training_flops_per_step(HAND, batch_size=5, seq_len=3) == 5 * 3 * 3 * 656.0
    # Causal counting: (3 + 1) / 2 = 2 keys on average -> 2*2*2*2 = 16 per layer for scores and for values.
    causal = flops_lib.forward_flops_per_token(HAND, seq_len=3, causal_attention=True)
    assert causal["attention_scores"] == causal["attention_values"] == 2 * 16.0
    assert causal["total"] == 656.0 - 4 * 8.0


def test_matmul_params_agree_with_the_models_param_count():
    for name in ("tiny", "smollm2-135m", "llama3-8b"):
        cfg = models.get_preset(name)
        shape = flops_lib.shape_of(cfg)
        norms = cfg.num_layers * 2 * cfg.d_model + cfg.d_model
        untied_head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model  # the lookup table: no matmul
        assert flops_lib.matmul_param_count(shape) == cfg.num_params - norms - untied_head, name


def test_smollm2_step_is_about_6n_plus_attention():
    shape = flops_lib.shape_of(models.get_preset("smollm2-135m"))
    n = flops_lib.matmul_param_count(shape)
    per_token = flops_lib.training_flops_per_token(shape, 512)
    attention = 3 * 2 * 2 * shape.num_layers * shape.num_heads * shape.head_dim * 512
    assert per_token == pytest.approx(6 * n + attention)
    assert 0.9e9 < per_token < 0.95e9  # 134.5M matmul weights -> ~0.91 GFLOP per trained token at T = 512


def test_shape_of_reads_hf_spelling_and_rejects_incomplete_configs():
    class HF:
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads = 10, 4, 2, 2
        num_key_value_heads, intermediate_size = 1, 6

    assert flops_lib.shape_of(HF()) == HAND
    with pytest.raises(ValueError, match="lacks.*mlp_dim"):
        flops_lib.shape_of(
            type(
                "C",
                (),
                {"vocab_size": 1, "d_model": 4, "num_layers": 1, "num_heads": 1, "num_kv_heads": 1, "head_dim": 4},
            )()
        )
    with pytest.raises(ValueError, match="num_kv_heads"):
        flops_lib.TransformerShape(10, 4, 2, 3, 2, 2, 6)


@settings(max_examples=50, deadline=None)
@given(b=st.integers(1, 64), t=st.integers(1, 4096), layers=st.integers(1, 8))
def test_flops_scale_linearly_in_batch_and_layers(b, t, layers):
    shape = flops_lib.TransformerShape(100, 8, layers, 4, 2, 2, 16)
    one = flops_lib.training_flops_per_step(shape, 1, t)
    assert flops_lib.training_flops_per_step(shape, b, t) == pytest.approx(b * one)
    head = 3 * t * 2 * 8 * 100
    per_layer = (one - head) / layers
    doubled = flops_lib.TransformerShape(100, 8, 2 * layers, 4, 2, 2, 16)
    assert flops_lib.training_flops_per_step(doubled, 1, t) == pytest.approx(head + 2 * layers * per_layer)

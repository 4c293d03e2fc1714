"""The profile split: time attribution over overlapping ops, and each op's class on both frameworks."""

from __future__ import annotations

import jax
import pytest

import models
from train import optimizers
from train import step as step_lib
from train.bench import profile_xla as px
from train.bench.profile_torch import classify_torch_op
from train.bench.runner import synthetic_batch
from train.chips import spec_peak_flops
from train.config import OptimizerConfig


def test_overlapping_ops_share_the_wall_time_they_overlap():
    # a runs 0-10 alone except 4-6, where b runs too; c runs 20-22 (the gap 10-20 is no op)
    events = [(0, 10_000_000_000, "a"), (4_000_000_000, 6_000_000_000, "b"), (20_000_000_000, 22_000_000_000, "c")]
    per_op = px.attribute_wall_time(events)
    assert per_op == pytest.approx({"a": 9.0, "b": 1.0, "c": 2.0})
    # the same op on two threads at once (one kernel, two workers) counts once per instant
    assert px.attribute_wall_time([(0, 10, "d"), (0, 10, "d")]) == pytest.approx({"d": 1e-8})


def test_class_split_puts_unattributed_wall_time_under_runtime():
    split = px.class_split({"x": 1.0}, {}, wall_s=3.0, steps=2)
    assert split["step_s"] == 1.5
    assert split["seconds"][px.OTHER] == 0.5 and split["seconds"][px.RUNTIME] == 1.0
    assert list(split["seconds"]) == list(px.OP_CLASSES)


@pytest.fixture(scope="module")
def tiny_step_hlo() -> str:
    model, _ = models.load("preset:tiny")
    apply_fn, params, _ = step_lib.split_model(model)
    tx = optimizers.make_optimizer(OptimizerConfig(name="finch_adamw"))
    state, _ = step_lib.create_train_state(params, tx)
    step = step_lib.make_train_step(apply_fn, tx)
    batch = jax.device_put(synthetic_batch(model.config.vocab_size, 2, 16, 0))
    return step.lower(state, batch).compile().as_text()


def test_every_part_of_the_real_step_is_found_in_its_hlo(tiny_step_hlo):
    instrs = px.parse_hlo(tiny_step_hlo)
    classes = {px.classify_instruction(i) for i in instrs.values()}
    # every class of the list appears in the compiled train step of the tiny model
    assert set(px.OP_CLASSES) - {px.RUNTIME} <= classes
    dots = [i for i in instrs.values() if i.opcode == "dot" or "dot" in i.fused_opcodes]
    dot_classes = {px.classify_instruction(i) for i in dots}
    assert {px.PROJ, px.MLP, px.ATTN, px.LMHEAD} <= dot_classes
    assert dot_classes <= {px.PROJ, px.MLP, px.ATTN, px.LMHEAD, px.OTHER, px.COPY}
    # an instruction's Python frame points into this repository's model code
    assert any(i.frame and i.frame[0].endswith("models/transformer.py") for i in dots)


@pytest.mark.parametrize(
    "chain, shapes, expected",
    [
        (["aten::mm", "MmBackward0"], [[32, 100], [100, 8]], px.LMHEAD),  # vocab 100 in the shapes
        (["aten::mm", "aten::linear"], [[32, 8], [8, 24]], px.MLP),  # the MLP width 24
        (["aten::mm", "aten::matmul"], [[32, 8], [8, 8]], px.PROJ),
        (["aten::mul", "aten::_scaled_dot_product_flash_attention_for_cpu"], [], px.ATTN),
        (["aten::_log_softmax"], [], px.CE),
        (["aten::fill_", "autograd::engine::evaluate_function: NllLossBackward0"], [], px.CE),
        (["aten::add", "autograd::engine::evaluate_function: EmbeddingBackward0"], [], px.EMBED),
        (["aten::sqrt", "Optimizer.step#AdamW.step"], [], px.OPT),
        (["aten::copy_"], [], px.COPY),
        (["aten::silu_backward", "autograd::engine::evaluate_function: SiluBackward0"], [], px.ELEMWISE),
        (["aten::empty"], [], px.OTHER),
    ],
)
def test_torch_ops_take_the_class_of_the_part_they_run_in(chain, shapes, expected):
    assert classify_torch_op(chain, shapes, vocab=100, mlp_dim=24) == expected


def test_spec_peaks_are_per_chip_and_only_for_listed_accelerators():
    assert spec_peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert spec_peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert spec_peak_flops("TPU v5 lite", "bfloat16") == 197e12
    assert spec_peak_flops("cpu", "float32") is None
    assert spec_peak_flops("NVIDIA H200", "float32") is None


def test_an_async_op_lasts_until_its_end_mark():
    # launched at 0 (event 0-1), finished at 5; a second launch at 10 with no mark keeps its own event end
    assert px.pair_end_marks("dot", [(0, 1), (10, 12)], [5]) == [(0, 5, "dot"), (10, 12, "dot")]
    # a mark before the launch belongs to an earlier one (outside the trace) and is skipped
    assert px.pair_end_marks("dot", [(10, 11)], [3, 20]) == [(10, 20, "dot")]

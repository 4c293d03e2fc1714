"""The benchmark: FLOP formula, timing arithmetic, and the `bench` command end to end on a tiny model."""

from __future__ import annotations

import json
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from train import bench
from train import flops as flops_lib

# --------------------------------------------------------------------------------------------------------------------
# FLOP formula
# --------------------------------------------------------------------------------------------------------------------

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
    import models

    for name in ("tiny", "smollm2-135m", "llama3-8b"):
        cfg = models.get_preset(name)
        shape = flops_lib.shape_of(cfg)
        norms = cfg.num_layers * 2 * cfg.d_model + cfg.d_model
        untied_head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model  # the lookup table: no matmul
        assert flops_lib.matmul_param_count(shape) == cfg.num_params - norms - untied_head, name


def test_smollm2_step_is_about_6n_plus_attention():
    import models

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


# --------------------------------------------------------------------------------------------------------------------
# Timing arithmetic from given timings
# --------------------------------------------------------------------------------------------------------------------


def test_summary_mfu_and_ratios_from_given_timings():
    s = bench.summarize_times([1.0, 4.0, 2.0, 3.0, 100.0])
    assert s["median_s"] == 3.0 and s["min_s"] == 1.0 and s["max_s"] == 100.0 and s["n"] == 5
    assert s["iqr_s"] == 4.0 - 2.0 and s["spread"] == pytest.approx(2.0 / 3.0)

    t = bench.throughput(tokens_per_step=2048, flops_per_step=2e12, step_s=4.0, peak_flops_per_s=1e12)
    assert t == {"tokens_per_s": 512.0, "achieved_flops_per_s": 5e11, "mfu": 0.5}
    assert bench.throughput(10, 1.0, 2.0, None)["mfu"] is None
    assert flops_lib.mfu(3e12, 2.0, 2e12) == 0.75

    finch = [[1.02, 1.04], [1.10, 1.00]]
    adamw = [[1.00, 1.00], [1.00, 1.20]]
    r = bench.ratio_of_medians(finch, adamw)
    assert r["ratio"] == pytest.approx(statistics.median([1.02, 1.04, 1.10, 1.00]) / 1.0)
    assert r["round_ratios"] == pytest.approx([1.03, 1.05 / 1.10])
    assert r["low"] == pytest.approx(1.05 / 1.10) and r["high"] == pytest.approx(1.03)
    with pytest.raises(ValueError):
        bench.ratio_of_medians([[1.0]], [[1.0], [2.0]])


def test_interleaved_takes_turns_and_times_each_step():
    calls, now = [], [0.0]
    durations = {"A": 1.0, "B": 3.0}

    def make(name):
        def step():
            calls.append(name)
            now[0] += durations[name]

        return step

    times = bench.interleaved({"A": make("A"), "B": make("B")}, rounds=3, steps_per_round=2, clock=lambda: now[0])
    assert calls == ["A", "A", "B", "B"] * 3
    assert times == {"A": [[1.0, 1.0]] * 3, "B": [[3.0, 3.0]] * 3}
    assert bench.ratio_of_medians(times["B"], times["A"])["ratio"] == 3.0


def test_targets_from_a_given_result():
    runner = {"name": "jax finch_adamw", "mfu": 0.55}
    result = {
        "meta": {"backend": "cpu"},
        "flops": {"tokens_per_step": 2048},
        "runners": [runner],
        "ratios": {
            "finch_over_adamw_step_time": {"ratio": 1.02},
            "jax_over_torch_eager_tokens_per_s": {"ratio": 2.0},
            "jax_over_torch_compile_tokens_per_s": {"ratio": 1.4},
        },
    }
    t = bench.check_targets(result)
    assert t["finch_over_adamw_le_1.01"] == {"value": 1.02, "met": False}
    assert t["jax_over_best_torch_ge_1.5"] == {"value": 1.4, "met": False}  # against the faster PyTorch mode
    assert t["mfu_ge_0.5"] == {"value": 0.55, "met": True, "tokens_per_step": 2048, "applies": True}


# --------------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "gpt-17"], "unknown model preset 'gpt-17'"),
        (["--preset", "tiny", "--mesh", "data=3"], "needs 3 devices but 8 are available"),
        (
            ["--preset", "tiny", "--mesh", "data=4,tensor=2", "--batch-size", "6"],
            "does not divide by the data-parallel",
        ),
        (["--preset", "tiny", "--mesh", "pipeline=2"], "axis 'pipeline' is unknown"),
        (["--preset", "tiny", "--sections", "step,warp"], "unknown ['warp']"),
        (["--preset", "tiny", "--override", "num_layerz=3"], "not a model config field"),
        (["--preset", "tiny", "--seq-len", "4096"], "exceeds tiny's max_position_embeddings=512"),
    ],
)
def test_bad_requests_fail_fast_with_clear_errors(args, message, capsys, tmp_path):
    assert bench.main(args + ["--out", str(tmp_path / "x.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_too_long_a_run_says_so_before_starting(capsys, tmp_path):
    args = [
        "--preset",
        "smollm2-135m",
        "--batch-size",
        "8",
        "--seq-len",
        "1024",
        "--max-minutes",
        "1",
        "--out",
        str(tmp_path / "x.json"),
    ]
    assert bench.main(args) == 2
    err = capsys.readouterr().err
    assert "over the --max-minutes 1 limit" in err and "shrink it with" in err and "--batch-size" in err
    assert not (tmp_path / "x.json").exists()


# --------------------------------------------------------------------------------------------------------------------
# End to end on the tiny preset
# --------------------------------------------------------------------------------------------------------------------

TOP_LEVEL = {
    "schema_version",
    "meta",
    "spec",
    "model",
    "flops",
    "peak",
    "estimate_s",
    "runners",
    "ratios",
    "targets",
    "remat",
    "flags",
    "scaling",
    "memory",
    "wall_s",
    "complete",
}
RUNNER_FIELDS = {
    "name",
    "compile_s",
    "n",
    "median_s",
    "mean_s",
    "min_s",
    "max_s",
    "iqr_s",
    "spread",
    "round_medians_s",
    "tokens_per_s",
    "achieved_flops_per_s",
    "mfu",
    "framework",
    "optimizer",
}
JAX_FIELDS = {"mesh", "devices", "compiled_memory", "xla_flops_per_device", "remat", "scan_layers"}


def _tiny(tmp_path, *extra):
    out = tmp_path / "bench.json"
    # One layer keeps the many compiles of these runs to about a second each on 2 cores.
    args = [
        "--preset",
        "tiny",
        "--override",
        "num_layers=1",
        "--batch-size",
        "8",
        "--seq-len",
        "32",
        "--warmup",
        "0",
        "--rounds",
        "2",
        "--steps",
        "1",
        "--peak-sizes",
        "512",
        "--out",
        str(out),
        *extra,
    ]
    return args, out


@pytest.mark.torch
@pytest.mark.slow
def test_bench_end_to_end_emits_every_field(tmp_path, capsys):
    # --devices 1: the 8-device meshes are covered by the scaling test and by tests/test_step*.
    args, out = _tiny(tmp_path, "--sections", "step,finch,torch,remat", "--torch-modes", "eager", "--devices", "1")
    assert bench.main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result) == TOP_LEVEL and result["complete"] is True
    assert result["model"]["num_layers"] == 1 and result["meta"]["device_count"] == 8
    names = [r["name"] for r in result["runners"]]
    assert names == ["jax finch_adamw", "jax adamw", "torch eager"]
    # jax adamw is timed in phase 1 (against finch_adamw) and again as the reference of the torch phase.
    rounds = {"jax finch_adamw": 2, "jax adamw": 4, "torch eager": 2}
    for r in result["runners"]:
        assert RUNNER_FIELDS <= set(r), r["name"]
        assert r["median_s"] > 0 and r["n"] == len(r["round_medians_s"]) == rounds[r["name"]]
        # tokens/s and MFU follow from the median and the counted FLOPs
        assert r["tokens_per_s"] == pytest.approx(8 * 32 / r["median_s"])
        # MFU's basis: the higher of the matmul peak at the start and the one probed between the train steps
        basis = max(result["peak"]["peak_flops_per_s"], result["peak"]["interleaved_flops_per_s"])
        assert r["mfu"] == pytest.approx(result["flops"]["training_per_step"] / r["median_s"] / basis)
    jax_runner = result["runners"][0]
    assert JAX_FIELDS <= set(jax_runner) and jax_runner["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    # XLA's own count of the compiled step (matmuls + elementwise work) is a little above our matmul count.
    assert 1.0 < jax_runner["xla_flops_per_device"] / result["flops"]["training_per_step"] < 1.3
    assert set(result["ratios"]) == {"finch_over_adamw_step_time", "jax_over_torch_eager_tokens_per_s"}
    for v in result["ratios"].values():
        assert v["low"] <= v["high"] and len(v["round_ratios"]) == 2 and v["ratio"] > 0
    assert [r["name"] for r in result["remat"]["results"]] == [
        "remat=off scan=off",
        "remat=off scan=on",
        "remat=on scan=off",
        "remat=on scan=on",
    ]
    assert result["remat"]["fastest"] in {r["name"] for r in result["remat"]["results"]}
    assert result["model"]["params"] > 0 and result["peak"]["peak_flops_per_s"] > 1e8
    assert result["peak"]["interleaved_flops_per_s"] > 1e8
    assert result["peak"]["mfu_basis"] == (
        "interleaved"
        if result["peak"]["interleaved_flops_per_s"] > result["peak"]["peak_flops_per_s"]
        else "start of run"
    )
    assert "| jax finch_adamw |" in printed and "finch_over_adamw_step_time" in printed
    assert bench.main(["--table", str(out)]) == 0 and capsys.readouterr().out.strip() == bench.format_table(result)


@pytest.mark.slow
def test_bench_flag_sets_and_scaling_run_in_subprocesses(tmp_path):
    args, out = _tiny(
        tmp_path,
        "--sections",
        "flags,scaling",
        "--flag-sets",
        "default,no-such",
        "--scaling-devices",
        "1,2",
        "--scaling-layouts",
        "data,tensor",
    )
    # An unknown flag set name is refused up front ...
    assert bench.main(args) == 2
    args, out = _tiny(
        tmp_path,
        "--sections",
        "flags,scaling",
        "--flag-sets",
        "default,xnn-greedy",
        "--scaling-devices",
        "1,2",
        "--scaling-layouts",
        "data,tensor",
    )
    assert bench.main(args) == 0
    result = json.loads(out.read_text())
    assert result["runners"] == [] and result["remat"] is None
    runs = {r["flag_set"]: r for r in result["flags"]["results"]}
    assert set(runs) == {"default", "xnn-greedy"}
    for r in runs.values():
        assert r["median_s"] > 0 and 0 < r["mfu"] and r["xla_flags"] == bench.FLAG_SETS[r["flag_set"]]
        assert r["devices"] == 1 and r["n"] == 2
    assert result["flags"]["fastest"] in runs
    ratio = result["flags"]["ratios_to_default"]["xnn-greedy"]
    assert ratio["ratio"] == pytest.approx(runs["xnn-greedy"]["median_s"] / runs["default"]["median_s"])
    layouts = {(r["devices"], r["layout"]): r for r in result["scaling"]["results"]}
    assert set(layouts) == {(1, "single"), (2, "data"), (2, "tensor")}
    for r in layouts.values():
        assert "error" not in r and r["median_s"] > 0 and r["tokens_per_s"] > 0
    assert layouts[(2, "data")]["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
    assert layouts[(2, "tensor")]["mesh"] == {"data": 1, "fsdp": 1, "tensor": 2}

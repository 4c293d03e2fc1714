"""The ``bench`` command: bad requests refused up front, and end to end on a tiny model (in- and out-of-process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train import malloc
from train.bench.cli import main
from train.bench.profile_xla import LMHEAD, MLP, OP_CLASSES
from train.bench.report import format_table
from train.bench.spec import FLAG_SETS, MALLOCS

# --------------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "preset:gpt-17"], "unknown preset 'gpt-17'"),
        (["--preset", "gpt-17"], "unknown preset 'gpt-17'"),  # the 0.1 flag still parses, with a message
        (["--model", "preset:tiny", "--mesh", "data=3"], "needs 3 devices but 8 are available"),
        (
            ["--model", "preset:tiny", "--mesh", "data=4,tensor=2", "--batch-size", "6"],
            "does not divide by the data-parallel",
        ),
        (["--model", "preset:tiny", "--mesh", "pipeline=2"], "axis 'pipeline' is unknown"),
        (["--model", "preset:tiny", "--sections", "step,warp"], "unknown ['warp']"),
        (["--model", "preset:tiny", "--override", "num_layerz=3"], "not a model config field"),
        (["--model", "preset:tiny", "--seq-len", "4096"], "exceeds preset:tiny's max_position_embeddings=512"),
    ],
)
def test_bad_requests_fail_fast_with_clear_errors(args, message, capsys, tmp_path):
    assert main(args + ["--out", str(tmp_path / "x.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_too_long_a_run_says_so_before_starting(capsys, tmp_path):
    args = [
        "--model",
        "preset:smollm2-135m",
        "--batch-size",
        "8",
        "--seq-len",
        "1024",
        "--max-minutes",
        "1",
        "--out",
        str(tmp_path / "x.json"),
    ]
    assert main(args) == 2
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
    "peaks",
    "estimate_s",
    "runners",
    "ratios",
    "targets",
    "profile",
    "matmuls",
    "variants",
    "trees",
    "remat",
    "lora",
    "flags",
    "malloc",
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
        "--model",
        "preset:tiny",
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
        "--dtype",  # on CPU "auto" is float32,bfloat16; one dtype keeps these runs short (a later --dtype wins)
        "float32",
        "--out",
        str(out),
        *extra,
    ]
    return args, out


@pytest.mark.torch
@pytest.mark.slow
def test_bench_end_to_end_emits_every_field(tmp_path, capsys):
    # --devices 1: the 8-device meshes are covered by the scaling test and by tests/test_step*.
    args, out = _tiny(
        tmp_path,
        *("--sections", "step,finch,torch,profile,remat,lora", "--torch-modes", "eager", "--devices", "1"),
        *("--lora-rank", "4"),
    )
    assert main(args) == 0
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
    lora_base, lora = result["lora"]["results"]
    assert (lora_base["name"], lora["name"], lora["lora_rank"]) == ("base", "lora r=4", 4)
    assert result["lora"]["ratios_to_base"]["lora r=4"]["ratio"] > 0
    assert result["model"]["params"] > 0 and result["peak"]["peak_flops_per_s"] > 1e8
    assert result["peak"]["interleaved_flops_per_s"] > 1e8
    assert result["peak"]["mfu_basis"] == (
        "interleaved"
        if result["peak"]["interleaved_flops_per_s"] > result["peak"]["peak_flops_per_s"]
        else "start of run"
    )
    # MFU against the chip's published peak exists only for listed accelerators
    assert result["peak"]["spec_flops_per_s"] is None and all(r["mfu_spec"] is None for r in result["runners"])
    # the profile splits both frameworks' steps into the same classes, which add up to the profiled wall time
    profile = result["profile"]
    for side in ("jax", "torch"):
        split = profile[side]
        assert split["seconds"].keys() == set(OP_CLASSES) and split["step_s"] > 0
        assert sum(split["seconds"].values()) == pytest.approx(split["step_s"], rel=0.02)
        assert split["seconds"][MLP] > 0 and split["seconds"][LMHEAD] > 0
    assert "| MLP matmuls |" in printed and "where the step's time goes" in printed
    assert "| jax finch_adamw |" in printed and "finch_over_adamw_step_time" in printed
    assert main(["--table", str(out)]) == 0 and capsys.readouterr().out.strip() == format_table(result)


@pytest.mark.torch
def test_bench_runs_every_compute_dtype_and_times_the_models_matmuls(tmp_path, capsys):
    args, out = _tiny(
        tmp_path,
        *("--sections", "step,matmuls", "--dtype", "float32,bfloat16", "--flag-sets", "default"),
        *("--rounds", "1", "--matmul-iters", "2"),
    )
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    # the step in each dtype, against a matmul peak measured in that dtype; the second dtype's runner is tagged
    assert result["model"]["compute_dtypes"] == ["float32", "bfloat16"] and result["peak"] == result["peaks"]["float32"]
    runners = {r["name"]: r for r in result["runners"]}
    assert set(runners) == {"jax finch_adamw", "jax finch_adamw bf16"}
    bf16 = runners["jax finch_adamw bf16"]
    assert bf16["dtype"] == "bfloat16" and runners["jax finch_adamw"]["dtype"] == "float32"
    peak = result["peaks"]["bfloat16"]
    basis = max(peak["peak_flops_per_s"], peak["interleaved_flops_per_s"])
    assert bf16["mfu"] == pytest.approx(result["flops"]["training_per_step"] / bf16["median_s"] / basis)
    # each of the model's forward matmul shapes, per framework (and XLA flag set) and dtype
    matmuls = result["matmuls"]
    assert set(matmuls["gflops"]) == {"torch", "jax default"} and not matmuls["errors"]
    assert matmuls["shapes"]["MLP gate/up"] == [8 * 32, 64, 128] and matmuls["shapes"]["LM head"] == [8 * 32, 64, 512]
    for rates in matmuls["gflops"].values():
        assert set(rates) == set(matmuls["shapes"])
        assert all(rate[d] > 0 for rate in rates.values() for d in ("float32", "bfloat16"))
    assert matmuls["best_jax_flag_set"] == {"float32": "default", "bfloat16": "default"}
    assert "matmul GFLOP/s at the model's shapes" in printed and "bfloat16 matmul peak" in printed
    assert "| jax finch_adamw bf16 |" in printed


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
    assert main(args) == 2
    args, out = _tiny(
        tmp_path,
        "--sections",
        "flags,malloc,scaling",
        "--mallocs",  # one allocator besides the system's keeps this short; tcmalloc's preload: tests/test_malloc.py
        "system,jemalloc",
        "--flag-sets",
        "default,xnn-greedy",
        "--scaling-devices",
        "1,2",
        "--scaling-layouts",
        "data,tensor",
    )
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["runners"] == [] and result["remat"] is None
    runs = {r["flag_set"]: r for r in result["flags"]["results"]}
    assert set(runs) == {"default", "xnn-greedy"}
    for r in runs.values():
        assert r["median_s"] > 0 and 0 < r["mfu"] and r["xla_flags"] == FLAG_SETS[r["flag_set"]]
        assert r["devices"] == 1 and r["n"] == 2
    assert result["flags"]["fastest"] in runs
    ratio = result["flags"]["ratios_to_default"]["xnn-greedy"]
    assert ratio["ratio"] == pytest.approx(runs["xnn-greedy"]["median_s"] / runs["default"]["median_s"])
    # Every allocator is a row: timed under the allocator its worker reports, or the error that it is not installed.
    mallocs = {r["malloc"]: r for r in result["malloc"]["results"]}
    assert set(mallocs) == {"system", "jemalloc"} <= set(MALLOCS)
    for name in mallocs:
        if name == "system" or malloc.find_library(name):
            assert mallocs[name]["median_s"] > 0 and "error" not in mallocs[name]
        else:
            assert mallocs[name]["error"].startswith("not installed")
    assert set(result["malloc"]["ratios_to_system"]) == {n for n in mallocs if "median_s" in mallocs[n]} - {"system"}
    layouts = {(r["devices"], r["layout"]): r for r in result["scaling"]["results"]}
    assert set(layouts) == {(1, "single"), (2, "data"), (2, "tensor")}
    for r in layouts.values():
        assert "error" not in r and r["median_s"] > 0 and r["tokens_per_s"] > 0
    assert layouts[(2, "data")]["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
    assert layouts[(2, "tensor")]["mesh"] == {"data": 1, "fsdp": 1, "tensor": 2}


@pytest.mark.slow
def test_variants_and_trees_time_model_and_code_changes_side_by_side(tmp_path, capsys):
    repo = str(Path(__file__).resolve().parents[1])
    args, out = _tiny(
        tmp_path,
        "--sections",
        "variants,trees",
        "--variant",
        "attention_impl=blockwise",
        "--variant",
        "remat=true,remat_policy=dots",
        "--trees",
        f"{repo},{repo}",
        "--devices",
        "1",
    )
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    variants = result["variants"]
    assert [r["name"] for r in variants["results"]] == [
        "base",
        "attention_impl=blockwise",
        "remat=true,remat_policy=dots",
    ]
    assert variants["results"][2]["remat"] is True
    for name, ratio in variants["ratios_to_base"].items():
        by_name = {r["name"]: r for r in variants["results"]}
        assert ratio["ratio"] == pytest.approx(by_name[name]["median_s"] / by_name["base"]["median_s"])
    trees = result["trees"]
    assert [r["name"] for r in trees["results"]] == [repo, repo] and "error" not in trees["results"][0]
    assert "attention_impl=blockwise / base step time" in printed and "/ first tree step time" in printed


def test_bad_variants_and_trees_are_refused(tmp_path, capsys):
    for extra, message in [
        (["--sections", "variants"], "needs at least one --variant"),
        (["--sections", "variants", "--variant", "attention_impl=magic"], "attention_impl='magic' is unknown"),
        (["--sections", "trees", "--trees", "."], "two or more checkouts"),
        (["--sections", "trees", "--trees", f".,{tmp_path}"], "is not a checkout of this repository"),
    ]:
        args, out = _tiny(tmp_path, *extra)
        assert main(args) == 2
        assert message in capsys.readouterr().err

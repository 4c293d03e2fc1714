"""`finch-train compile`: the real FINCH step compiled ahead of time for TPU topologies (libtpu, no TPU needed)."""

import dataclasses
import json
import math

import jax
import pytest

from models.config import get_preset
from train import cli, compile_report, step_costs, xla_analysis
from train import compile as compile_lib
from train import mesh as mesh_lib
from train import program as program_lib
from train import topology as topology_lib
from train.config import MeshConfig, load_config

pytest.importorskip("libtpu", reason="AOT compiles for TPU need libtpu (the test extra installs it)")

TINY = ["model.source=preset:tiny", "data.seq_len=128"]


@pytest.fixture(autouse=True, scope="module")
def _no_persistent_cache_for_tpu_programs():
    # Executables compiled for a TPU topology without a TPU client cannot be read back from the persistent
    # compilation cache (conftest.py turns it on): writing them there only costs time.
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", True)


def _cfg(*overrides):
    return load_config(None, [*compile_lib.POD_DEFAULTS, *TINY, *overrides])


def test_accelerator_names_map_to_slices():
    shapes = {
        "v5e-256": "v5e:16x16",
        "v5e-16": "v5e:4x4",
        "v5p-64": "v5p:2x4x4",  # v5p and v4 names count TensorCores: 64 cores = 32 chips
        "v5p-16": "v5p:2x2x2",
        "v4-32": "v4:2x2x4",
        "v6e-16": "v6e:4x4",
        "v5e:2x2": "v5e:2x2",
    }
    for name, libtpu in shapes.items():
        assert topology_lib.parse_topology(name).libtpu_name == libtpu
    assert topology_lib.parse_topology("v5p-64", num_slices=2).num_chips == 64
    for bad, fragment in [
        ("v5e-12", "no v5e slice has 12 chips"),
        ("v9-8", "unknown TPU generation"),
        ("gpu", "not a TPU"),
    ]:
        with pytest.raises(topology_lib.TopologyError, match=fragment):
            topology_lib.parse_topology(bad)


@pytest.mark.slow
def test_tiny_finch_step_compiles_for_v5e_2x2_with_memory_flops_and_estimate(tmp_path, capsys):
    out = tmp_path / "report.json"
    code = cli.main(
        ["compile", "--topology", "v5e:2x2", "--model", "preset:tiny", "data.seq_len=128", "--out", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "FITS" in printed and "ESTIMATE" in printed
    report = json.loads(out.read_text())
    assert report["topology"] == {
        "name": "v5e:2x2",
        "libtpu": "v5e:2x2",
        "slices": 1,
        "chips": 4,
        "device_kind": "TPU v5 lite",
    }
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "slices": 1}  # the default mesh is fsdp
    assert report["optimizer"] == "finch_adamw" and report["batch"]["rows_per_chip_per_micro_batch"] == 1
    memory = report["memory_per_chip"]
    for key in ("arguments", "outputs", "aliased", "temporaries", "generated_code", "total", "hbm"):
        assert isinstance(memory[key], int) and memory[key] >= 0, key
    assert memory["hbm"] == 16 * 2**30 and memory["fits"] is True
    # the whole train state is donated: every argument byte but the batch's is aliased to an output
    assert 0 < memory["aliased"] <= memory["arguments"]
    assert memory["state"]["params"] > 0 and memory["state"]["optimizer_state"] > 2 * memory["state"]["params"] * 0.9
    assert report["flops"]["xla_flops_per_chip"] > 0 and "extrapolated" in report["flops"]["method"]
    estimate = report["estimate"]
    assert "ESTIMATE" in estimate["note"] and 0 < estimate["mfu"] < 1 and estimate["step_seconds"] > 0
    # communication: counted from the program's HLO, both bounds reported, the no-overlap one the slower
    assert "collectives per chip per step (HLO): ICI" in printed and "with none" in printed
    assert report["collectives_per_chip"]["ici_bytes"] > 0 and report["collectives_per_chip"]["dcn_bytes"] == 0
    assert estimate["step_seconds_no_overlap"] >= estimate["step_seconds"] > 0
    assert estimate["mfu_no_overlap"] <= estimate["mfu"]


@pytest.mark.slow
def test_flops_extrapolated_from_one_and_two_layers_equal_the_unrolled_count(tmp_path):
    """XLA counts a loop body once: the scanned step's FLOPs come from 1- and 2-layer compiles, and must agree."""
    # A 4-layer model known only by its config.json: compile reads the shape, never weights.
    (tmp_path / "config.json").write_text(json.dumps(get_preset("tiny", num_layers=4).to_hf_config()))
    topology = topology_lib.parse_topology("v5e:2x2")
    flops, reports = {}, {}
    for scan in ("false", "true"):
        cfg = _cfg(f"model.source=hf:{tmp_path}", "model.remat=false", f"model.scan_layers={scan}", "data.batch_size=4")
        reports[scan] = compile_lib.compile_step(cfg, topology)
        flops[scan] = reports[scan]["flops"]
    assert flops["false"]["method"] == "XLA cost analysis and HLO of the compiled step"
    assert "extrapolated to 4 layers" in flops["true"]["method"]
    assert flops["true"]["xla_flops_per_chip"] == pytest.approx(flops["false"]["xla_flops_per_chip"], rel=0.01)
    # The collectives of the same step: the scanned program's own count (its layer loop counted 4 times, read from
    # the loop's condition), the extrapolation from 1 and 2 unrolled layers, and the unrolled program's count agree.
    unrolled = reports["false"]["collectives_per_chip"]["ici_bytes"]
    assert reports["true"]["collectives_per_chip"]["loops"]["trip_counts"] == [4]
    assert reports["true"]["collectives_per_chip"]["ici_bytes"] == pytest.approx(unrolled, rel=0.05)
    assert flops["true"]["collectives_per_chip_extrapolated"]["ici_bytes"] == pytest.approx(unrolled, rel=0.05)


@pytest.mark.slow
def test_counts_extrapolated_from_shorter_sequences_are_close_to_the_direct_count():
    """Where the counting compile does not fit, its counts come from the same rows at a quarter and half the
    sequence. Here the direct count fits, to compare them."""
    topology = topology_lib.parse_topology("v5e:2x2")
    devices = topology_lib.topology_devices(topology)
    # splash, as in the pod runs: XLA cannot see into the kernel (its FLOPs are added from the model's count), so
    # what XLA counts is close to affine in the sequence; dense attention's T² terms would not extrapolate.
    splash = "model.attention_impl=splash"
    cfg = _cfg("data.seq_len=1024", "data.batch_size=4", "model.scan_layers=false", splash)  # 1 row per chip
    model_cfg = program_lib.model_config(cfg.model)
    flops, hbm_bytes = step_costs.xla_costs(step_costs.build_step(cfg, devices, model_cfg, counting=True).compiled)
    notes = set()
    extrapolated = step_costs.extrapolated_costs(cfg, devices, model_cfg, 2, notes)
    print(
        f"extrapolated / direct: FLOPs {extrapolated['flops'] / flops:.3f}, HBM bytes {extrapolated['hbm'] / hbm_bytes:.3f}"
    )
    # Measured here: FLOPs 0.924 of the direct count, HBM bytes 1.181 (0.928 and 1.016 at 3 rows per chip): XLA's
    # count is not exactly affine in the sequence; docs/scale.md quotes these for the cells counted this way.
    assert (extrapolated["flops"], extrapolated["hbm"]) == (
        pytest.approx(flops, rel=0.1),
        pytest.approx(hbm_bytes, rel=0.2),
    )
    assert notes == {"sequence extrapolated from 256 and 512 positions"}


@pytest.mark.slow
def test_max_batch_search_reports_its_answer_and_skips_the_counts_with_no_estimate(tmp_path, capsys, monkeypatch):
    out = tmp_path / "report.json"
    # The search starts at the cap (lowered from 1024, whose compile takes a minute here): the tiny model fits
    # there, so one compile answers.
    monkeypatch.setattr(compile_report, "MAX_ROWS_PER_CHIP", 16)
    args = ["compile", "--topology", "v5e:2x2", "--model", "preset:tiny", "data.seq_len=128", "--max-batch", "16"]
    assert cli.main([*args, "--no-estimate", "--out", str(out)]) == 0
    assert "largest batch that fits: 16 rows/chip = 64 rows" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["max_batch"]["rows_per_chip"] == 16 and report["max_batch"]["global_batch"] == 64
    assert list(report["max_batch"]["tried"]) == ["16"] and report["memory_per_chip"]["fits"] is True
    assert "flops" not in report and "estimate" not in report


@pytest.mark.slow
def test_per_chip_params_shrink_with_the_fsdp_width():
    topology = topology_lib.parse_topology("v5e:2x2")
    params, arguments = [], []
    for data, fsdp in [(4, 1), (2, 2), (1, 4)]:
        report = compile_lib.compile_step(
            _cfg(f"mesh.data={data}", f"mesh.fsdp={fsdp}", "data.batch_size=4"), topology, costs=False
        )
        params.append(report["memory_per_chip"]["state"]["params"])
        arguments.append(report["memory_per_chip"]["arguments"])
    assert params[0] > params[1] > params[2]
    assert arguments[0] > arguments[1] > arguments[2]
    assert params[0] / params[2] > 3  # everything but tiny vectors splits 4 ways


def test_two_slices_compile_with_data_parallelism_across_slices():
    topology = topology_lib.parse_topology("v5e:2x2", num_slices=2)
    devices = topology_lib.topology_devices(topology)
    mesh = mesh_lib.make_mesh(MeshConfig(), devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    # each fsdp group (a row of the mesh) lies inside one slice: params never cross the data-center network
    for row in mesh.devices.reshape(2, 4):
        assert len({d.slice_index for d in row}) == 1
    report = compile_lib.compile_step(_cfg("data.batch_size=8"), topology, costs=False)
    assert report["topology"]["chips"] == 8 and report["mesh"]["slices"] == 2
    assert report["memory_per_chip"]["fits"] is True and report["memory_per_chip"]["aliased"] > 0
    one_slice = compile_lib.compile_step(_cfg("data.batch_size=4"), topology_lib.parse_topology("v5e:2x2"), costs=False)
    assert report["memory_per_chip"]["state"] == one_slice["memory_per_chip"]["state"]  # per slice, as on one
    # Between the slices only the gradients travel: each chip all-reduces its shard of them with its peer in the
    # other slice, 2 x shard x (2-1)/2 = one shard, in bf16 or fp32 (XLA mixes them): between half and all of the
    # chip's fp32 params.
    params = report["memory_per_chip"]["state"]["params"]
    assert 0.5 * params <= report["collectives_per_chip"]["dcn_bytes"] <= params
    assert one_slice["collectives_per_chip"]["dcn_bytes"] == 0


def test_splash_attention_kernel_compiles_for_tpu_inside_the_train_step():
    report = compile_lib.compile_step(
        _cfg("model.attention_impl=splash", "data.batch_size=4"), topology_lib.parse_topology("v5e:2x2"), costs=False
    )
    assert report["model"]["attention_impl"] == "splash" and report["memory_per_chip"]["fits"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--topology", "v5e-12"], "no v5e slice has 12 chips"),
        (["--topology", "v5e:2x2", "mesh.fsdp=3"], "needs 3 devices, but 4"),
        (["--topology", "v5e:2x2", "mesh.data=-1", "mesh.fsdp=3"], "do not divide"),
        (["--topology", "v5e:2x2", "mesh.data=2", "mesh.fsdp=4"], "needs 8 devices"),
        (["--topology", "v5e:2x2", "data.batch_size=6"], "data.batch_size=6 does not divide"),
        (["--topology", "v5e:2x2", "--num-slices", "0"], "positive"),
    ],
)
def test_bad_topologies_meshes_and_batches_are_one_line_errors_before_compiling(args, fragment, capsys):
    assert cli.main(["compile", "--model", "preset:tiny", *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


@pytest.mark.parametrize("start", [None, 13, 40])
def test_largest_fitting_rows_takes_few_probes_and_confirms_its_answer(start):
    limit = 16 * 2**30
    probes = []

    def measure(rows):  # about linear, like XLA's temporaries, with a bend so the first prediction overshoots
        probes.append(rows)
        return int(limit * (0.1 + 0.066 * rows + 0.0004 * rows**2))

    best = compile_lib.largest_fitting(measure, limit, start=start)
    assert measure(best) <= limit < measure(best + 1)
    assert best in probes and best + 1 in probes and len(set(probes)) <= 7
    assert compile_lib.largest_fitting(lambda rows: limit + rows, limit) == 0


def test_largest_fitting_treats_a_compile_xla_refused_as_not_fitting():
    # XLA's TPU compiler refuses (RESOURCE_EXHAUSTED) a step that cannot fit: find_max_batch measures that as inf.
    probes = []

    def measure(rows):
        probes.append(rows)
        return rows * 10 if rows <= 5 else math.inf

    assert compile_lib.largest_fitting(measure, 1000) == 5
    assert 6 in probes and len(probes) <= 10


def test_roofline_never_claims_more_than_the_peak():
    # XLA's TPU count can fall below the model's FLOPs; the step time then follows the model's count at peak.
    common = dict(tokens=2048, chips=4, peak_flops=1e12, hbm_bytes_per_second=1e9, xla_hbm_bytes_per_chip=1e8)
    low = compile_lib.roofline(model_flops=8e12, xla_flops_per_chip=1e12, **common)
    assert low["compute_seconds"] == pytest.approx(2.0) and low["mfu"] == pytest.approx(1.0)
    assert low["compute_flops_source"].startswith("model")
    high = compile_lib.roofline(model_flops=8e12, xla_flops_per_chip=4e12, **common)
    assert high["compute_seconds"] == pytest.approx(4.0) and high["mfu"] == pytest.approx(0.5)
    assert high["bound"] == "compute" and high["tokens_per_second"] == pytest.approx(512)


@pytest.mark.slow
def test_collective_bytes_of_a_tiny_fsdp_step_match_the_hand_count():
    """The bytes each chip moves per step, read from the compiled TPU program, against a count by hand.

    The tiny model on v5e:2x2 with the pod defaults: fsdp over the n = 4 chips, every weight split 4 ways and cast
    to bf16 for the matmuls, full remat, 1 row of 128 tokens per chip, unrolled layers (``scan_layers=false``). A
    ring collective over n chips moves (n-1)/n of its result (all-gather) or of its input (reduce-scatter) through
    each chip, twice that for an all-reduce.

    One layer's weights in bf16: W = 2 B x (q 64·4·16 + k 64·2·16 + v 64·2·16 + o 4·16·64 + gate, up, down 3·64·128)
    = 2 x (4096 + 2048 + 2048 + 4096 + 24576) = 73,728 B; of which q, k, v: W_qkv = 16,384 B and o: W_o = 8,192 B.
    Per layer and step, each chip:

    * all-gathers W in the forward pass, and W again in the backward pass (the rematerialised forward and the
      input gradients share that gather: nothing gathered is kept between the passes), and q, k, v once more in
      the layout the input-gradient matmuls read: (2·W + W_qkv) x 3/4 = 122,880 B;
    * reduce-scatters the bf16 weight gradients, all but o's: (W - W_o) x 3/4 = 49,152 B;
    * all-reduces o's gradient: 2 x W_o x 3/4 = 12,288 B, plus the two RMSNorm weights' gradients (bf16[64] each,
      in three pieces: at most 1 KiB more).

    Once per step: the tied embedding [512, 64] is gathered in bf16 for the LM head, 65,536 x 3/4 = 49,152 B, and
    its gradient reduce-scattered in fp32, 131,072 x 3/4 = 98,304 B; the int32 tokens [4, 128] are gathered twice,
    2 x 2,048 x 3/4 = 3,072 B.

    A layer's increment is the difference of a 2-layer and a 1-layer compile (what ``compile`` extrapolates).
    """
    topology = topology_lib.parse_topology("v5e:2x2")
    devices = topology_lib.topology_devices(topology)
    cfg = _cfg("data.batch_size=4", "model.scan_layers=false")
    moved = []
    for layers in (1, 2):
        model_cfg = dataclasses.replace(program_lib.model_config(cfg.model), num_layers=layers)
        compiled = step_costs.build_step(cfg, devices, model_cfg).compiled
        moved.append(xla_analysis.collectives(compiled)["by_kind"])
    one, two = moved
    layer = {k: two.get(k, 0.0) - one.get(k, 0.0) for k in two}
    w, w_qkv, w_o = 73_728, 16_384, 8_192
    assert layer["all-gather"] == (2 * w + w_qkv) * 3 / 4 == 122_880
    assert layer["reduce-scatter"] == (w - w_o) * 3 / 4 == 49_152
    assert 2 * w_o * 3 / 4 <= layer["all-reduce"] <= 2 * (w_o + 1024) * 3 / 4
    assert one["all-gather"] == layer["all-gather"] + 65_536 * 3 / 4 + 2 * 2_048 * 3 / 4
    assert one["reduce-scatter"] == layer["reduce-scatter"] + 131_072 * 3 / 4


def test_roofline_bounds_the_step_with_and_without_overlapping_communication():
    common = dict(tokens=2048, chips=4, peak_flops=1e12, hbm_bytes_per_second=1e9, xla_hbm_bytes_per_chip=1e8)
    links = dict(ici_bytes_per_second=1e9, dcn_bytes_per_second=1e8)
    # compute 2 s, HBM 0.1 s, ICI 0.5 s, DCN 0.3 s: hidden behind the compute, or added to it
    e = compile_lib.roofline(
        model_flops=8e12, xla_flops_per_chip=1e12, ici_bytes_per_chip=5e8, dcn_bytes_per_chip=3e7, **links, **common
    )
    assert (e["ici_seconds"], e["dcn_seconds"]) == (pytest.approx(0.5), pytest.approx(0.3))
    assert e["step_seconds"] == pytest.approx(2.0) and e["bound"] == "compute" and e["mfu"] == pytest.approx(1.0)
    assert e["step_seconds_no_overlap"] == pytest.approx(2.8) and e["mfu_no_overlap"] == pytest.approx(2 / 2.8)
    assert e["step_seconds_without_communication"] == pytest.approx(2.0)
    # a step whose weights take longer to gather than to use is bound by the interconnect even when overlapped
    slow = compile_lib.roofline(model_flops=8e12, xla_flops_per_chip=1e12, ici_bytes_per_chip=5e9, **links, **common)
    assert slow["bound"] == "ICI" and slow["step_seconds"] == pytest.approx(5.0) and slow["mfu"] == pytest.approx(0.4)
    unknown = compile_lib.roofline(model_flops=8e12, xla_flops_per_chip=1e12, ici_bytes_per_chip=5e9, **common)
    assert unknown["ici_seconds"] == 0 and "ICI bandwidth unknown" in unknown["note"]


def test_roofline_counts_full_remats_rerun_forward_as_the_floor():
    # Full remat re-runs each block's forward in the backward pass: 8 of 6 model FLOPs, so MFU is at most 75%.
    common = dict(tokens=2048, chips=4, peak_flops=1e12, hbm_bytes_per_second=1e9, xla_hbm_bytes_per_chip=1e8)
    full = compile_lib.roofline(model_flops=6e12, xla_flops_per_chip=1e12, remat="full", **common)
    assert full["compute_seconds"] == pytest.approx(2.0) and full["mfu"] == pytest.approx(0.75)
    assert "remat full" in full["compute_flops_source"]
    dots = compile_lib.roofline(model_flops=6e12, xla_flops_per_chip=1e12, remat="dots", **common)
    assert dots["compute_seconds"] == pytest.approx(1.5) and dots["mfu"] == pytest.approx(1.0)
    above = compile_lib.roofline(model_flops=6e12, xla_flops_per_chip=3e12, remat="full", **common)
    assert above["compute_flops_source"] == "XLA" and above["mfu"] == pytest.approx(0.5)


def test_lora_and_qlora_steps_compile_with_adapters_only_in_the_optimizer_state():
    topology = topology_lib.parse_topology("v5e:2x2")
    full = compile_lib.compile_step(_cfg("data.batch_size=4"), topology, costs=False)
    qlora = compile_lib.compile_step(
        _cfg("data.batch_size=4", "model.lora.rank=4", "model.lora.quantize=nf4", "model.lora.block=16"),
        topology,
        costs=False,
    )
    state = qlora["memory_per_chip"]["state"]
    assert qlora["model"]["lora"]["rank"] == 4 and qlora["memory_per_chip"]["fits"]
    assert state["frozen_base"] > 0 and "frozen_base" not in full["memory_per_chip"]["state"]
    # Adam's two moments of the adapters only (rank 4 against the tiny model's width 64: about a fifth).
    assert state["optimizer_state"] < 0.25 * full["memory_per_chip"]["state"]["optimizer_state"]
    assert "LoRA rank 4 on 7 projections, base nf4" in compile_lib.format_report(qlora)


def test_gpu_names_map_to_one_node_and_bad_ones_are_refused(capsys):
    node = topology_lib.parse_gpu("h200:4")
    assert (node.platform, node.chip.name, node.num_chips) == ("gpu", "h200", 4)
    assert topology_lib.parse_gpu("H100").num_chips == 8  # one node of eight by default
    for bad, fragment in [("b200", "unknown GPU"), ("h100:9", "1 to 8"), ("a100:x", "1 to 8")]:
        with pytest.raises(topology_lib.TopologyError, match=fragment):
            topology_lib.parse_gpu(bad)
    assert cli.main(["compile", "--gpu", "h100:2", "--num-slices", "2", "--model", "preset:tiny"]) == 2
    assert "--num-slices is for TPU slices" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_step_compiles_for_two_h100s_without_a_gpu(tmp_path, capsys):
    # XLA's GPU compiler, given the H100's target description, compiles the real step on this CPU-only host.
    pytest.importorskip("jax_plugins.xla_cuda12", reason="compiling for a GPU needs JAX's CUDA plugin (gpu-compile)")
    out = tmp_path / "h100.json"
    argv = ["compile", "--gpu", "h100:2", "--model", "preset:tiny", "data.seq_len=128", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "FITS" in printed and "no estimate: XLA has no cost analysis" in printed
    report = json.loads(out.read_text())
    assert report["topology"]["chips"] == 2 and report["topology"]["device_kind"] == "H100"
    assert report["mesh"]["fsdp"] == 2 and report["memory_per_chip"]["hbm"] == 80 * 10**9
    assert 0 < report["memory_per_chip"]["total"] < 2**30
    moved = report["collectives_per_chip"]  # fsdp over the two GPUs: weights gathered, gradients scattered
    assert moved["ici_bytes"] > 0 and moved["dcn_bytes"] == 0
    assert moved["by_kind"]["all-gather"] > 0 and moved["by_kind"]["reduce-scatter"] > 0
    assert "estimate" not in report

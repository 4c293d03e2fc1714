"""`train.xla_analysis.collectives`: bytes each device moves in the collectives of an HLO module, on small
hand-written modules whose every byte is counted by hand here (no compile: milliseconds)."""

import pytest

from train import xla_analysis

# One while loop (i < 3) around an all-gather of a bf16[8,64] result over 4 devices; in the entry an all-reduce of
# f32[16] over 2 groups of 2, a reduce-scatter written as XLA's TPU compiler writes it (an all-reduce + slice fused
# as AllReduceScatterFusion) and an all-gather spread over a chain of two fusions (the same channel_id in both).
MODULE = """HloModule jit_step, num_partitions=4

%cond (p: (s32[], bf16[8,16])) -> pred[] {
  %p = (s32[], bf16[8,16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], bf16[8,16])) -> (s32[], bf16[8,16]) {
  %p = (s32[], bf16[8,16]) parameter(0)
  %x = bf16[8,16]{1,0} get-tuple-element(%p), index=1
  %ag = bf16[8,64]{1,0:T(8,128)(2,1)} all-gather(%x), channel_id=1, replica_groups=[1,4]<=[4], dimensions={1}
  ROOT %t = (s32[], bf16[8,16]) tuple(%i, %x)
}

%scatter (input: f32[64]) -> f32[16] {
  %input = f32[64]{0} parameter(0)
  %ar = f32[64]{0} all-reduce(%input), channel_id=2, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %s = f32[16]{0} dynamic-slice(%ar, %c), dynamic_slice_sizes={16}
}

%chain_a (a: bf16[4,4]) -> bf16[4,16] {
  %a = bf16[4,4]{1,0} parameter(0)
  ROOT %g = bf16[4,16]{1,0} all-gather(%a), channel_id=3, replica_groups=mesh['x'=4,'y'=1] {'x'}, dimensions={1}
}

%chain_b (a: bf16[4,4]) -> bf16[4,16] {
  %a = bf16[4,4]{1,0} parameter(0)
  ROOT %g2 = bf16[4,16]{1,0} all-gather(%a), channel_id=3, replica_groups=mesh['x'=4,'y'=1] {'x'}, dimensions={1}
}

ENTRY %main (x: f32[16]) -> f32[16] {
  %x = f32[16]{0} parameter(0)
  %w = (s32[], bf16[8,16]) while(%init), condition=%cond, body=%body
  %r = f32[16]{0} all-reduce(%x), channel_id=4, replica_groups={{0,1},{2,3}}, to_apply=%add
  %rs = f32[16]{0} fusion(%big), kind=kCustom, calls=%scatter, backend_config={"collective_algorithm_config":{"emitter":"AllReduceScatterFusion"}}
  %f1 = bf16[4,16]{1,0} fusion(%a), kind=kOutput, calls=%chain_a
  %f2 = bf16[4,16]{1,0} fusion(%a), kind=kOutput, calls=%chain_b
  %send = (f32[32]{0}, u32[], token[]) send(%x, %tok), channel_id=5, is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  ROOT %out = f32[16]{0} add(%r, %rs)
}
"""


def test_every_collective_is_counted_by_hand():
    moved = xla_analysis.collectives(MODULE, num_slices=2)
    # while (3 trips) x all-gather of bf16[8,64] = 1024 B over 4: 3/4 of it arrives from the others, 3 times
    assert moved["by_kind"]["all-gather"] == pytest.approx(3 * 1024 * 3 / 4 + 128 * 3 / 4)  # + the chain, once
    assert moved["loops"] == [{"while": "w", "in": "main", "trip_count": 3}]
    # all-reduce of f32[16] = 64 B in groups of 2: reduce-scatter + all-gather, 2 x 64 x 1/2
    assert moved["by_kind"]["all-reduce"] == pytest.approx(64)
    # AllReduceScatterFusion: a reduce-scatter of its 256-B input over 4, 3/4 of it
    assert moved["by_kind"]["reduce-scatter"] == pytest.approx(256 * 3 / 4)
    # the data-center network: all-reduce of a 128-B buffer over 2 slices, 2 x 128 x 1/2
    assert moved["dcn_bytes"] == pytest.approx(128) and moved["by_kind"]["dcn all-reduce"] == pytest.approx(128)
    assert moved["ici_bytes"] == pytest.approx(2304 + 96 + 64 + 192)
    assert moved["ops"]["all-gather"] == 2  # the loop's and the chain's (one collective in two fusions)


def test_no_hlo_text_is_no_count():
    class NoText:
        def as_text(self):
            raise NotImplementedError

    assert xla_analysis.collectives(NoText()) is None
    assert xla_analysis.collectives("HloModule m\n\nENTRY %e () -> f32[] {\n  ROOT %c = f32[] constant(0)\n}\n") == {
        "ici_bytes": 0.0,
        "dcn_bytes": 0.0,
        "by_kind": {},
        "ops": {},
        "loops": [],
        "devices_per_program": 1,
    }

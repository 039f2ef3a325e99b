"""HLO collective accounting: loops multiplied by their trip counts, async pairs once."""

from prefgrpo_jax import program_analysis as pa

HLO = """HloModule jit_f, entry_computation_layout={()->f32[]}

%layer (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]) parameter(0)
  %ag = f32[64,16]{1,0} all-gather(f32[8,16]{1,0} %x), dimensions={0}
  %ars = bf16[4,4]{1,0} all-reduce-start(bf16[4,4]{1,0} %y), to_apply=%add
  %ard = bf16[4,4]{1,0} all-reduce-done(bf16[4,4]{1,0} %ars)
  ROOT %t = (s32[], f32[8,16]) tuple(%i, %x)
}

%step (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]) parameter(0)
  %w = (s32[], f32[8,16]) while(%p), condition=%c, body=%layer, backend_config={"known_trip_count":{"n":"3"}}
  %rs = f32[2,16]{1,0} reduce-scatter(f32[16,16]{1,0} %z), dimensions={0}
  ROOT %t = (s32[], f32[8,16]) tuple(%i, %x)
}

ENTRY %main (a: f32[8,16]) -> f32[] {
  %a = f32[8,16]{1,0} parameter(0)
  %loop = (s32[], f32[8,16]) while(%init), condition=%c2, body=%step, backend_config={"known_trip_count":{"n":"5"}}
  %free = (s32[], f32[8,16]) while(%init), condition=%c3, body=%layer
  ROOT %r = f32[] constant(0)
}
"""


def test_collective_bytes_multiplies_trip_counts():
    layer = 64 * 16 * 4 + 4 * 4 * 2  # the all-gather + the async all-reduce (counted once)
    step = 3 * layer + 2 * 16 * 4
    got = pa.collective_bytes(HLO)
    # 5 steps of (3 layers + a reduce-scatter), plus one loop without a trip count (counted once).
    assert got["total"] == 5 * step + layer
    assert got["all-gather"] == (5 * 3 + 1) * 64 * 16 * 4
    assert got["reduce-scatter"] == 5 * 2 * 16 * 4
    assert got["unknown_trip_counts"] == 1


def test_collective_shapes_lists_each_instruction_once():
    assert pa.collective_shapes(HLO) == [("all-gather", [(64, 16)]), ("all-reduce", [(4, 4)]),
                                         ("reduce-scatter", [(2, 16)])]


GRAD_HLO = """HloModule jit_g, entry_computation_layout={()->f32[]}

ENTRY %main (a: f32[8,16]) -> f32[] {
  %a = f32[8,16]{1,0} parameter(0)
  %g = (f32[16,64]{1,0}, f32[7]{0}) all-reduce(%x, %y), to_apply=%add, metadata={op_name="jit(step)/transpose(jvp())/dot_general"}
  %f = f32[16,64]{1,0} all-reduce(%z), to_apply=%add, metadata={op_name="jit(step)/jvp()/dot_general"}
  ROOT %r = f32[] constant(0)
}
"""


def test_gradient_all_reduces_are_counted_apart():
    # A sharded [64, 16] weight (any dimension order): its backward all-reduce is a
    # gradient; the forward one of the same shape and the unsharded [7] are not.
    got = pa.collective_bytes(GRAD_HLO, gradient_shapes=[(64, 16)])
    assert got[pa.GRADIENT_ALL_REDUCE] == 16 * 64 * 4
    assert got["all-reduce"] == 7 * 4 + 16 * 64 * 4
    assert got["total"] == 2 * 16 * 64 * 4 + 7 * 4
    assert pa.GRADIENT_ALL_REDUCE not in pa.collective_bytes(GRAD_HLO)

"""Tensor parallelism (mesh.tensor > 1): head-grouped fused linears, the default
parameter specs, numerics against one device and the compiled sampling loop's
collectives (8 simulated devices, mesh {fsdp: 4, tensor: 2}, in subprocesses)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefgrpo_jax import lazy_tensors, sharding
from prefgrpo_jax.models import flux
from train_helpers import env

REPO = Path(__file__).resolve().parent.parent
SIZES = {"data": 1, "fsdp": 4, "tensor": 2}


def _probe(mode: str) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "tensor_probe.py"), mode],
                          env=env(devices=8), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_head_grouped_layout_gives_each_contiguous_shard_whole_heads():
    heads, d, m = 4, 3, 8  # the single block's linear1: [q | k | v | mlp] with 4 heads
    layout = flux.HeadGrouped((heads * d, heads * d, heads * d, m), heads)
    # Column j of the contiguous layout labelled by (part, head): parts 0-2 are q, k, v.
    labels = np.concatenate([np.repeat(np.arange(heads), n // heads) + 10 * part
                             for part, n in enumerate(layout.sizes)])
    stored = layout.from_contiguous(labels[None], -1)[0]
    for tensor in (2, 4):  # every divisor of the head count
        for shard in np.split(stored, tensor):
            own = set(range(heads))
            own = {h for h in own if any(x % 10 == h for x in shard)}
            assert len(own) == heads // tensor
            # The shard holds all of q, k, v and the MLP slice of exactly its own heads.
            assert sorted(shard) == sorted(x for x in labels if x % 10 in own)
    np.testing.assert_array_equal(layout.to_contiguous(stored[None], -1)[0], labels)
    # The reshape-based grouping of separate parts (the model's LoRA deltas) is the same permutation,
    # and the lazy loader's slicing gives it too.
    parts = np.split(labels.astype(np.float32), np.cumsum(layout.sizes)[:-1])
    np.testing.assert_array_equal(np.asarray(layout.group([jnp.asarray(p) for p in parts])), stored)
    lazy = layout.from_contiguous(lazy_tensors.as_lazy(labels[None]), -1, lazy_tensors.concatenate)
    np.testing.assert_array_equal(np.asarray(lazy)[0], stored)


def test_fused_layouts_name_real_parameters_with_the_right_widths():
    cfg = flux.FluxConfig.tiny(hidden_size=128, num_heads=4, axes_dim=(8, 12, 12))
    _, params = nnx.split(flux.abstract_transformer(cfg))
    shapes = {".".join(map(str, path)): var.get_value().shape for path, var in nnx.to_flat_state(params)}
    for key, (layout, axis) in flux.fused_layouts(cfg).items():
        assert shapes[key][axis] == sum(layout.sizes), key


@pytest.mark.parametrize("path, shape, spec", [
    ("double_blocks/img_attn/qkv/kernel/value", (19, 3072, 9216), (None, "fsdp", "tensor")),
    ("double_blocks/txt_attn/qkv/bias", (19, 9216), (None, "tensor")),
    ("double_blocks/img_mlp/0/kernel", (19, 3072, 12288), (None, "fsdp", "tensor")),
    ("double_blocks/txt_attn/proj/kernel", (19, 3072, 3072), (None, "tensor", "fsdp")),
    ("double_blocks/img_mlp/2/kernel", (19, 12288, 3072), (None, "tensor", "fsdp")),
    ("single_blocks/linear1/kernel", (38, 3072, 21504), (None, "fsdp", "tensor")),
    ("single_blocks/linear2/kernel", (38, 15360, 3072), (None, "tensor", "fsdp")),
    # Adam's moments carry their parameter's path.
    ("opt_state/inner_state/1/0/mu/single_blocks/linear2/kernel/value", (38, 15360, 3072),
     (None, "tensor", "fsdp")),
    # A row-parallel bias is added after the sum: FSDP as any other tensor, over fsdp x tensor.
    ("single_blocks/linear2/bias", (38, 3072), (None, ("fsdp", "tensor"))),
    ("double_blocks/img_mod/lin/kernel", (19, 3072, 18432), (None, None, ("fsdp", "tensor"))),
    # No dimension divisible by fsdp x tensor = 8: over fsdp alone.
    ("txt_in/kernel", (4, 3076), (None, "fsdp")),
])
def test_default_tensor_parallel_specs(path, shape, spec):
    assert tuple(sharding.partition_spec(path, shape, SIZES, min_size=1)) == spec
    # Without a tensor axis: FSDP by size, as before.
    no_tensor = dict(SIZES, tensor=1)
    assert "tensor" not in str(sharding.partition_spec(path, shape, no_tensor, min_size=1))


def test_user_rules_still_win_over_tensor_parallel_specs():
    rules = [(r"single_blocks/linear1/kernel", (None, None, "fsdp"))]
    spec = sharding.partition_spec("single_blocks/linear1/kernel", (38, 3072, 21504), SIZES, min_size=1,
                                   rules=rules)
    assert tuple(spec) == (None, None, "fsdp")


def test_tensor_size_that_splits_heads_is_an_error_naming_mesh_tensor():
    cfg = flux.FluxConfig.tiny(hidden_size=96, num_heads=3, axes_dim=(8, 12, 12))
    model = flux.FluxTransformer(cfg, rngs=nnx.Rngs(0))
    devices = jax.devices()[:1] * 2  # only the mesh's shape is read at trace time
    mesh = jax.sharding.Mesh(np.asarray(devices, dtype=object).reshape(1, 1, 2), sharding.MESH_AXES)
    b, length, txt = 2, 4, 3
    with sharding.activation_sharding(mesh), pytest.raises(ValueError, match=r"mesh.tensor=2 .* num_heads=3"):
        jax.eval_shape(lambda: model(
            jnp.zeros((b, length, cfg.in_channels)), jnp.zeros((b, length, 3)), jnp.zeros((b, txt, cfg.context_dim)),
            jnp.zeros((b, txt, 3)), jnp.zeros((b,)), jnp.zeros((b, cfg.vec_dim)), jnp.zeros((b,))))


# Compiles the sampler and a GRPO train step twice (one device, then the 8-device
# mesh): 2-4 minutes on the 2 shared cores under load, so marked slow.
@pytest.mark.slow
def test_tensor_parallel_mesh_matches_one_device():
    """LoRA on every target (B nonzero) over a base trained whole: forward,
    3-step trajectory and one train step, fp32, one device vs {fsdp: 4, tensor: 2}."""
    r = _probe("numerics")
    specs = r["specs"]
    assert specs["double_blocks/img_attn/qkv/kernel/value"] == "P(None, 'fsdp', 'tensor')"
    assert specs["single_blocks/linear2/kernel/value"] == "P(None, 'tensor', 'fsdp')"
    # Only the order of fp32 sums differs (all-reduces over "tensor"): |v| ~ 6, measured 3e-6.
    assert r["velocity_max_abs_diff"] <= 2e-5 * max(1.0, r["velocity_max_abs"])
    assert r["latents_max_abs_diff"] <= 2e-5  # measured 3e-6
    assert r["log_probs_max_abs_diff"] <= 1e-5  # measured 5e-7
    (loss_1, loss_tp), (norm_1, norm_tp) = r["loss"], r["grad_norm"]
    assert loss_1 != 0 and norm_1 > 0
    assert abs(loss_tp - loss_1) <= 1e-5 * abs(loss_1)  # measured equal
    assert abs(norm_tp - norm_1) <= 1e-5 * norm_1  # measured 1e-7 relative


def test_tensor_parallel_sampling_loop_gathers_weight_shards_and_sums_activations():
    """The compiled sampling loop on {fsdp: 4, tensor: 2}: tensor-parallel weights are
    gathered over "fsdp" only (each device its tensor shard; the others come whole),
    token activations never move except the row-parallel sums over "tensor"
    (all-reduces of [rows, L, hidden])."""
    r = _probe("hlo")
    gathered = {tuple(s) for s in r["fsdp_gathered_weights"]}
    lengths = set(r["lengths"])
    tokens = {tuple(s) for s in r["token_activations"]}
    gathers = [tuple(s) for op, shapes in r["collectives"] if op == "all-gather" for s in shapes]
    whole = {tuple(s) for s in r["whole_weights"]}
    # The tensor-split weights' shards are gathered (e.g. a qkv layer's [128, 384 / 2]) ...
    assert (gathered - whole) & set(gathers)
    # ... and never the whole weights (no qkv layer [128, 384]).
    assert whole - gathered and not (whole - gathered) & set(gathers)
    moved = [(op, tuple(s)) for op, shapes in r["collectives"] for s in shapes
             if len(s) >= 2 and lengths & set(s) and not (op == "all-reduce" and tuple(s) in tokens)]
    assert not moved, moved
    summed = {tuple(s) for op, shapes in r["collectives"] if op == "all-reduce" for s in shapes}
    assert tokens <= summed  # img and txt streams (double blocks), the joint sequence (single blocks)

"""Mesh sizing, the per-tensor sharding rules, and batch placement helpers."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from prefgrpo_jax import sharding

SIZES = {"data": 2, "fsdp": 4, "tensor": 2}


def test_mesh_shape_resolves_minus_one_and_names_errors():
    assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 1}, 8) == (2, 4, 1)
    assert sharding.mesh_shape({"data": 1, "fsdp": 1, "tensor": 1}, 1) == (1, 1, 1)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="needs 6 devices, but 8 are available"):
        sharding.mesh_shape({"data": 3, "fsdp": 2, "tensor": 1}, 8)


def test_fsdp_by_size_splits_largest_divisible_dimension():
    assert sharding.fsdp_spec((3, 4096, 12288), 4, 2**14) == P(None, None, "fsdp")
    assert sharding.fsdp_spec((3, 4098, 30), 4, 16) == P()  # no dimension divisible by 4
    assert sharding.fsdp_spec((64,), 4, 2**14) == P()  # small: replicated
    assert sharding.fsdp_spec((5, 7), 4, 1) == P()  # nothing divisible


def test_rules_override_fsdp_and_are_checked():
    rules = [(r"single_blocks/linear1/kernel$", (None, "fsdp", "tensor"))]
    spec = sharding.partition_spec("single_blocks/linear1/kernel", (38, 3072, 21504), SIZES, min_size=1, rules=rules)
    assert spec == P(None, "fsdp", "tensor")
    # Adam moments carry the parameter's path inside theirs: the same rule applies.
    moment = "opt_state/inner_state/1/0/mu/single_blocks/linear1/kernel"
    assert sharding.partition_spec(moment, (38, 3072, 21504), SIZES, min_size=1, rules=rules) == spec
    # Unnamed tensors fall back to FSDP-by-size (over fsdp x tensor: this mesh has tensor = 2).
    assert sharding.partition_spec("img_in/kernel", (64, 3072), SIZES, min_size=1, rules=rules) == P(
        None, ("fsdp", "tensor"))
    with pytest.raises(ValueError, match="one entry per dimension"):
        sharding.partition_spec("single_blocks/linear1/kernel", (3072, 21504), SIZES, min_size=1, rules=rules)
    with pytest.raises(ValueError, match="does not divide 21505"):
        sharding.partition_spec("single_blocks/linear1/kernel", (38, 3072, 21505), SIZES, min_size=1, rules=rules)


def test_group_broadcast_repeats_each_prompt_row_on_device():
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    cond = {"txt": jnp.arange(3 * 4 * 2, dtype=jnp.float32).reshape(3, 4, 2), "y": jnp.arange(3.0)}
    out = sharding.make_group_broadcast(mesh, 4)(cond)
    for name, a in cond.items():
        np.testing.assert_array_equal(np.asarray(out[name]), np.repeat(np.asarray(a), 4, axis=0))
        assert out[name].sharding == sharding.batch_sharding(mesh)

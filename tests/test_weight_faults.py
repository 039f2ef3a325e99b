"""Weights files that are truncated or hold NaN/Inf are refused, naming file and tensor."""

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from prefgrpo_jax import convert


def write(path, **tensors):
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_non_finite_tensor_is_named(tmp_path, dtype):
    bad = np.ones((3, 4), dtype)
    bad[1, 2] = np.nan
    bad[0, 0] = np.inf
    path = write(tmp_path / "model.safetensors", good=np.ones((2,), dtype), ids=np.arange(3),
                 **{"blocks.0.attn.qkv.weight": bad})
    with pytest.raises(convert.WeightFileError) as err:
        convert.read_safetensors(tmp_path)
    msg = str(err.value)
    assert str(path) in msg and "blocks.0.attn.qkv.weight (3, 4): 2 non-finite value(s) of 12" in msg
    assert "good" not in msg.split("\n", 1)[1]


def test_truncated_file_error_names_the_file(tmp_path):
    path = write(tmp_path / "diffusion_pytorch_model.safetensors", w=np.ones((256, 256), np.float32))
    path.write_bytes(path.read_bytes()[: 1000])  # a download cut short
    with pytest.raises(convert.WeightFileError, match=rf"cannot read weights file {path}: .*truncated or corrupt"):
        convert.read_safetensors(tmp_path)


def test_sharded_checkpoint_shards_are_checked(tmp_path):
    import json

    write(tmp_path / "a.safetensors", x=np.ones((2,), np.float32))
    write(tmp_path / "b.safetensors", y=np.array([0.0, -np.inf], np.float32))
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}))
    with pytest.raises(convert.WeightFileError, match=r"b.safetensors holds non-finite tensors.*\n  y \(2,\): 1 non-finite"):
        convert.read_safetensors(tmp_path)


def test_finite_weights_load(tmp_path):
    write(tmp_path / "model.safetensors", w=np.ones((2, 2), ml_dtypes.bfloat16), ids=np.arange(3))
    out = convert.read_safetensors(tmp_path)
    assert set(out) == {"w", "ids"}

"""Lazy safetensors views: every box equals NumPy's on the materialised array."""

import itertools

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from prefgrpo_jax import lazy_tensors as lt


def _boxes(shape):
    """A few boxes per dimension (empty, full, interior, edges), all combinations."""
    per_dim = []
    for n in shape:
        per_dim.append([slice(None), slice(0, 1), slice(1, n - 1), slice(n - 2, n), slice(2, 2)])
    return list(itertools.product(*per_dim))


@pytest.fixture
def file_tensors(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "a": rng.normal(size=(6, 5)).astype(np.float32),
        "b": rng.normal(size=(6, 5)).astype(np.float32),
        "c": rng.normal(size=(4, 5)).astype(np.float32),
        "conv": rng.normal(size=(3, 4, 3, 3)).astype(np.float32),
    }
    path = tmp_path / "w.safetensors"
    save_file(arrays, str(path))
    return lt.SafetensorsFile(path).tensors, arrays


def test_file_tensor_boxes(file_tensors):
    lazy, arrays = file_tensors
    for name, array in arrays.items():
        assert lazy[name].shape == array.shape
        for box in _boxes(array.shape):
            np.testing.assert_array_equal(lazy[name].read(box), array[box])


def test_views_equal_numpy(file_tensors):
    lazy, arr = file_tensors
    cases = {
        "transpose": (lt.transpose(lazy["a"], (1, 0)), arr["a"].T),
        "conv transpose": (lt.transpose(lazy["conv"], (2, 3, 1, 0)), arr["conv"].transpose(2, 3, 1, 0)),
        "concat rows": (lt.concatenate([lazy["a"], lazy["c"]], axis=0), np.concatenate([arr["a"], arr["c"]])),
        "concat cols of T": (lt.concatenate([lazy["a"].T, lazy["b"].T, lazy["c"].T], axis=-1),
                             np.concatenate([arr["a"].T, arr["b"].T, arr["c"].T], axis=-1)),
        "stack": (lt.stack([lazy["a"], lazy["b"]]), np.stack([arr["a"], arr["b"]])),
        "swap halves": (lt.concatenate([lazy["a"][3:], lazy["a"][:3]]), np.concatenate([arr["a"][3:], arr["a"][:3]])),
        "stack of T": (lt.stack([lazy["a"].T, lazy["b"].T]), np.stack([arr["a"].T, arr["b"].T])),
    }
    for name, (view, want) in cases.items():
        assert view.shape == want.shape, name
        np.testing.assert_array_equal(np.asarray(view), want, err_msg=name)
        for box in _boxes(want.shape):
            np.testing.assert_array_equal(view.read(box), want[box], err_msg=f"{name} {box}")


def test_bf16_is_read(tmp_path):
    """safetensors' NumPy loader cannot read bf16; FLUX.1-dev ships bf16."""
    import json
    import struct

    values = np.arange(12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [3, 4], "data_offsets": [0, values.nbytes]}}).encode()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + values.tobytes())
    tensor = lt.SafetensorsFile(path).tensors["w"]
    assert tensor.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(tensor.read((slice(1, 3), slice(0, 2))), values[1:3, 0:2])


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": np.ones((64, 64), np.float32)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(lt.WeightFileError, match=r"cannot read weights file .*w\.safetensors: its header needs"):
        lt.SafetensorsFile(path)
    path.write_bytes(b"\x05\x00")
    with pytest.raises(lt.WeightFileError, match=r"w\.safetensors: .*truncated or corrupt"):
        lt.SafetensorsFile(path)


def test_non_finite_box_is_refused_naming_file_and_tensor(tmp_path):
    w = np.ones((4, 4), np.float32)
    w[3, 1] = np.nan
    path = tmp_path / "w.safetensors"
    save_file({"w": w}, str(path))
    tensor = lt.SafetensorsFile(path).tensors["w"]
    np.testing.assert_array_equal(tensor.read((slice(0, 2),)), w[:2])  # a clean slice reads
    with pytest.raises(lt.WeightFileError, match=r"w\.safetensors holds non-finite.*\n  w \(2, 4\): 1 non-finite.*slice"):
        lt.transpose(tensor, (1, 0)).read((slice(None), slice(2, 4)))


def test_bad_shapes_rejected(file_tensors):
    lazy, _ = file_tensors
    with pytest.raises(ValueError, match="cannot concatenate"):
        lt.concatenate([lazy["a"], lazy["c"]], axis=1)
    with pytest.raises(ValueError, match="cannot stack"):
        lt.stack([lazy["a"], lazy["c"]])
    with pytest.raises(ValueError, match="step-1"):
        lazy["a"].read((slice(0, 6, 2),))

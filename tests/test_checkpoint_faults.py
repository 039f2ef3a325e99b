"""Resume falls back from an unreadable latest checkpoint to the newest readable one."""

import json
import logging
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from prefgrpo_jax.checkpoint import Checkpointer, CheckpointFormatError, CheckpointUnreadableError


def state_at(step):
    return {"params": {"w": jnp.full((4096,), float(step), jnp.float32)}, "count": jnp.asarray(step)}


@pytest.fixture
def three_checkpoints(tmp_path):
    ck = Checkpointer(tmp_path / "checkpoints", keep=5, save_every=1)
    for step in (1, 2, 3):
        ck.save(step, state_at(step), {"seed": 0, "step": step})
    ck.close()
    return tmp_path / "checkpoints"


def biggest_file(directory):
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


CORRUPTIONS = {
    "truncated data file": lambda d: biggest_file(d / "state").write_bytes(biggest_file(d / "state").read_bytes()[:100]),
    "missing manifest": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "missing state": lambda d: shutil.rmtree(d / "state"),
    "garbled meta": lambda d: (d / "meta" / "metadata").write_text("{not json"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_unreadable_latest_falls_back_with_a_warning(three_checkpoints, corruption, caplog):
    CORRUPTIONS[corruption](three_checkpoints / "3")
    ck = Checkpointer(three_checkpoints, keep=5, save_every=1)
    with caplog.at_level(logging.WARNING):
        step, state, meta = ck.restore_newest_readable(state_at(0), set_aside=True)
    assert step == 2 and meta["step"] == 2
    np.testing.assert_array_equal(state["params"]["w"], np.full((4096,), 2.0))
    text = "\n".join(caplog.messages)
    assert f"checkpoint 3 in {three_checkpoints} is unreadable" in text
    assert "resuming from checkpoint 2" in text
    # Set aside, so the resumed run can write step 3 again.
    assert 3 not in ck._manager.all_steps()
    assert [p.name.split(".")[0] for p in (three_checkpoints.parent / "checkpoints_unreadable").iterdir()] == ["3"]
    assert ck.save(3, state_at(3), {"seed": 0, "step": 3})
    ck.close()


def test_all_unreadable_lists_every_failure(three_checkpoints):
    for step in (1, 2, 3):
        shutil.rmtree(three_checkpoints / str(step) / "state")
    ck = Checkpointer(three_checkpoints, keep=5, save_every=1)
    with pytest.raises(CheckpointUnreadableError) as err:
        ck.restore_newest_readable(state_at(0))
    msg = str(err.value)
    assert all(f"step {s} ({three_checkpoints / str(s)})" in msg for s in (1, 2, 3))
    assert "move the directory aside" in msg
    ck.close()


def test_a_checkpoint_of_the_old_layout_is_refused_not_skipped(three_checkpoints):
    """Checkpoints written before FLUX's fused kernels were head-grouped have the same
    shapes: they must not restore (permuted weights) nor be set aside as unreadable."""
    meta_file = three_checkpoints / "3" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    assert meta["format"] == 2
    del meta["format"]  # as an earlier version wrote it
    meta_file.write_text(json.dumps(meta))
    ck = Checkpointer(three_checkpoints, keep=5, save_every=1)
    with pytest.raises(CheckpointFormatError, match=r"checkpoint .*/3 is in format 1, this version reads format 2"):
        ck.restore_newest_readable(state_at(0), set_aside=True)
    assert 3 in ck._manager.all_steps()  # left where it was
    assert ck.restore(state_at(0), 2)[1]["step"] == 2
    ck.close()
    ck = Checkpointer(three_checkpoints, keep=5, save_every=1)  # as sample/eval open it
    with pytest.raises(CheckpointFormatError):
        ck.restore_params_newest_readable(state_at(0)["params"])
    ck.close()


def test_no_checkpoint_is_none(tmp_path):
    ck = Checkpointer(tmp_path / "empty", keep=2, save_every=1)
    assert ck.restore_newest_readable(state_at(0)) is None
    ck.close()


def test_sample_and_eval_load_the_newest_readable_checkpoint(tiny_flux_dir, tmp_path, caplog):
    import jax
    from flax import nnx

    from prefgrpo_jax import config as config_lib, grpo, state as state_lib
    from prefgrpo_jax.state import load_pipeline
    from prefgrpo_jax.train import build_optimizer
    from test_train import load_tiny_config

    config = load_tiny_config()
    config.model.path = str(tiny_flux_dir)
    _, params = nnx.split(load_pipeline(config).transformer)
    params = jax.tree.map(lambda a: a.astype(np.float32), params)
    ck = Checkpointer(tmp_path / "checkpoints", keep=3, save_every=1)
    for step in (1, 2):  # params shifted by the step: the restored one is recognisable
        shifted = jax.tree.map(lambda a: a + step, params)
        ck.save(step, grpo.init_train_state(shifted, build_optimizer(config)), {"step": step, "seed": 0})
    ck.close()
    biggest_file(tmp_path / "checkpoints" / "2" / "state").write_bytes(b"\0" * 10)
    with caplog.at_level(logging.WARNING):
        pipe, step = state_lib.load_trained_pipeline(config_lib.RunConfig.from_dict(config), tmp_path)  # what --mode=sample and eval call
    assert step == 1
    restored = jax.tree.leaves(nnx.split(pipe.transformer)[1])[0]
    np.testing.assert_allclose(np.asarray(restored), np.asarray(jax.tree.leaves(params)[0]) + 1)
    assert any("checkpoint 2 in" in m and "unreadable" in m for m in caplog.messages)
    assert (tmp_path / "checkpoints" / "2").is_dir()  # sampling never moves anything

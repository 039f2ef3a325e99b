"""One run per workdir: a live owner refuses, a dead one's lock is taken over."""

import errno
import logging
import signal
import subprocess
import sys
import textwrap

import pytest

from prefgrpo_jax import train, workdir_lock
from prefgrpo_jax.workdir_lock import WorkdirBusyError, WorkdirLock
from train_helpers import REPO, env

HOLD = textwrap.dedent("""
    import sys, time
    from prefgrpo_jax.workdir_lock import WorkdirLock
    WorkdirLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(120)
""")
TRY = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.WARNING)
    from prefgrpo_jax.workdir_lock import WorkdirLock
    WorkdirLock(sys.argv[1]).acquire().release()
    print("acquired", flush=True)
""")


def start_holder(workdir):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=REPO, env=env(),
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_second_process_is_refused_then_takes_over_after_the_owner_dies(tmp_path):
    holder = start_holder(tmp_path)
    try:
        second = subprocess.run([sys.executable, "-c", TRY, str(tmp_path)], cwd=REPO, env=env(),
                                capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert f"workdir {tmp_path} is in use by pid {holder.pid} on host" in second.stderr
        assert "give this run another --workdir" in second.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    third = subprocess.run([sys.executable, "-c", TRY, str(tmp_path)], cwd=REPO, env=env(),
                           capture_output=True, text=True, timeout=60)
    assert third.returncode == 0 and "acquired" in third.stdout, third.stderr
    assert f"taking over the lock of pid {holder.pid}" in third.stderr


def test_clean_release_leaves_no_stale_owner(tmp_path, caplog):
    with WorkdirLock(tmp_path):
        with pytest.raises(WorkdirBusyError, match=r"in use by pid \d+"):
            WorkdirLock(tmp_path).acquire()
    with caplog.at_level(logging.WARNING):
        WorkdirLock(tmp_path).acquire().release()
    assert not any("taking over" in m for m in caplog.messages)


def _no_model_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the workdir was checked")


def test_train_checks_workdir_lock_and_writability_before_loading(tmp_path, monkeypatch):
    import prefgrpo_jax.toyworld.reward  # noqa: F401 (registers the verifier rewards)
    from test_train import load_tiny_config

    from prefgrpo_jax import state as state_lib

    monkeypatch.setattr(state_lib, "load_pipeline", _no_model_load)
    config = load_tiny_config()
    (tmp_path / "busy").mkdir()
    holder = start_holder(tmp_path / "busy")
    try:
        with pytest.raises(WorkdirBusyError, match=f"in use by pid {holder.pid}"):
            train.Trainer(config, tmp_path / "busy")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()

    def read_only(self, data):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(workdir_lock.Path, "write_bytes", read_only)
    with pytest.raises(PermissionError, match=r"--workdir='.*ro' is not writable \(Read-only file system\)"):
        train.Trainer(config, tmp_path / "ro")

"""Metrics and TensorBoard logs across crashes: torn lines, atomic rewrites, no duplicate steps."""

import json
import logging
import os

import pytest

from prefgrpo_jax import train_logging
from prefgrpo_jax.train_logging import MetricsLogger, read_metrics, tensorboard_steps


def rows_text(steps):
    return "".join(json.dumps({"step": s, "loss": 0.1 * s}) + "\n" for s in steps)


def test_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(rows_text([1, 2, 3]) + '{"step": 4, "lo')  # a disk-full mid-write
    with caplog.at_level(logging.WARNING):
        logger = MetricsLogger(tmp_path, truncate_after=0 + 10)
    logger.write(4, {"loss": 0.4})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert any(str(path) in m and "line 4" in m for m in caplog.messages)


def test_torn_line_with_no_checkpoint_does_not_block_a_fresh_start(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss"')
    MetricsLogger(tmp_path, truncate_after=0).close()
    assert read_metrics(tmp_path) == []


def test_damage_before_the_last_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(rows_text([1]) + "garbage\n" + rows_text([2]))
    with pytest.raises(ValueError, match=rf"{path}:2: not a metrics row .* move it aside"):
        MetricsLogger(tmp_path, truncate_after=5)


def test_rewrite_is_atomic_when_killed_midway(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    before = rows_text([1, 2, 3, 4])
    path.write_text(before)

    def killed(fd):
        raise SystemExit("killed during the rewrite")

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(SystemExit):
        MetricsLogger(tmp_path, truncate_after=2)
    assert path.read_text() == before  # the old file is whole, not 0 bytes
    monkeypatch.undo()
    MetricsLogger(tmp_path, truncate_after=2).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_tensorboard_has_no_duplicate_steps_after_resume(tmp_path):
    first = MetricsLogger(tmp_path, truncate_after=0)
    for s in (1, 2, 3, 4):
        first.write(s, {"loss": 0.1 * s, "reward_mean": 0.5})
    first.close()
    # Torn record at the end of the dead run's event file, as a kill leaves it.
    events = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    with open(events[-1], "ab") as f:
        f.write(b"\x20\x00\x00")
    resumed = MetricsLogger(tmp_path, truncate_after=2)  # the checkpoint was at step 2
    for s in (3, 4, 5):
        resumed.write(s, {"loss": 0.1 * s, "reward_mean": 0.5})
    resumed.close()
    steps = tensorboard_steps(tmp_path / "tensorboard")
    assert steps == {"loss": [1, 2, 3, 4, 5], "reward_mean": [1, 2, 3, 4, 5]}
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_event_reader_stops_at_corruption(tmp_path):
    logger = MetricsLogger(tmp_path, truncate_after=0)
    logger.write(1, {"loss": 1.0})
    logger.close()
    path = next((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    records = train_logging.read_event_records(path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip a byte of the last record's CRC
    path.write_bytes(bytes(raw))
    assert train_logging.read_event_records(path) == records[:-1]


def test_a_rewrite_left_behind_by_a_kill_is_never_read_as_a_log(tmp_path, monkeypatch):
    logger = MetricsLogger(tmp_path, truncate_after=0)
    for s in (1, 2, 3):
        logger.write(s, {"loss": 1.0})
    logger.close()
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(SystemExit("killed")))
    with pytest.raises(SystemExit):
        MetricsLogger(tmp_path, truncate_after=1)
    monkeypatch.undo()
    leftovers = [p.name for p in tmp_path.rglob("*") if p.is_file() and "tmp" in p.name]
    assert leftovers and not any("tfevents" in n or n.startswith("metrics") for n in leftovers)
    MetricsLogger(tmp_path, truncate_after=1).close()
    assert tensorboard_steps(tmp_path / "tensorboard") == {"loss": [1]}


def test_events_are_on_disk_when_write_returns(tmp_path):
    """A kill right after a checkpoint (saved after the step's log) must not lose the
    step's events: they are written synchronously, not queued to a thread."""
    logger = MetricsLogger(tmp_path, truncate_after=0)
    for s in range(1, 21):
        logger.write(s, {"loss": float(s), "reward_mean": 0.5, "bad": float("nan")})
        assert tensorboard_steps(tmp_path / "tensorboard") == {"loss": list(range(1, s + 1)),
                                                               "reward_mean": list(range(1, s + 1))}
    logger.close()

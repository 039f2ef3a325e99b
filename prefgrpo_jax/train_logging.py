"""Metrics as JSON lines + TensorBoard events, and captioned image grids.

Both logs survive a run killed at any instant: a torn last JSON line (a kill or
a full disk mid-write) is dropped with a warning on resume, and every rewrite
goes to a temporary file that replaces the original in one ``os.replace``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)


def replace_atomically(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so a reader (or a kill) sees the old or the
    new content, never a mix or an empty file.

    The temporary name matches neither ``metrics.jsonl`` nor TensorBoard's
    ``*tfevents*``, so one left by a kill is never read as a log; the next
    rewrite in that directory (one writer: the workdir lock) reuses it."""
    tmp = path.parent / ".rewrite.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parse_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``; a torn last line is dropped with a warning.

    Raises:
      ValueError naming the file and line when a line before the last is not
      JSON (that is not a torn write but a damaged file).
    """
    lines = path.read_text(errors="replace").splitlines()
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    rows = []
    for k, (number, line) in enumerate(numbered):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except ValueError as err:
            if k == len(numbered) - 1:
                log.warning("%s: dropping its last row (line %d), torn by an interrupted write: %.80r",
                            path, number, line)
                break
            raise ValueError(f"{path}:{number}: not a metrics row ({err}); the file is damaged "
                             "before its last line: move it aside to resume without it") from None
        rows.append(row)
    return rows


class MetricsLogger:
    """Appends one JSON object per step to ``workdir/metrics.jsonl`` and to TensorBoard.

    On resume (``truncate_after=k``) rows of steps > k, written after the last
    checkpoint by a run that then died, are dropped from the JSON lines and the
    TensorBoard event files, so every step appears once in each.
    """

    def __init__(self, workdir: Path, *, enabled: bool = True, truncate_after: int | None = None):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._writer = None
        if not enabled:
            return
        if truncate_after is not None and self.path.exists():
            kept = [row for row in parse_metrics(self.path) if row["step"] <= truncate_after]
            replace_atomically(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())
        if truncate_after is not None:
            truncate_tensorboard(Path(workdir) / "tensorboard", truncate_after)
        self._writer = EventFile(Path(workdir) / "tensorboard")
        self._file = self.path.open("a")

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: v for k, v in metrics.items() if k != "step"}}
        self._file.write(json.dumps(row, sort_keys=True) + "\n")
        self._file.flush()
        self._writer.add_scalars(step, {
            k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)
        })

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._writer.close()


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    return parse_metrics(Path(workdir) / "metrics.jsonl")


# TFRecord framing of TensorBoard event files: length (u64), masked CRC of the
# length (u32), the serialized Event, masked CRC of the data (u32).
_LEN, _CRC = struct.Struct("<Q"), struct.Struct("<I")


def _frame(data: bytes) -> bytes:
    from tensorboardX.record_writer import masked_crc32c

    header = _LEN.pack(len(data))
    return header + _CRC.pack(masked_crc32c(header)) + data + _CRC.pack(masked_crc32c(data))


class EventFile:
    """A TensorBoard event file written synchronously: ``add_scalars`` returns once
    the step's record is in the OS, so a checkpoint saved after it never runs
    ahead of the events (tensorboardX's ``SummaryWriter`` queues them to a thread
    whose ``flush`` does not wait for the queue, and a kill loses them)."""

    def __init__(self, directory: Path):
        from tensorboardX.proto.event_pb2 import Event

        directory.mkdir(parents=True, exist_ok=True)
        # Whole seconds alone (TensorBoard's convention) could name a restart's
        # file like the previous run's; pid and nanoseconds keep them apart.
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.{time.time_ns()}"
        self._file = open(directory / name, "ab")
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event) -> None:
        self._file.write(_frame(event.SerializeToString()))
        self._file.flush()

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """One event holding every scalar of ``step``."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
        self._write(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))

    def close(self) -> None:
        self._file.close()


def read_event_records(path: Path) -> list[bytes]:
    """The serialized events of one file, up to a torn or corrupt record."""
    from tensorboardX.record_writer import masked_crc32c

    raw, records, pos = path.read_bytes(), [], 0
    while pos + _LEN.size + _CRC.size <= len(raw):
        header = raw[pos:pos + _LEN.size]
        (length,) = _LEN.unpack(header)
        start = pos + _LEN.size + _CRC.size
        end = start + length + _CRC.size
        if _CRC.unpack_from(raw, pos + _LEN.size)[0] != masked_crc32c(header) or end > len(raw) \
                or _CRC.unpack_from(raw, start + length)[0] != masked_crc32c(raw[start:start + length]):
            break
        records.append(raw[start:start + length])
        pos = end
    return records


def truncate_tensorboard(directory: Path, after_step: int) -> None:
    """Drops events of steps > ``after_step`` from every event file in ``directory``
    (a resumed run logs those steps again into a new file)."""
    from tensorboardX.proto.event_pb2 import Event

    for path in sorted(Path(directory).glob("events.out.tfevents.*")):
        records = read_event_records(path)
        kept = []
        for data in records:
            event = Event.FromString(data)
            if not event.HasField("summary") or event.step <= after_step:
                kept.append(_frame(data))
        if len(kept) != len(records) or sum(map(len, kept)) != path.stat().st_size:
            replace_atomically(path, b"".join(kept))


def tensorboard_steps(directory: str | Path) -> dict[str, list[int]]:
    """Scalar tag -> the steps logged for it, over all event files (in file order)."""
    from tensorboardX.proto.event_pb2 import Event

    steps: dict[str, list[int]] = {}
    for path in sorted(Path(directory).glob("events.out.tfevents.*")):
        for data in read_event_records(path):
            event = Event.FromString(data)
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(int(event.step))
    return steps


def reward_trend(rows: list[dict[str, Any]], key: str = "reward_mean") -> str | None:
    """``key`` averaged over the first and the last quarter of the run (at most
    16 steps each): one step's reward is too noisy to show a trend."""
    values = [r[key] for r in rows if key in r]
    if len(values) < 2:
        return None
    w = max(1, min(16, len(values) // 4))
    first, last = sum(values[:w]) / w, sum(values[-w:]) / w
    return (f"{key}: {first:.4f} (mean of the first {w} logged steps) -> {last:.4f} "
            f"(mean of the last {w}), {last - first:+.4f}")


def save_image_grid(
    path: Path, images: np.ndarray, prompts: list[str], *, min_cell: int = 96, max_chars: int = 80
) -> Path:
    """Saves ``images [N, G, H, W, 3]`` in [0, 1] as one PNG: a row per prompt, captioned.

    Tiny images are upscaled (nearest) to at least ``min_cell`` pixels so a grid
    of 32x32 samples is still readable.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 5 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, G, H, W, 3], got {images.shape}")
    n, g, h, w, _ = images.shape
    scale = max(1, math.ceil(min_cell / max(h, w)))
    ch, cw = h * scale, w * scale
    caption = 14
    grid = Image.new("RGB", (g * cw, n * (ch + caption)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        text = prompts[i] if len(prompts[i]) <= max_chars else prompts[i][: max_chars - 3] + "..."
        draw.text((2, i * (ch + caption) + 1), text, fill=(0, 0, 0))
        for j in range(g):
            tile = (np.clip(images[i, j], 0, 1) * 255).round().astype(np.uint8)
            tile_img = Image.fromarray(tile).resize((cw, ch), Image.NEAREST)
            grid.paste(tile_img, (j * cw, i * (ch + caption) + caption))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path

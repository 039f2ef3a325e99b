"""Metrics as JSON lines + TensorBoard events, and captioned image grids."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw


class MetricsLogger:
    """Appends one JSON object per step to ``workdir/metrics.jsonl`` and to TensorBoard.

    On resume (``truncate_after=k``) rows of steps > k, written after the last
    checkpoint by a run that then died, are dropped so every step appears once.
    """

    def __init__(self, workdir: Path, *, enabled: bool = True, truncate_after: int | None = None):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._writer = None
        if not enabled:
            return
        if truncate_after is not None and self.path.exists():
            kept = [
                line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= truncate_after
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(Path(workdir) / "tensorboard"))
        self._file = self.path.open("a")

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: v for k, v in metrics.items() if k != "step"}}
        self._file.write(json.dumps(row, sort_keys=True) + "\n")
        self._file.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._writer.close()


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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

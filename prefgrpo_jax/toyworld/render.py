"""Anti-aliased, deterministic rasteriser for toy-world scenes (pure numpy).

Each object is sampled on a ``supersample x supersample`` grid of points per
pixel, restricted to the pixels its bounding box touches, and box-filtered to a
per-pixel coverage in [0, 1]; the pixel becomes ``bg + coverage * (colour - bg)``
(objects never overlap, so composition order does not matter). Box filtering
keeps an edge pixel on the line between background and object colour, which is
what lets the verifier recover both the colour and the coverage of every pixel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from prefgrpo_jax.toyworld.scenes import BACKGROUND, COLOURS, Scene, SceneObject


def _inside(obj: SceneObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean [len(ys), len(xs)]: which sample points (fractions) the object covers."""
    dx = xs[None, :] - obj.x
    dy = ys[:, None] - obj.y
    h = 0.5 * obj.size
    if obj.shape == "circle":
        return dx * dx + dy * dy <= h * h
    if obj.shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if obj.shape == "triangle":
        # Upright isosceles triangle filling its box: apex at the top centre,
        # base along the bottom edge, so base == height == size and the
        # half-width at depth t below the apex is t / 2.
        return (dy <= h) & (np.abs(dx) <= 0.5 * (dy + h))
    raise ValueError(f"unknown shape {obj.shape!r}")


def coverage(obj: SceneObject, size: int, supersample: int = 4) -> tuple[np.ndarray, int, int]:
    """Per-pixel coverage of one object on a ``size`` x ``size`` image.

    Returns ``(cov [h, w] float32 in [0, 1], row0, col0)``: the patch of pixels the
    object's bounding box touches and where it starts.
    """
    h = 0.5 * obj.size
    c0 = max(int(np.floor((obj.x - h) * size)), 0)
    c1 = min(int(np.ceil((obj.x + h) * size)), size)
    r0 = max(int(np.floor((obj.y - h) * size)), 0)
    r1 = min(int(np.ceil((obj.y + h) * size)), size)
    n = size * supersample
    xs = (np.arange(c0 * supersample, c1 * supersample) + 0.5) / n
    ys = (np.arange(r0 * supersample, r1 * supersample) + 0.5) / n
    inside = _inside(obj, xs, ys)
    cov = inside.reshape(r1 - r0, supersample, c1 - c0, supersample).mean(axis=(1, 3), dtype=np.float32)
    return cov, r0, c0


def render(scene: Scene, size: int = 32, supersample: int = 4) -> np.ndarray:
    """Render a scene to ``[size, size, 3]`` float32 RGB in [0, 1], deterministically."""
    bg = np.asarray(BACKGROUND, np.float32)
    img = np.empty((size, size, 3), np.float32)
    img[:] = bg
    for obj in scene.objects:
        cov, r0, c0 = coverage(obj, size, supersample)
        col = np.asarray(COLOURS[obj.colour], np.float32)
        patch = img[r0 : r0 + cov.shape[0], c0 : c0 + cov.shape[1]]
        patch += cov[..., None] * (col - patch)  # "over" composite, in place
    return img


def render_batch(scenes: Sequence[Scene], size: int = 32, supersample: int = 4) -> np.ndarray:
    """Render many scenes: ``[N, size, size, 3]`` float32."""
    out = np.empty((len(scenes), size, size, 3), np.float32)
    for i, s in enumerate(scenes):
        out[i] = render(s, size, supersample)
    return out

"""Pixel-level verifier: binary testpoints per prompt, UniGenBench-style scores.

Pipeline for one image ``[H, W, 3]`` in [0, 1]:

1. **Colour per pixel.** Over a black background an object pixel is
   ``coverage * colour``, so a pixel is classified by its *direction* in RGB:
   the palette colour with the highest cosine similarity, if that cosine is at
   least ``COS_MIN`` and the pixel's projection onto that colour (its apparent
   coverage ``alpha``) is at least ``ALPHA_MIN``; otherwise background.
2. **Objects.** Connected components (4-connectivity) of each colour's mask
   (``scipy.ndimage.label``); components whose soft area is below
   ``MIN_AREA`` (fraction of the image), or with fewer than half that many
   hard pixels, are discarded as specks.
3. **Shape by template fit.** The soft mask is ``alpha`` of the component's
   colour on the component grown by one pixel (so anti-aliased rims count).
   For each shape, the ideal anti-aliased shape with the same area and centre
   of mass is rasterised (``render.coverage``) and compared in L1, relative to
   the area. The best-fitting shape wins if its error is at most ``FIT_MAX``;
   otherwise the component is an unrecognised blob (noise, smear). Measured
   errors: clean renders <= 0.013; renders blurred with a Gaussian of sigma
   0.7 px <= 0.36 at 32 px; blobs in uniform noise 0.28-1.3, mostly > 0.5.
   The side length implied by the area gives the size class; a side outside
   ``SIDE_RANGE`` (e.g. a frame-filling square) makes the component a blob.
4. **Testpoints** per prompt dimension (each binary):

   - colour ``a [Z] C S``: colour (some object is C), shape (some object is S),
     size (if Z: some C S object has size Z), count (exactly one object).
   - shape ``a [Z] S``: shape, size (if Z: some S object has size Z), count.
   - count ``N C S``: count (exactly N objects are C S), colour (there are
     objects and all are C), shape (there are objects and all are S).
   - position ``a A REL a B``: binding (an A exists), binding (a B exists),
     position (some A, B pair satisfies REL), count (exactly two objects).
   - binding ``a A and a B``: binding (an A), binding (a B), count (exactly two).

   "Object" means a recognised shape; "exactly N objects" also requires that
   there is no unrecognised blob, and the count prompt's "all" testpoints range
   over blobs too, so clutter and noise fail them. ``A REL B`` holds between
   centres of mass when the displacement along the relation's axis exceeds
   ``REL_MIN`` and exceeds the displacement across it (diagonal placements are
   ambiguous and fail).

``verify`` returns ``score`` = fraction of the prompt's testpoints passed plus
the mean per testpoint kind; ``score_table`` averages ``score`` per prompt
dimension and takes the unweighted mean over dimensions (as UniGenBench does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from prefgrpo_jax.toyworld.render import coverage
from prefgrpo_jax.toyworld.scenes import (
    BACKGROUND,
    COLOURS,
    DIMENSIONS,
    SIZES,
    ObjectSpec,
    PromptSpec,
    SceneObject,
    parse_prompt,
)

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
_PALETTE = np.asarray([COLOURS[c] for c in COLOUR_NAMES], np.float32) - np.asarray(BACKGROUND, np.float32)
_PALETTE_NORM = np.linalg.norm(_PALETTE, axis=1)

COS_MIN = 0.94  # ~20 degrees; the closest palette pair (purple, white) is 27.5 degrees apart
ALPHA_MIN = 0.5  # a pixel at least half covered belongs to the hard mask
MIN_AREA = 0.4 * 0.5 * SIZES["small"][0] ** 2  # 40% of the smallest triangle
# Side-length threshold between the size classes (their ranges are 0.18-0.22, 0.32-0.38).
SIZE_THRESHOLD = 0.5 * (SIZES["small"][1] + SIZES["large"][0])
# Recognised shapes have a side within half the smallest / 1.5x the largest size.
SIDE_RANGE = (0.5 * SIZES["small"][0], 1.5 * SIZES["large"][1])
REL_MIN = 0.05  # minimum centre displacement (fraction of the side) for a relation
FIT_MAX = 0.4  # maximum template error of a recognised shape (see module docstring)
# Nominal fill of the shape's bounding box, used to turn area into side length.
_FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
TESTPOINT_KINDS: tuple[str, ...] = ("colour", "shape", "size", "count", "position", "binding")

_FOUR_CONN = ndimage.generate_binary_structure(2, 1)
_GROW = np.ones((3, 3), bool)


@dataclass(frozen=True)
class Detection:
    """An object found in an image. Positions and sizes are fractions of the image side."""

    colour: str
    shape: str | None  # None: matches no shape (e.g. a noise blob)
    size_class: str | None
    x: float  # centre of mass, x right
    y: float  # centre of mass, y down
    area: float
    fill: float  # soft area / soft bounding box: square 1, circle pi/4, triangle 1/2
    skew: float  # vertical skewness of the mass: upright triangle ~ -0.57, others 0
    fit_error: float  # template L1 error of the chosen shape (see _template_error)

    def matches(self, o: ObjectSpec) -> bool:
        return (
            self.shape == o.shape
            and (o.colour is None or self.colour == o.colour)
            and (o.size is None or self.size_class == o.size)
        )


@dataclass(frozen=True)
class Testpoint:
    kind: str  # one of TESTPOINT_KINDS
    description: str
    passed: bool


def _template_error(canvas: np.ndarray, shape: str, area: float, cx: float, cy: float) -> float:
    """L1 distance between a soft mask and the ideal ``shape`` of the same area and
    centre of mass, relative to the area (0 = perfect fit; disjoint = 2).

    canvas: [S, S] soft mask; area in pixels; (cx, cy) centre of mass in pixels.
    Side length comes from the area (exact under anti-aliasing).
    """
    side = canvas.shape[0]
    s = float(np.sqrt(area / _FILL[shape])) / side
    x, y = cx / side, cy / side
    if shape == "triangle":
        y -= s / 6.0  # box centre lies s/6 above the triangle's centre of mass
    cov, r0, c0 = coverage(SceneObject(shape, "white", s, x, y), side)
    diff = canvas.sum() - canvas[r0 : r0 + cov.shape[0], c0 : c0 + cov.shape[1]].sum()
    diff += np.abs(canvas[r0 : r0 + cov.shape[0], c0 : c0 + cov.shape[1]] - cov).sum()
    return float(diff / max(area, 1e-6))


def pixel_colours(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel palette index (-1 = background) and per-colour coverage.

    image: [H, W, 3] in [0, 1]. Returns ``(label [H, W] int, alpha [H, W, K] float32)``
    where ``alpha[..., k]`` is the pixel's projection on colour k (its coverage if
    it is of colour k).
    """
    d = np.asarray(image, np.float32) - np.asarray(BACKGROUND, np.float32)
    dots = d @ _PALETTE.T  # [H, W, K]
    alpha = dots / (_PALETTE_NORM**2)
    norm = np.linalg.norm(d, axis=-1, keepdims=True)
    cos = dots / (np.maximum(norm, 1e-6) * _PALETTE_NORM)
    k = np.argmax(cos, axis=-1)
    best_cos = np.take_along_axis(cos, k[..., None], -1)[..., 0]
    best_alpha = np.take_along_axis(alpha, k[..., None], -1)[..., 0]
    label = np.where((best_cos >= COS_MIN) & (best_alpha >= ALPHA_MIN), k, -1)
    return label, alpha


def detect_objects(image: np.ndarray) -> list[Detection]:
    """All objects (recognised shapes and blobs) in a square image ``[S, S, 3]``.

    Values are clipped to [0, 1]. Detections come grouped by colour, in palette order.
    """
    image = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an image [H, W, 3], got shape {image.shape}")
    h, w = image.shape[:2]
    if h != w:
        raise ValueError(f"expected a square image, got {h}x{w}")
    label, alpha = pixel_colours(image)
    min_px = MIN_AREA * h * w
    fg = label >= 0
    dets: list[Detection] = []
    for k, cname in enumerate(COLOUR_NAMES):
        comps, n = ndimage.label(label == k, structure=_FOUR_CONN)
        if n == 0:
            continue
        # Cheap speck filter first: noise images have hundreds of 1-3 pixel
        # components per colour, and every real object has >= 10 hard pixels.
        n_hard = np.bincount(comps.ravel(), minlength=n + 1)
        for i, sl in enumerate(ndimage.find_objects(comps), start=1):
            if n_hard[i] < 0.5 * min_px:
                continue
            # Grow the component's box by a pixel and the component by one pixel
            # to pick up anti-aliased rims, but never into another object's pixels.
            r0, r1 = max(sl[0].start - 1, 0), min(sl[0].stop + 1, h)
            c0, c1 = max(sl[1].start - 1, 0), min(sl[1].stop + 1, w)
            mine = comps[r0:r1, c0:c1] == i
            region = ndimage.binary_dilation(mine, _GROW) & (mine | ~fg[r0:r1, c0:c1])
            wgt = np.where(region, np.clip(alpha[r0:r1, c0:c1, k], 0.0, 1.0), 0.0)
            area = float(wgt.sum())
            if area < min_px:
                continue
            # fill and skew are diagnostics only (shape comes from the template fit).
            box_w = float(wgt.max(axis=0).sum())
            box_h = float(wgt.max(axis=1).sum())
            fill = area / max(box_w * box_h, 1e-6)
            ys, xs = np.mgrid[r0:r1, c0:c1].astype(np.float64) + 0.5
            cy = float((wgt * ys).sum() / area)
            cx = float((wgt * xs).sum() / area)
            var_y = float((wgt * (ys - cy) ** 2).sum() / area)
            skew = float((wgt * (ys - cy) ** 3).sum() / area / max(var_y, 1e-6) ** 1.5)
            canvas = np.zeros((h, w), np.float32)
            canvas[r0:r1, c0:c1] = wgt
            errs = {sh: _template_error(canvas, sh, area, cx, cy) for sh in _FILL}
            shape = min(errs, key=errs.get)
            err = errs[shape]
            side = float(np.sqrt(area / _FILL[shape])) / w
            # A shape far outside the vocabulary's sizes (e.g. a frame-filling
            # square from an all-white image) is not an object of this world.
            if err > FIT_MAX or not SIDE_RANGE[0] <= side <= SIDE_RANGE[1]:
                shape = None
            size_class = None
            if shape is not None:
                size_class = "small" if side < SIZE_THRESHOLD else "large"
            dets.append(Detection(cname, shape, size_class, cx / w, cy / h, area / (h * w), fill, skew, err))
    return dets


def relation_holds(a: Detection, b: Detection, relation: str) -> bool:
    """``a <relation> b`` between centres of mass (y down)."""
    along, across = {
        "left of": (b.x - a.x, b.y - a.y),
        "right of": (a.x - b.x, b.y - a.y),
        "above": (b.y - a.y, b.x - a.x),
        "below": (a.y - b.y, b.x - a.x),
    }[relation]
    return along > REL_MIN and along > abs(across)


def testpoints(dets: Sequence[Detection], spec: PromptSpec) -> list[Testpoint]:
    """The prompt's binary testpoints evaluated on detected objects."""
    d = spec.dimension
    tps: list[Testpoint] = []
    # Attribute testpoints look only at recognised shapes; unrecognised blobs
    # (noise, smears) still count as clutter in the "exactly N objects" tests.
    objs = [x for x in dets if x.shape is not None]

    def exactly(n: int) -> bool:  # n detections, every one a recognised shape
        return len(dets) == n and len(objs) == n

    def add(kind: str, desc: str, ok: bool) -> None:
        tps.append(Testpoint(kind, desc, bool(ok)))

    if d in ("colour", "shape"):
        o = spec.objects[0]
        if o.colour is not None:
            add("colour", f"some object is {o.colour}", any(x.colour == o.colour for x in objs))
        add("shape", f"some object is a {o.shape}", any(x.shape == o.shape for x in objs))
        if o.size is not None:
            add("size", f"some {o.phrase()} is {o.size}", any(x.matches(o) for x in objs))
        add("count", "exactly one object", exactly(1))
    elif d == "count":
        o = spec.objects[0]
        add("count", f"exactly {spec.count} {o.phrase(plural=True)}", sum(x.matches(o) for x in objs) == spec.count)
        # "all" over every detection, blobs included: clutter of another colour
        # or no recognisable shape fails these.
        add("colour", f"all objects are {o.colour}", bool(objs) and all(x.colour == o.colour for x in dets))
        add("shape", f"all objects are {o.shape}s", bool(objs) and all(x.shape == o.shape for x in dets))
    elif d in ("position", "binding"):
        a, b = spec.objects
        add("binding", f"there is a {a.phrase()}", any(x.matches(a) for x in objs))
        add("binding", f"there is a {b.phrase()}", any(x.matches(b) for x in objs))
        if d == "position":
            ok = any(
                relation_holds(x, y, spec.relation)
                for x in objs if x.matches(a)
                for y in objs if y.matches(b) and y is not x
            )
            add("position", f"the {a.phrase()} is {spec.relation} the {b.phrase()}", ok)
        add("count", "exactly two objects", exactly(2))
    else:
        raise ValueError(f"unknown dimension {d!r}")
    return tps


def verify(image: np.ndarray, spec: PromptSpec | str) -> dict[str, float]:
    """Score one image ``[H, W, 3]`` in [0, 1] against a prompt (spec or text).

    Returns ``{"score": fraction of testpoints passed, <kind>: mean of that kind's
    testpoints, ...}`` with values in [0, 1]; kinds are those the prompt tests.
    """
    if isinstance(spec, str):
        spec = parse_prompt(spec)
    tps = testpoints(detect_objects(image), spec)
    out: dict[str, float] = {"score": float(np.mean([t.passed for t in tps]))}
    for kind in TESTPOINT_KINDS:
        vals = [t.passed for t in tps if t.kind == kind]
        if vals:
            out[kind] = float(np.mean(vals))
    return out


def verify_batch(images: np.ndarray, specs: Sequence[PromptSpec | str]) -> np.ndarray:
    """Overall scores ``[N]`` float32 for images ``[N, H, W, 3]`` and N prompts."""
    images = np.asarray(images)
    if images.ndim != 4 or len(images) != len(specs):
        raise ValueError(f"expected images [N, H, W, 3] with N == len(specs); got {images.shape}, {len(specs)}")
    return np.asarray([verify(im, sp)["score"] for im, sp in zip(images, specs)], np.float32)


def score_table(
    results: Sequence[float | Mapping[str, float]],
    specs: Sequence[PromptSpec | str],
) -> dict[str, float]:
    """Per-dimension mean score and ``overall`` (unweighted mean over dimensions present).

    ``results[i]`` is an overall score or a ``verify`` dict for ``specs[i]``.
    """
    if len(results) != len(specs):
        raise ValueError(f"{len(results)} results for {len(specs)} prompts")
    per_dim: dict[str, list[float]] = {}
    for r, sp in zip(results, specs):
        dim = (parse_prompt(sp) if isinstance(sp, str) else sp).dimension
        per_dim.setdefault(dim, []).append(float(r["score"] if isinstance(r, Mapping) else r))
    table = {d: float(np.mean(per_dim[d])) for d in DIMENSIONS if d in per_dim}
    table["overall"] = float(np.mean(list(table.values()))) if table else float("nan")
    return table

"""Toy world vocabulary, prompt grammar, seeded prompt/scene generators, held-out split.

The toy world is a text-to-image task whose ground truth can be checked from
pixels (see ``verify.py``): flat-coloured circles, squares and triangles on a
black background. Every prompt belongs to exactly one *dimension* (category),
recognisable from the text alone:

============  ==========================================  ===================
dimension     grammar                                     example
============  ==========================================  ===================
colour        ``a [SIZE] COLOUR SHAPE``                   a large red square
shape         ``a [SIZE] SHAPE``                          a small triangle
count         ``NUMBER COLOUR SHAPE(s)``                  three blue circles
position      ``a COLOUR SHAPE RELATION a COLOUR SHAPE``  a red circle left of a white square
binding       ``a COLOUR SHAPE and a COLOUR SHAPE``       a red square and a blue circle
============  ==========================================  ===================

(binding prompts use two different colours *and* two different shapes, so that
only the right colour-shape pairing satisfies them.) The prompt spaces are
small (1,539 texts in all), so they are enumerated once and sampled
uniformly; ``parse_prompt`` inverts the grammar exactly.

Held-out split (compositional generalisation, disjoint texts)
-------------------------------------------------------------
A prompt is *held out* iff one of the objects it describes has a
(colour, shape) pair in ``HELDOUT_COLOUR_SHAPE`` or an explicit
(size, shape) pair in ``HELDOUT_SIZE_SHAPE``. The training split
(``sample_prompt(..., split="train")``, the default) never produces such a
prompt, and ``sample_scene`` by default never paints a held-out colour-shape
pair on an object whose colour the prompt leaves open, so held-out colour-shape
pairs appear in no training image either. Every colour, shape and size still
occurs in training; only the listed combinations are new at evaluation.
Shape prompts name no colour, so for them only the size-shape rule applies and
the held-out shape pool is 3 texts ("a small circle", "a small square",
"a large triangle"); ``heldout_prompts`` cycles through a pool smaller than the
requested count. Pool sizes (train / held out): colour 30 / 24, shape 6 / 3,
count 60 / 12, position 840 / 384, binding 126 / 54.

Coordinates are fractions of the image side, x to the right, y *down* (image
convention), so one scene renders at any resolution.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------

# Saturated, well separated directions in RGB: on a black background an
# anti-aliased edge pixel is ``coverage * colour``, so the verifier classifies by
# the *direction* of a pixel, and these directions are >= 27 degrees apart.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "yellow": (0.95, 0.85, 0.10),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "purple": (0.75, 0.15, 0.80),
    "white": (0.95, 0.95, 0.95),
}
BACKGROUND: tuple[float, float, float] = (0.0, 0.0, 0.0)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Size classes as ranges of the object's bounding-box side (fraction of the
# image side). The gap between them (0.22 .. 0.32) lets the verifier separate
# them with one threshold (see verify.SIZE_THRESHOLD).
SIZES: dict[str, tuple[float, float]] = {"small": (0.18, 0.22), "large": (0.32, 0.38)}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBERS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
DIMENSIONS: tuple[str, ...] = ("colour", "shape", "count", "position", "binding")

# The held-out split, see the module docstring. Each shape loses one colour and
# no colour loses more than one shape, so every word keeps training support.
HELDOUT_COLOUR_SHAPE: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "circle"), ("blue", "square")}
)
HELDOUT_SIZE_SHAPE: frozenset[tuple[str, str]] = frozenset(
    {("small", "circle"), ("small", "square"), ("large", "triangle")}
)

# Layout constants (fractions of the image side). GAP keeps objects' bounding
# boxes apart (>= 3 px at 32 px) so connected components never merge; MARGIN
# keeps them off the border.
MARGIN = 0.04
GAP = 0.10
# A generated "A left of B" scene has dx >= max(REL_MIN, |dy| + REL_SLACK) between
# the mass centroids: comfortably inside the verifier's rule (dx > 0.05, dx > |dy|).
REL_MIN = 0.20
REL_SLACK = 0.10

Split = Literal["train", "heldout", "all"]

# ---------------------------------------------------------------------------
# Data classes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """One object as described by a prompt; ``None`` = the prompt leaves it open."""

    shape: str
    colour: str | None = None
    size: str | None = None  # a key of SIZES

    def phrase(self, plural: bool = False) -> str:
        words = [w for w in (self.size, self.colour) if w is not None]
        return " ".join(words + [self.shape + ("s" if plural else "")])


@dataclass(frozen=True)
class PromptSpec:
    """A prompt and its structured targets.

    ``count`` copies of ``objects[0]`` for count prompts (``len(objects) == 1``);
    ``count == 1`` otherwise. ``relation`` (position prompts only) reads
    ``objects[0] <relation> objects[1]``.
    """

    text: str
    dimension: str
    objects: tuple[ObjectSpec, ...]
    count: int = 1
    relation: str | None = None

    @property
    def n_objects(self) -> int:
        """Number of objects a correct image contains."""
        return self.count * len(self.objects)


@dataclass(frozen=True)
class SceneObject:
    """A concrete object: bounding-box centre (x, y) and side ``size``, as fractions."""

    shape: str
    colour: str
    size: float
    x: float
    y: float

    @property
    def size_class(self) -> str:
        return "small" if self.size < 0.5 * (SIZES["small"][1] + SIZES["large"][0]) else "large"

    @property
    def centroid(self) -> tuple[float, float]:
        """Centre of mass (x, y). The upright triangle's lies size/6 below its box centre."""
        if self.shape == "triangle":
            return (self.x, self.y + self.size / 6.0)
        return (self.x, self.y)


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]


# ---------------------------------------------------------------------------
# Grammar
# ---------------------------------------------------------------------------


def make_prompt(
    dimension: str,
    objects: tuple[ObjectSpec, ...],
    count: int = 1,
    relation: str | None = None,
) -> PromptSpec:
    """Build a PromptSpec (its text from the grammar) and check it is well formed."""
    objects = tuple(objects)
    if dimension == "colour":
        _check(len(objects) == 1 and objects[0].colour is not None and count == 1, dimension)
        text = "a " + objects[0].phrase()
    elif dimension == "shape":
        _check(len(objects) == 1 and objects[0].colour is None and count == 1, dimension)
        text = "a " + objects[0].phrase()
    elif dimension == "count":
        o = objects[0]
        _check(len(objects) == 1 and o.colour is not None and o.size is None, dimension)
        _check(count in NUMBERS, dimension)
        text = f"{NUMBERS[count]} {o.phrase(plural=count > 1)}"
    elif dimension == "position":
        _check(len(objects) == 2 and relation in RELATIONS and count == 1, dimension)
        _check(all(o.colour is not None and o.size is None for o in objects), dimension)
        _check(objects[0] != objects[1], dimension)
        text = f"a {objects[0].phrase()} {relation} a {objects[1].phrase()}"
    elif dimension == "binding":
        a, b = objects if len(objects) == 2 else (None, None)
        _check(a is not None and count == 1 and relation is None, dimension)
        _check(all(o.colour is not None and o.size is None for o in objects), dimension)
        _check(a.colour != b.colour and a.shape != b.shape, dimension)
        text = f"a {a.phrase()} and a {b.phrase()}"
    else:
        raise ValueError(f"unknown dimension {dimension!r}; expected one of {DIMENSIONS}")
    for o in objects:
        _check(o.shape in SHAPES, dimension)
        _check(o.colour is None or o.colour in COLOURS, dimension)
        _check(o.size is None or o.size in SIZES, dimension)
    return PromptSpec(text, dimension, objects, count, relation)


def _check(ok: bool, dimension: str) -> None:
    if not ok:
        raise ValueError(f"malformed {dimension} prompt")


_PLURAL = {s + "s": s for s in SHAPES}
_WORD_NUMBERS = {w: n for n, w in NUMBERS.items()}


def _short(text: str, limit: int = 120) -> str:
    """``repr(text)``, cut in the middle past ``limit`` characters: an error about a
    100k-character prompt must not paste it into the log."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[: limit // 2]) + f" ... ({len(text)} characters) ... " + repr(text[-limit // 2:])


def _parse_object(words: list[str], text: str) -> ObjectSpec:
    """``[size] [colour] shape`` -> ObjectSpec (singular only)."""
    size = colour = None
    rest = list(words)
    if rest and rest[0] in SIZES:
        size = rest.pop(0)
    if rest and rest[0] in COLOURS:
        colour = rest.pop(0)
    if len(rest) != 1 or rest[0] not in SHAPES:
        raise ValueError(f"cannot parse object {_short(' '.join(words))} in prompt {_short(text)}")
    return ObjectSpec(rest[0], colour, size)


@lru_cache(maxsize=8192)  # pure; rewards parse the same few prompts every step
def parse_prompt(text: str) -> PromptSpec:
    """Invert the grammar: ``parse_prompt(spec.text) == spec`` for every generated spec.

    Case, surrounding whitespace and a trailing period are tolerated; anything
    outside the grammar raises ``ValueError``.
    """
    norm = " ".join(text.strip().rstrip(".").lower().split())
    words = norm.split(" ")
    if not words or not words[0]:
        raise ValueError("empty prompt")
    if words[0] in _WORD_NUMBERS:  # count: NUMBER COLOUR SHAPE(s)
        n = _WORD_NUMBERS[words[0]]
        if len(words) != 3 or words[1] not in COLOURS:
            raise ValueError(f"cannot parse count prompt {_short(text)}")
        shape = words[2] if n == 1 else _PLURAL.get(words[2])
        if shape not in SHAPES:
            raise ValueError(f"cannot parse count prompt {_short(text)}")
        return make_prompt("count", (ObjectSpec(shape, words[1]),), count=n)
    if words[0] != "a":
        raise ValueError(f"cannot parse prompt {_short(text)}")
    if "and" in words:
        i = words.index("and")
        if i + 1 >= len(words) or words[i + 1] != "a":
            raise ValueError(f"cannot parse binding prompt {_short(text)}")
        a = _parse_object(words[1:i], text)
        b = _parse_object(words[i + 2 :], text)
        return make_prompt("binding", (a, b))
    for rel in RELATIONS:
        rw = rel.split(" ")
        for i in range(1, len(words) - len(rw)):
            if words[i : i + len(rw)] == rw and words[i + len(rw)] == "a":
                a = _parse_object(words[1:i], text)
                b = _parse_object(words[i + len(rw) + 1 :], text)
                return make_prompt("position", (a, b), relation=rel)
    obj = _parse_object(words[1:], text)
    return make_prompt("colour" if obj.colour is not None else "shape", (obj,))


# ---------------------------------------------------------------------------
# Enumeration, split, sampling
# ---------------------------------------------------------------------------


def is_heldout(spec: PromptSpec) -> bool:
    """True iff the prompt names a held-out colour-shape or size-shape pair."""
    for o in spec.objects:
        if o.colour is not None and (o.colour, o.shape) in HELDOUT_COLOUR_SHAPE:
            return True
        if o.size is not None and (o.size, o.shape) in HELDOUT_SIZE_SHAPE:
            return True
    return False


@lru_cache(maxsize=None)
def all_prompts(dimension: str) -> tuple[PromptSpec, ...]:
    """Every prompt of a dimension, in a fixed (grammar) order."""
    cs = [(c, s) for c in COLOURS for s in SHAPES]
    out: list[PromptSpec] = []
    if dimension == "colour":
        for (c, s), z in itertools.product(cs, (None, *SIZES)):
            out.append(make_prompt("colour", (ObjectSpec(s, c, z),)))
    elif dimension == "shape":
        for s, z in itertools.product(SHAPES, (None, *SIZES)):
            out.append(make_prompt("shape", (ObjectSpec(s, None, z),)))
    elif dimension == "count":
        for (c, s), n in itertools.product(cs, NUMBERS):
            out.append(make_prompt("count", (ObjectSpec(s, c),), count=n))
    elif dimension == "position":
        for (a, b), rel in itertools.product(itertools.permutations(cs, 2), RELATIONS):
            out.append(make_prompt("position", (ObjectSpec(a[1], a[0]), ObjectSpec(b[1], b[0])), relation=rel))
    elif dimension == "binding":
        for a, b in itertools.permutations(cs, 2):
            if a[0] != b[0] and a[1] != b[1]:
                out.append(make_prompt("binding", (ObjectSpec(a[1], a[0]), ObjectSpec(b[1], b[0]))))
    else:
        raise ValueError(f"unknown dimension {dimension!r}; expected one of {DIMENSIONS}")
    return tuple(out)


@lru_cache(maxsize=None)
def prompt_pool(dimension: str, split: Split = "train") -> tuple[PromptSpec, ...]:
    """The prompts of one dimension in a split ("train", "heldout" or "all")."""
    pool = all_prompts(dimension)
    if split == "all":
        return pool
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; expected 'train', 'heldout' or 'all'")
    want = split == "heldout"
    return tuple(p for p in pool if is_heldout(p) == want)


def as_rng(rng: int | np.random.Generator | None) -> np.random.Generator:
    """A seed (or None) -> a fresh Generator; a Generator is used (and advanced) as is."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def sample_prompt(
    rng: int | np.random.Generator | None = None,
    dimension: str | None = None,
    split: Split = "train",
) -> PromptSpec:
    """Draw a prompt: a uniform dimension (unless given), then a uniform prompt of it.

    Deterministic for an int seed. ``split="train"`` never returns a held-out prompt.
    """
    rng = as_rng(rng)
    if dimension is None:
        dimension = DIMENSIONS[int(rng.integers(len(DIMENSIONS)))]
    pool = prompt_pool(dimension, split)
    return pool[int(rng.integers(len(pool)))]


HELDOUT_SEED = 20250828  # fixed: the held-out evaluation set never changes


def heldout_prompts(
    n_per_dim: int = 50, dimensions: tuple[str, ...] = DIMENSIONS
) -> list[PromptSpec]:
    """The fixed evaluation set: ``n_per_dim`` held-out prompts per dimension.

    Flat list, grouped by dimension in the order of ``dimensions``. Each pool is
    shuffled once with ``HELDOUT_SEED``; prompts are distinct while the pool is
    large enough and cycle through it otherwise (the shape pool has 3 texts).
    """
    out: list[PromptSpec] = []
    for d in dimensions:
        pool = prompt_pool(d, "heldout")
        order = np.random.default_rng([HELDOUT_SEED, DIMENSIONS.index(d)]).permutation(len(pool))
        out.extend(pool[order[i % len(pool)]] for i in range(n_per_dim))
    return out


# ---------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------


def _relation_holds(a: SceneObject, b: SceneObject, relation: str) -> bool:
    """Generation-side check with a safety margin over the verifier's rule."""
    (ax, ay), (bx, by) = a.centroid, b.centroid
    # along: how far b is from a in the relation's direction; across: the other axis.
    along, across = {
        "left of": (bx - ax, by - ay),
        "right of": (ax - bx, by - ay),
        "above": (by - ay, bx - ax),
        "below": (ay - by, bx - ax),
    }[relation]
    return along >= max(REL_MIN, abs(across) + REL_SLACK)


def _separated(a: SceneObject, b: SceneObject) -> bool:
    """Bounding boxes at least GAP apart along x or y (so masks never touch)."""
    reach = 0.5 * (a.size + b.size) + GAP
    return abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach


def _free_colours(shape: str, avoid_heldout: bool) -> list[str]:
    return [c for c in COLOURS if not (avoid_heldout and (c, shape) in HELDOUT_COLOUR_SHAPE)]


def sample_scene(
    spec: PromptSpec,
    rng: int | np.random.Generator | None = None,
    avoid_heldout: bool = True,
) -> Scene:
    """A random layout that satisfies ``spec``: right objects, no overlaps, relation held.

    Open attributes are drawn at random: sizes uniformly within a random size
    class, colours uniformly (excluding held-out colour-shape pairs when
    ``avoid_heldout``, so training images never show them). Deterministic for an
    int seed.
    """
    rng = as_rng(rng)
    wanted = [o for o in spec.objects for _ in range(spec.count)]
    n = len(wanted)
    for attempt in range(100):
        objs: list[SceneObject] = []
        for o in wanted:
            colour = o.colour or str(rng.choice(_free_colours(o.shape, avoid_heldout)))
            # Crowded scenes prefer small objects (four large ones barely fit);
            # after repeated failures everything open goes small.
            if o.size is not None:
                cls = o.size
            elif attempt >= 20:
                cls = "small"
            else:
                cls = "large" if rng.random() < (0.5 if n <= 2 else 0.25) else "small"
            size = float(rng.uniform(*SIZES[cls]))
            placed = None
            for _ in range(100):
                half = 0.5 * size + MARGIN
                cand = SceneObject(
                    o.shape, colour, size,
                    float(rng.uniform(half, 1 - half)), float(rng.uniform(half, 1 - half)),
                )
                if not all(_separated(cand, p) for p in objs):
                    continue
                if spec.relation is not None and objs and not _relation_holds(objs[0], cand, spec.relation):
                    continue
                placed = cand
                break
            if placed is None:
                break
            objs.append(placed)
        if len(objs) == n:
            return Scene(tuple(objs))
    raise RuntimeError(f"could not lay out {spec.text!r}")  # pragma: no cover - never seen

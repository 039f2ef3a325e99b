"""Toy world: grammar, held-out split, renderer and verifier validation.

The verifier is only useful as ground truth if it (a) accepts correct renders,
(b) rejects renders of *other* prompts on exactly the testpoint that differs,
and (c) gives ~0 to images with no content. Those are the checks below.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefgrpo_jax.toyworld import (
    BACKGROUND,
    COLOURS,
    DIMENSIONS,
    HELDOUT_COLOUR_SHAPE,
    NUMBERS,
    RELATIONS,
    SHAPES,
    SIZES,
    ObjectSpec,
    Scene,
    all_prompts,
    coverage,
    detect_objects,
    heldout_prompts,
    is_heldout,
    make_prompt,
    parse_prompt,
    prompt_pool,
    render,
    render_batch,
    sample_prompt,
    sample_scene,
    score_table,
    verify,
    verify_batch,
)
from prefgrpo_jax.toyworld import scenes as scenes_mod

N_PER_DIM = 200  # prompts per dimension in the accuracy checks


def _other(choices, current, rng):
    return str(rng.choice([c for c in choices if c != current]))


# ---------------------------------------------------------------------------
# Grammar and generators
# ---------------------------------------------------------------------------


def test_sampling_is_deterministic():
    a = [sample_prompt(s) for s in range(300)]
    b = [sample_prompt(s) for s in range(300)]
    assert a == b
    g1, g2 = np.random.default_rng(7), np.random.default_rng(7)
    assert [sample_prompt(g1) for _ in range(50)] == [sample_prompt(g2) for _ in range(50)]
    assert {p.dimension for p in a} == set(DIMENSIONS)
    for s, p in enumerate(a[:100]):
        assert sample_scene(p, s) == sample_scene(p, s)


@pytest.mark.parametrize("dim", DIMENSIONS)
def test_parse_roundtrip_every_prompt(dim):
    pool = all_prompts(dim)
    assert len({p.text for p in pool}) == len(pool)  # texts are unique
    for p in pool:
        assert p.dimension == dim
        assert parse_prompt(p.text) == p
    p = pool[len(pool) // 2]
    assert parse_prompt("  " + p.text.upper() + ". ") == p


def test_grammar_examples():
    assert parse_prompt("two red circles") == make_prompt("count", (ObjectSpec("circle", "red"),), count=2)
    assert parse_prompt("one blue square").count == 1
    sp = parse_prompt("a green triangle left of a yellow circle")
    assert sp.dimension == "position" and sp.relation == "left of"
    assert sp.objects == (ObjectSpec("triangle", "green"), ObjectSpec("circle", "yellow"))
    assert parse_prompt("a large blue square").objects[0] == ObjectSpec("square", "blue", "large")
    assert parse_prompt("a small triangle").dimension == "shape"
    assert parse_prompt("a red square and a blue circle").dimension == "binding"
    for bad in ["", "a red", "two red circle", "a red square and a red circle", "five red circles",
                "a red circle left of a red circle", "an orange circle", "a red circle near a blue square"]:
        with pytest.raises(ValueError):
            parse_prompt(bad)


_WORDS = ["a", "and", "of", *COLOURS, *SHAPES, *(s + "s" for s in SHAPES), *SIZES,
          *NUMBERS.values(), "left", "right", "above", "below"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_WORDS), min_size=1, max_size=9))
def test_parse_is_total_on_word_salad(words):
    """Any vocabulary word sequence either parses to a canonical spec or raises ValueError."""
    text = " ".join(words)
    try:
        spec = parse_prompt(text)
    except ValueError:
        return
    assert spec.text == text
    assert parse_prompt(spec.text) == spec


# ---------------------------------------------------------------------------
# Held-out split
# ---------------------------------------------------------------------------


def test_heldout_split_is_disjoint_and_covering():
    for d in DIMENSIONS:
        train, held = prompt_pool(d, "train"), prompt_pool(d, "heldout")
        assert train and held
        assert not {p.text for p in train} & {p.text for p in held}
        assert len(train) + len(held) == len(all_prompts(d))
        assert all(is_heldout(p) for p in held) and not any(is_heldout(p) for p in train)
    # Every word keeps training support; only combinations are new at evaluation.
    train_words = {w for d in DIMENSIONS for p in prompt_pool(d, "train") for w in p.text.split()}
    assert set(COLOURS) | set(SIZES) | set(SHAPES) | {"left", "right", "above", "below"} <= train_words
    for seed in range(2000):
        assert not is_heldout(sample_prompt(seed))
    assert all(is_heldout(sample_prompt(s, split="heldout")) for s in range(200))


def test_training_scenes_never_show_heldout_pairs():
    for seed in range(400):
        sp = sample_prompt(seed, "shape")  # colour left open: the sampler picks it
        for o in sample_scene(sp, seed).objects:
            assert (o.colour, o.shape) not in HELDOUT_COLOUR_SHAPE


def test_heldout_prompts_are_fixed():
    a = heldout_prompts(20)
    assert a == heldout_prompts(20)
    assert [p.dimension for p in a] == [d for d in DIMENSIONS for _ in range(20)]
    assert all(is_heldout(p) for p in a)
    for d in DIMENSIONS:  # distinct while the pool lasts, then cycling through it
        pool = prompt_pool(d, "heldout")
        assert len({p.text for p in a if p.dimension == d}) == min(20, len(pool))
    # Pinned: a change to the vocabulary, grammar, split or seed must be deliberate.
    digest = hashlib.sha256("\n".join(p.text for p in heldout_prompts(50)).encode()).hexdigest()
    assert digest[:16] == HELDOUT_DIGEST


HELDOUT_DIGEST = "3497e2288f9b7910"


# ---------------------------------------------------------------------------
# Scenes and renderer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dim", DIMENSIONS)
def test_scenes_match_their_prompt(dim):
    for seed in range(100):
        sp = sample_prompt(seed, dim)
        objs = sample_scene(sp, seed).objects
        assert len(objs) == sp.n_objects
        for o in objs:
            h = o.size / 2
            assert scenes_mod.MARGIN <= o.x - h and o.x + h <= 1 - scenes_mod.MARGIN
            assert scenes_mod.MARGIN <= o.y - h and o.y + h <= 1 - scenes_mod.MARGIN
            assert any(lo <= o.size <= hi for lo, hi in SIZES.values())
        for i in range(len(objs)):
            for j in range(i):
                assert scenes_mod._separated(objs[i], objs[j])
        want = sorted((o.shape, o.colour, o.size) for o in sp.objects for _ in range(sp.count))
        got = sorted(
            (o.shape, w.colour and o.colour, w.size and o.size_class)
            for o, w in zip(objs, [w for w in sp.objects for _ in range(sp.count)])
        )
        assert got == want
        if sp.relation is not None:
            assert scenes_mod._relation_holds(objs[0], objs[1], sp.relation)


def test_render_is_deterministic_and_well_formed():
    for seed in range(50):
        sp = sample_prompt(seed)
        a = render(sample_scene(sp, seed))
        b = render(sample_scene(sp, seed))
        assert a.dtype == np.float32 and a.shape == (32, 32, 3)
        assert a.tobytes() == b.tobytes()
        assert a.min() >= 0.0 and a.max() <= 1.0
        assert render(sample_scene(sp, seed), 64).shape == (64, 64, 3)
    empty = render(Scene(()))
    assert np.all(empty == np.asarray(BACKGROUND, np.float32))
    scenes = [sample_scene(sample_prompt(s), s) for s in range(8)]
    assert np.array_equal(render_batch(scenes), np.stack([render(s) for s in scenes]))


@pytest.mark.parametrize("size", [32, 64])
def test_coverage_matches_analytic_area(size):
    rng = np.random.default_rng(0)
    ideal = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
    for shape in SHAPES:
        for _ in range(20):
            s = float(rng.uniform(0.18, 0.38))
            o = scenes_mod.SceneObject(shape, "red", s, float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7)))
            cov, _, _ = coverage(o, size)
            area = cov.sum() / size**2
            # supersampling x4: error ~ perimeter * (1/(4*size)) at worst
            assert abs(area - ideal[shape] * s * s) < 4 * s / (4 * size) * 0.5 + 1e-4, (shape, s)


# ---------------------------------------------------------------------------
# Verifier: accuracy on correct renders
# ---------------------------------------------------------------------------


def _accuracy(dim: str, n: int, size: int, split: str, seed0: int = 0) -> float:
    ok = 0
    for i in range(n):
        sp = sample_prompt(seed0 + i, dim, split=split)
        ok += verify(render(sample_scene(sp, seed0 + i), size), sp)["score"] == 1.0
    return ok / n


@pytest.mark.parametrize("dim", DIMENSIONS)
def test_verifier_accepts_correct_renders(dim):
    assert _accuracy(dim, N_PER_DIM, 32, "train") >= 0.98
    assert _accuracy(dim, 40, 32, "heldout", seed0=10_000) >= 0.98
    assert _accuracy(dim, 40, 64, "train", seed0=20_000) >= 0.98


def test_detections_recover_the_scene():
    for seed in range(100):
        sc = sample_scene(sample_prompt(seed), seed)
        dets = detect_objects(render(sc))
        assert len(dets) == len(sc.objects)
        for o in sc.objects:
            cx, cy = o.centroid
            d = min(dets, key=lambda d: (d.x - cx) ** 2 + (d.y - cy) ** 2)
            assert (d.colour, d.shape, d.size_class) == (o.colour, o.shape, o.size_class)
            assert abs(d.x - cx) < 0.01 and abs(d.y - cy) < 0.01  # < 1/3 px at 32 px


# ---------------------------------------------------------------------------
# Verifier: renders of the wrong prompt fail the differing testpoint
# ---------------------------------------------------------------------------


def _fail_rate(results: list[dict[str, float]], kind: str) -> float:
    return float(np.mean([r[kind] < 1.0 for r in results]))


def test_wrong_colour_fails_colour_testpoint():
    rng = np.random.default_rng(1)
    res = []
    for seed in range(150):
        sp = sample_prompt(seed, "colour")
        o = sp.objects[0]
        wrong = make_prompt("colour", (dataclasses.replace(o, colour=_other(COLOURS, o.colour, rng)),))
        res.append(verify(render(sample_scene(wrong, seed, avoid_heldout=False)), sp))
    for seed in range(150):  # count prompts: repaint one of the N objects
        sp = sample_prompt(seed, "count")
        sc = sample_scene(sp, seed)
        objs = list(sc.objects)
        objs[0] = dataclasses.replace(objs[0], colour=_other(COLOURS, objs[0].colour, rng))
        r = verify(render(Scene(tuple(objs))), sp)
        assert r["count"] == 0.0  # one fewer object of the asked colour
        res.append(r)
    assert _fail_rate(res, "colour") >= 0.95


def test_wrong_shape_fails_shape_testpoint():
    rng = np.random.default_rng(2)
    res = []
    for seed in range(150):
        sp = sample_prompt(seed, ("colour", "shape")[seed % 2])
        o = sp.objects[0]
        wrong = make_prompt(sp.dimension, (dataclasses.replace(o, shape=_other(SHAPES, o.shape, rng)),))
        res.append(verify(render(sample_scene(wrong, seed, avoid_heldout=False)), sp))
    assert _fail_rate(res, "shape") >= 0.95


def test_wrong_size_fails_size_testpoint():
    res = []
    for seed in range(300):
        sp = sample_prompt(seed, ("colour", "shape")[seed % 2])
        o = sp.objects[0]
        if o.size is None:
            continue
        flipped = "small" if o.size == "large" else "large"
        wrong = make_prompt(sp.dimension, (dataclasses.replace(o, size=flipped),))
        res.append(verify(render(sample_scene(wrong, seed, avoid_heldout=False)), sp))
    assert len(res) > 100
    assert _fail_rate(res, "size") >= 0.95


def test_wrong_count_fails_count_testpoint():
    res = []
    for seed in range(200):
        sp = sample_prompt(seed, "count")
        n = sp.count + (1 if (seed % 2 and sp.count < 4) or sp.count == 1 else -1)
        wrong = make_prompt("count", sp.objects, count=n)
        res.append(verify(render(sample_scene(wrong, seed, avoid_heldout=False)), sp))
    assert _fail_rate(res, "count") >= 0.95


def test_swapped_relation_fails_position_testpoint():
    res, opposite = [], {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    for seed in range(200):
        sp = sample_prompt(seed, "position")
        if seed % 2:  # a scene for the opposite relation
            wrong = make_prompt("position", sp.objects, relation=opposite[sp.relation])
            sc = sample_scene(wrong, seed, avoid_heldout=False)
        else:  # the correct scene with the two objects' places exchanged
            a, b = sample_scene(sp, seed).objects
            sc = Scene((dataclasses.replace(a, x=b.x, y=b.y), dataclasses.replace(b, x=a.x, y=a.y)))
        r = verify(render(sc), sp)
        assert r["binding"] == 1.0  # both objects are still there
        res.append(r)
    assert _fail_rate(res, "position") >= 0.95


def test_swapped_binding_fails_binding_testpoints():
    for seed in range(150):
        sp = sample_prompt(seed, "binding")
        a, b = sp.objects
        swapped = make_prompt("binding", (dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour)))
        r = verify(render(sample_scene(swapped, seed, avoid_heldout=False)), sp)
        assert r["binding"] == 0.0 and r["score"] <= 1 / 3 + 1e-9


def test_noise_and_blank_score_about_zero():
    rng = np.random.default_rng(3)
    specs = [sample_prompt(s) for s in range(300)]
    noise = rng.uniform(size=(300, 32, 32, 3)).astype(np.float32)
    blank = np.broadcast_to(np.asarray(BACKGROUND, np.float32), (300, 32, 32, 3))
    assert verify_batch(noise, specs).mean() < 0.05
    assert verify_batch(blank, specs).max() == 0.0
    assert verify_batch(np.ones_like(noise), specs).max() == 0.0  # all white: one huge square-less blob


def test_extra_clutter_fails_count():
    """A correct object plus a second, unrequested one fails 'exactly one object'."""
    rng = np.random.default_rng(4)
    for seed in range(100):
        sp = sample_prompt(seed, "colour")
        a = sp.objects[0]
        other = ObjectSpec(_other(SHAPES, a.shape, rng), _other(COLOURS, a.colour, rng))
        extra = make_prompt("binding", (ObjectSpec(a.shape, a.colour), other))
        r = verify(render(sample_scene(extra, seed, avoid_heldout=False)), sp)
        assert r["count"] == 0.0 and r["colour"] == 1.0 and r["shape"] == 1.0


# ---------------------------------------------------------------------------
# Batched scoring and aggregation
# ---------------------------------------------------------------------------


def test_verify_batch_and_text_specs_agree_with_verify():
    specs = [sample_prompt(s) for s in range(40)]
    # Half the images are for the wrong prompt, so scores are not all 1.
    imgs = render_batch([sample_scene(specs[(i + i % 2) % 40], i) for i in range(40)])
    want = np.asarray([verify(im, sp)["score"] for im, sp in zip(imgs, specs)], np.float32)
    np.testing.assert_array_equal(verify_batch(imgs, specs), want)
    np.testing.assert_array_equal(verify_batch(imgs, [s.text for s in specs]), want)
    assert 0.0 < want.mean() < 1.0


def test_score_table_is_unweighted_over_dimensions():
    specs = [sample_prompt(0, "colour")] * 3 + [sample_prompt(0, "count")]
    table = score_table([1.0, 1.0, 1.0, {"score": 0.0}], specs)
    assert table == {"colour": 1.0, "count": 0.0, "overall": 0.5}  # not 0.75: dimensions weigh equally
    assert score_table([0.5], [specs[0].text]) == {"colour": 0.5, "overall": 0.5}
    with pytest.raises(ValueError):
        score_table([1.0], specs)


def test_relations_vocabulary_is_complete():
    # every relation is used by the position pool, in both split halves
    for split in ("train", "heldout"):
        assert {p.relation for p in prompt_pool("position", split)} == set(RELATIONS)

"""Pairwise preference reward model: antisymmetry, vectorised scoring, one backbone
pass per image, training, save/load, sharded scoring, CLIP backbone, CLI.

Everything runs on tiny configs (8-16 px images, widths <= 32) on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from prefgrpo_jax.convert import WeightMismatchError
from prefgrpo_jax.rewards import pairwise as pw
from prefgrpo_jax.rewards import train_reward as tr

REPO = Path(__file__).resolve().parents[1]
# One tiny config for (nearly) every test: model builds and compilations are cached
# per shape, so sharing shapes keeps this file fast.
TOY = pw.ToyBackboneConfig(vocab_size=12, channels=(8,), embed_dim=16, bigram_buckets=16,
                           feature_dim=24)
WORDS = ["more", "red", "green", "blue", "please"]


def toy_model(kind="pairwise", seed=0, hidden=16, toy=TOY, depth=1):
    cfg = pw.RewardModelConfig(kind=kind, backbone="toy", hidden=hidden, depth=depth, toy=toy)
    return pw.build_reward_model(cfg, rngs=nnx.Rngs(seed))


# fns is hashable (graphdef + kind): models with equal configs share compilations.
group_reward = jax.jit(lambda fns, *args: fns.group_reward(*args), static_argnums=0)
logit_matrix = jax.jit(lambda fns, *args: fns.logit_matrix(*args), static_argnums=0)
preference_matrix = jax.jit(lambda fns, *args: fns.preference_matrix(*args), static_argnums=0)
pair_logits = jax.jit(lambda fns, *args: fns.pair_logits(*args), static_argnums=0)


def random_groups(n=3, g=5, size=8, t=6, seed=0, vocab=TOY.vocab_size):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (n, t)).astype(np.int32)
    mask = (np.arange(t)[None] < rng.integers(2, t + 1, (n, 1))).astype(np.int32)
    images = rng.uniform(size=(n, g, size, size, 3)).astype(np.float32)
    return ids, mask, images


# --------------------------------------------------------------------------- #
# Antisymmetry, diagonal, vectorised == loop
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])
def test_antisymmetry_exact(seed, scale):
    model = toy_model(seed=seed)
    fns, params = pw.split_reward_model(model)
    rng = np.random.default_rng(seed + 10)
    n, g, d = 4, 7, TOY.feature_dim
    p = jnp.asarray(scale * rng.normal(size=(n, d)), jnp.float32)
    f = jnp.asarray(scale * rng.normal(size=(n, g, d)), jnp.float32)
    L = np.asarray(logit_matrix(fns, params, p, f))
    P = np.asarray(preference_matrix(fns, params, p, f))
    assert P.dtype == np.float32 and P.shape == (n, g, g)
    np.testing.assert_array_equal(L, -np.swapaxes(L, 1, 2))  # bitwise
    np.testing.assert_array_equal(P + np.swapaxes(P, 1, 2), np.ones_like(P))  # bitwise
    np.testing.assert_array_equal(np.diagonal(P, axis1=1, axis2=2), 0.5)
    assert np.all((P >= 0) & (P <= 1))
    assert np.std(P) > 1e-4  # not trivially 0.5 everywhere
    # per-pair function: swapping a and b negates the logit exactly
    la = np.asarray(pair_logits(fns, params, p, f[:, 0], f[:, 1]))
    lb = np.asarray(pair_logits(fns, params, p, f[:, 1], f[:, 0]))
    np.testing.assert_array_equal(la, -lb)


def test_probs_from_logits_exact_complement():
    x = jnp.asarray(np.random.default_rng(0).normal(scale=5.0, size=10_000), jnp.float32)
    x = jnp.concatenate([x, jnp.asarray([0.0, -0.0, 1e-30, -1e-30, 80.0, -80.0])])
    a, b = np.asarray(pw.probs_from_logits(x)), np.asarray(pw.probs_from_logits(-x))
    np.testing.assert_array_equal(a + b, np.ones_like(a))
    np.testing.assert_allclose(a, np.asarray(jax.nn.sigmoid(x)), atol=1e-7)
    assert pw.probs_from_logits(jnp.zeros(())) == 0.5


def test_head_is_not_a_pointwise_difference():
    """logit(a,b) + logit(b,c) != logit(a,c) in general (a BT model would be additive)."""
    model = toy_model(seed=3)
    rng = np.random.default_rng(0)
    p = jnp.asarray(rng.normal(size=(64, TOY.feature_dim)), jnp.float32)
    a, b, c = (jnp.asarray(rng.normal(size=(64, TOY.feature_dim)), jnp.float32)
               for _ in range(3))
    gap = model.pair_logits(p, a, b) + model.pair_logits(p, b, c) - model.pair_logits(p, a, c)
    assert float(jnp.max(jnp.abs(gap))) > 1e-3


@pytest.mark.parametrize("kind", ["pairwise", "pointwise"])
def test_vectorised_equals_loop(kind):
    model = toy_model(kind, seed=4)
    fns, params = pw.split_reward_model(model)
    rng = np.random.default_rng(1)
    n, g, d = 2, 4, TOY.feature_dim
    p = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    f = jnp.asarray(rng.normal(size=(n, g, d)), jnp.float32)
    P = np.asarray(preference_matrix(fns, params, p, f))
    pair = partial(pair_logits, fns)  # one pair at a time: called n*g*(g-1) times
    loop = np.full((n, g, g), 0.5, np.float32)
    for b in range(n):
        for i in range(g):
            for j in range(g):
                if i != j:
                    logit = pair(params, p[b:b + 1], f[b, i:i + 1], f[b, j:j + 1])[0]
                    loop[b, i, j] = 1.0 / (1.0 + np.exp(-np.float64(logit)))
    np.testing.assert_allclose(P, loop, atol=2e-6, rtol=0)
    if kind == "pointwise":  # Bradley-Terry on the scores
        s = np.asarray(fns.scores(params, p, f), np.float64)
        np.testing.assert_allclose(P, 1 / (1 + np.exp(s[:, None, :] - s[:, :, None])), atol=2e-6)
        score = jax.jit(lambda params, p, f: fns.merge(params).score(p, f))
        for b in range(n):
            for i in range(g):
                np.testing.assert_allclose(s[b, i], score(params, p[b], f[b, i]), atol=1e-5)


@pytest.mark.parametrize("kind", ["pairwise", "pointwise"])
def test_group_reward_from_images(kind):
    model = toy_model(kind, seed=5)
    fns, params = pw.split_reward_model(model)
    ids, mask, images = random_groups(n=2, g=4)
    out = group_reward(fns, params, ids, mask, images)

    @jax.jit
    def separately(params, ids, mask, images):  # encode, then score the features
        p = fns.encode_prompts(params, ids, mask)
        f = fns.encode_images(params, images.reshape(8, 8, 8, 3)).reshape(2, 4, -1)
        return p, f, fns.reward_from_features(params, p, f)

    p, f, ref = separately(params, ids, mask, images)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    if kind == "pairwise":
        chex.assert_shape(out, (2, 4, 4))
        np.testing.assert_array_equal(out + jnp.swapaxes(out, 1, 2), 1.0)
        with pytest.raises(TypeError, match="pointwise"):
            fns.scores(params, p, f)
    else:
        chex.assert_shape(out, (2, 4))


def test_jit_traces_once_per_shape():
    fns, params = pw.split_reward_model(toy_model(seed=6))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def score(params, ids, mask, images):
        return fns.group_reward(params, ids, mask, images)

    for seed in range(3):
        ids, mask, images = random_groups(seed=seed)
        chex.assert_tree_all_finite(score(params, ids, mask, images))


# --------------------------------------------------------------------------- #
# The backbone runs once per image, not once per pair
# --------------------------------------------------------------------------- #


class CountingBackbone(nnx.Module):
    """Delegates to a backbone; counts encode_images calls and images (Python side)."""

    def __init__(self, inner):
        self.inner = inner
        self.feature_dim = inner.feature_dim
        self.counts = {"calls": 0, "images": 0}  # plain dict: static, not state

    def encode_images(self, images):
        self.counts["calls"] += 1
        self.counts["images"] += images.shape[0]
        return self.inner.encode_images(images)

    def encode_prompts(self, ids, mask):
        return self.inner.encode_prompts(ids, mask)


def _count_primitive(jaxpr, name: str) -> list:
    """All equations named ``name`` in a closed jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            found.append(eqn)
        for v in eqn.params.values():
            for s in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(s, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    found += _count_primitive(inner, name)
                elif hasattr(s, "eqns"):
                    found += _count_primitive(s, name)
    return found


def test_backbone_runs_once_per_image_python_count():
    rngs = nnx.Rngs(0)
    counting = CountingBackbone(pw.ToyBackbone(TOY, rngs=rngs))
    model = pw.PairwiseRewardModel(counting, pw.PairwiseHead(TOY.feature_dim, 16, rngs=rngs))
    n, g = 3, 6
    ids, mask, images = random_groups(n=n, g=g)
    # the pure-functional, jitted path; Python runs (and counts) once, while tracing
    fns, params = pw.split_reward_model(model)
    P = jax.jit(fns.group_reward)(params, ids, mask, images)
    chex.assert_shape(P, (n, g, g))
    assert counting.counts == {"calls": 1, "images": n * g}  # not n * g * (g - 1)


def test_backbone_runs_once_per_image_jaxpr():
    fns, params = pw.split_reward_model(toy_model(seed=1))
    n, g = 3, 6
    ids, mask, images = random_groups(n=n, g=g)
    closed = jax.make_jaxpr(fns.group_reward)(params, ids, mask, images)
    convs = _count_primitive(closed.jaxpr, "conv_general_dilated")
    assert len(convs) == len(TOY.channels)  # each conv layer appears once ...
    for eqn in convs:  # ... on one batch holding every image of every group once
        assert eqn.invars[0].aval.shape[0] == n * g


# --------------------------------------------------------------------------- #
# Training on synthetic separable data
# --------------------------------------------------------------------------- #


def synthetic_pairs(n, seed, size=16, margin=0.03):
    """Prompt "more <colour> please"; the preferred image has more of that colour.

    Labels come from the images themselves (channel means), with a tie band of
    +-margin (label 0.5: in the loss, not in the accuracy).
    """
    rng = np.random.default_rng(seed)
    ch = rng.integers(0, 3, n)
    prompts = [f"more {WORDS[1 + c]} please" for c in ch]
    imgs = rng.uniform(0, 0.6, (2, n, size, size, 3)).astype(np.float32)
    for k in range(2):
        imgs[k, np.arange(n), :, :, ch] += rng.uniform(0, 0.4, n)[:, None, None]
    means = np.stack([imgs[k][np.arange(n), :, :, ch].mean(axis=(1, 2)) for k in range(2)])
    d = means[0] - means[1]
    label = np.where(d > margin, 1.0, np.where(d < -margin, 0.0, 0.5)).astype(np.float32)
    ids, mask = pw.WordTokenizer(WORDS, max_len=4)(prompts)
    return tr.PairArrays(ids, mask, imgs[0], imgs[1], label), prompts


@pytest.mark.parametrize("kind,train_backbone", [("pairwise", True), ("pointwise", True)])
def test_training_reaches_95_percent(kind, train_backbone):
    train, _ = synthetic_pairs(2000, seed=0)
    held_out, _ = synthetic_pairs(400, seed=1)
    assert 0.05 < np.mean(held_out.label == 0.5) < 0.3  # ties exist and are excluded
    model = toy_model(kind, seed=0)
    before = tr.evaluate_pairs(model, held_out)
    cfg = tr.TrainConfig(steps=300, batch_size=64, learning_rate=3e-3,
                         train_backbone=train_backbone, log_every=100)
    res = tr.train_reward_model(model, train, held_out, cfg, log=None)
    acc = res.eval_metrics["accuracy"]
    print(f"{kind} train_backbone={train_backbone}: held-out accuracy {before['accuracy']:.3f}"
          f" -> {acc:.3f} ({res.eval_metrics['n_counted']} non-tie pairs), {res.wall_s:.1f} s")
    assert res.eval_metrics["n_counted"] == int(np.sum(held_out.label != 0.5))
    assert acc >= 0.95
    assert res.history[-1]["eval/accuracy"] == pytest.approx(acc)
    # the input model is untouched (the step donates copies) and still scores as before
    assert tr.evaluate_pairs(model, held_out) == before


def _cycle_pairs(n, seed, size=8):
    """Intransitive preferences red > green > blue > red on near-solid images."""
    rng = np.random.default_rng(seed)
    colours = np.eye(3, dtype=np.float32) * 0.8
    ca = rng.integers(0, 3, n)
    cb = (ca + rng.integers(1, 3, n)) % 3
    def img(c):
        return np.clip(colours[c][:, None, None, :]
                       + rng.normal(0, 0.05, (n, size, size, 3)), 0, 1).astype(np.float32)
    label = ((cb - ca) % 3 == 1).astype(np.float32)  # c beats c+1 (mod 3)
    ids = np.ones((n, 2), np.int32)
    return tr.PairArrays(ids, np.ones_like(ids), img(ca), img(cb), label)


def test_pairwise_learns_intransitive_preferences_pointwise_cannot():
    train, held_out = _cycle_pairs(600, 0), _cycle_pairs(300, 1)
    # frozen random backbone: features computed once, only the heads are trained
    cfg = tr.TrainConfig(steps=300, batch_size=64, learning_rate=1e-2, log_every=0,
                         train_backbone=False)
    acc = {}
    for kind in ("pairwise", "pointwise"):
        model = toy_model(kind, seed=0)
        res = tr.train_reward_model(model, train, held_out, cfg, log=None)
        acc[kind] = res.eval_metrics["accuracy"]
        chex.assert_trees_all_equal(nnx.state(res.model.backbone, nnx.Param),
                                    nnx.state(model.backbone, nnx.Param))
    print(acc)
    assert acc["pairwise"] >= 0.95
    assert acc["pointwise"] <= 0.75  # a score can order at most 2 of the 3 edges of a cycle


def test_accuracy_excludes_ties_and_counts_zero_logit_half():
    logits = np.asarray([2.0, -1.0, 0.0, 3.0, -2.0], np.float32)
    labels = np.asarray([1.0, 1.0, 0.0, 0.5, 0.2], np.float32)
    correct, counted = tr._accuracy_counts(logits, labels)
    assert counted == 4 and correct == 2.5


def test_pair_arrays_validation():
    ids = np.zeros((2, 3), np.int32)
    img = np.zeros((2, 4, 4, 3), np.float32)
    with pytest.raises(ValueError, match="labels must lie in"):
        tr.PairArrays(ids, ids, img, img, [0.0, 1.5])
    with pytest.raises(ValueError, match="image_b"):
        tr.PairArrays(ids, ids, img, img[:, :2], [0.0, 1.0])
    train, held = tr.split_pairs(tr.PairArrays(np.zeros((10, 3)), np.zeros((10, 3)),
                                               np.zeros((10, 4, 4, 3)), np.zeros((10, 4, 4, 3)),
                                               np.linspace(0, 1, 10)), 0.2, seed=0)
    assert (len(train), len(held)) == (8, 2)
    assert sorted(np.concatenate([train.label, held.label])) == pytest.approx(
        np.linspace(0, 1, 10))


# --------------------------------------------------------------------------- #
# Save / load
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kind", ["pairwise", "pointwise"])
def test_save_load_round_trip(kind, tmp_path):
    model = toy_model(kind, seed=7)
    tok = pw.WordTokenizer(["a", "red", "circle"], max_len=6)
    pw.save_reward_model(model, tmp_path, tokenizer=tok, extra={"heldout_accuracy": 0.9})
    meta = json.loads((tmp_path / pw.CONFIG_FILE).read_text())
    assert meta["config"]["kind"] == kind and meta["extra"]["heldout_accuracy"] == 0.9
    names = set(load_file(str(tmp_path / pw.WEIGHTS_FILE)))
    assert "head.mlp.out.kernel" in names and "backbone.convs.0.kernel" in names
    loaded, tok2 = pw.load_reward_model(tmp_path)
    assert loaded.kind == kind and loaded.config == model.config
    assert tok2.vocab == tok.vocab and tok2.max_len == 6
    ids, mask, images = random_groups(n=2, g=3, vocab=tok.vocab_size)
    (fa, pa), (fb, pb) = pw.split_reward_model(model), pw.split_reward_model(loaded)
    assert fa == fb  # same graph: one compilation scores both
    np.testing.assert_array_equal(group_reward(fa, pa, ids, mask, images),
                                  group_reward(fb, pb, ids, mask, images))
    np.testing.assert_array_equal(tok(["A red circle!", "blue"])[0],
                                  tok2(["A red circle!", "blue"])[0])


def test_load_rejects_bad_tensors(tmp_path):
    model = toy_model(seed=8)
    pw.save_reward_model(model, tmp_path)
    path = tmp_path / pw.WEIGHTS_FILE
    good = load_file(str(path))

    bad = dict(good)
    bad["head.mlp.out.kernel"] = np.zeros((3, 1), np.float32)
    save_file(bad, str(path))
    with pytest.raises(WeightMismatchError, match=r"shape mismatch.*head\.mlp\.out\.kernel"):
        pw.load_reward_model(tmp_path)

    bad = dict(good)
    del bad["backbone.img_out.bias"]
    bad["head.extra"] = np.zeros(2, np.float32)
    save_file(bad, str(path))
    with pytest.raises(WeightMismatchError) as e:
        pw.load_reward_model(tmp_path)
    assert "backbone.img_out.bias" in str(e.value) and "head.extra" in str(e.value)

    save_file(good, str(path))
    pw.load_reward_model(tmp_path)  # the untouched file loads


def test_word_tokenizer():
    tok = pw.WordTokenizer.from_texts(["A red circle", "two blue squares"], max_len=3)
    assert tok.vocab == ["a", "blue", "circle", "red", "squares", "two"]
    ids, mask = tok(["a red circle left of", "green"])
    np.testing.assert_array_equal(ids, [[2, 5, 4], [1, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])
    with pytest.raises(TypeError):
        tok("a red circle")


# --------------------------------------------------------------------------- #
# Sharded scoring (4 forced CPU devices, in a subprocess)
# --------------------------------------------------------------------------- #

_SHARDED_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import re
    import jax, numpy as np
    from jax.sharding import AxisType
    from prefgrpo_jax.rewards import pairwise as pw
    assert jax.device_count() == 4
    # (kind, mesh axis types, group axis, image axis)
    cases = [("pairwise", AxisType.Explicit, "data", "img"),
             ("pairwise", AxisType.Auto, "data", None),
             ("pairwise", AxisType.Explicit, None, "img"),
             ("pointwise", AxisType.Auto, "data", "img")]
    rng = np.random.default_rng(0)
    n, g = 4, 6
    ids = rng.integers(0, 20, (n, 5)).astype(np.int32)
    mask = np.ones_like(ids)
    imgs = rng.uniform(size=(n, g, 8, 8, 3)).astype(np.float32)
    models = {}
    for kind in ("pairwise", "pointwise"):
        cfg = pw.RewardModelConfig(kind=kind, hidden=16, depth=1, toy=pw.ToyBackboneConfig(
            vocab_size=20, channels=(8,), embed_dim=8, feature_dim=16, bigram_buckets=8))
        fns, params = pw.split_reward_model(pw.build_reward_model(cfg))
        models[kind] = fns, params, np.asarray(jax.jit(fns.group_reward)(params, ids, mask,
                                                                          imgs))
    for kind, types, ga, ia in cases:
        fns, params, ref = models[kind]
        mesh = jax.make_mesh((2, 2), ("data", "img"), axis_types=(types, types))
        sc = pw.make_sharded_group_scorer(fns, mesh, group_axis=ga, image_axis=ia)
        compiled = sc.lower(params, ids, mask, imgs).compile()
        out = np.asarray(compiled(params, ids, mask, imgs))
        assert out.shape == ref.shape, (out.shape, ref.shape)
        np.testing.assert_allclose(out, ref, atol=1e-6)
        if kind == "pairwise":
            np.testing.assert_array_equal(out + out.transpose(0, 2, 1), 1.0)
        gathers = [l for l in compiled.as_text().splitlines() if " all-gather(" in l]
        assert bool(gathers) == (ia is not None), gathers
        for l in gathers:  # features [N_local, G, D=16] move between devices, never images
            shape = re.search(r"= f32\\[([0-9,]+)\\]", l).group(1).split(",")
            assert shape[1:] == ["6", "16"], l
    print("SHARDED_OK")
""")


def test_sharded_group_scorer_matches_and_gathers_only_features():
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SHARDED_OK" in proc.stdout


# --------------------------------------------------------------------------- #
# Command line (data through data.py's TFDS preference-pair builder)
# --------------------------------------------------------------------------- #


def _write_pair_files(root: Path, n: int = 160, size: int = 16) -> Path:
    from PIL import Image

    pairs, prompts = synthetic_pairs(n, seed=5, size=size)
    (root / "imgs").mkdir(parents=True)
    lines = []
    for i in range(n):
        for k, arr in (("a", pairs.image_a[i]), ("b", pairs.image_b[i])):
            u8 = np.clip(np.rint(arr * 255), 0, 255).astype(np.uint8)
            Image.fromarray(u8).save(root / "imgs" / f"{i}_{k}.png")
        lines.append(json.dumps({"prompt": prompts[i], "image_a": f"{i}_a.png",
                                 "image_b": f"{i}_b.png", "label": float(pairs.label[i])}))
    path = root / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_trains_saves_and_reports(tmp_path):
    data = _write_pair_files(tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "prefgrpo_jax.rewards.train_reward", f"--data={data}",
           f"--images={tmp_path / 'imgs'}", f"--out={out}", "--steps=10", "--model=pairwise",
           "--backbone=toy", "--batch_size=32", "--image_size=16", "--hidden=16",
           "--log_every=5", "--eval_fraction=0.25"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 5:" in proc.stdout and "final held-out accuracy:" in proc.stdout
    model, tok = pw.load_reward_model(out)
    meta = json.loads((out / pw.CONFIG_FILE).read_text())
    assert 0.0 <= meta["extra"]["heldout_accuracy"] <= 1.0
    assert meta["extra"]["train_pairs"] == 120
    ids, mask = tok(["more red please"])
    fns, params = pw.split_reward_model(model)
    P = group_reward(fns, params, ids, mask, np.random.default_rng(0).uniform(
        size=(1, 3, 16, 16, 3)).astype(np.float32))
    assert P.shape == (1, 3, 3)
    assert json.loads((out / "history.json").read_text())[-1]["step"] == 10

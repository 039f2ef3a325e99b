"""Reward registry: per-source group advantages and their mix against hand-computed
values, errors, custom sources, the in-graph model sources (toy and CLIP
backbones) and the CLIP score source."""

from __future__ import annotations

import math
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from prefgrpo_jax.rewards import advantages as adv_lib
from prefgrpo_jax.rewards import pairwise as pw
from prefgrpo_jax.rewards import registry as reg
from prefgrpo_jax.rewards import train_reward as tr

# Two groups of three. Group 0: a strict order 0 > 1 > 2; group 1: 0 ~ 1 (tie), both beat 2.
P = np.asarray([
    [[0.5, 1.0, 1.0], [0.0, 0.5, 1.0], [0.0, 0.0, 0.5]],
    [[0.5, 0.5, 1.0], [0.5, 0.5, 1.0], [0.0, 0.0, 0.5]],
], np.float32)
WIN = np.asarray([[1.0, 0.5, 0.0], [0.75, 0.75, 0.0]])
SCORES = np.asarray([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]], np.float32)  # group 1: all equal
# ddof=1 by hand: group 0 win rates have mean .5 and std .5; group 1 mean .5, std sqrt(.1875)
ADV_P = np.asarray([[1.0, 0.0, -1.0], [0.25, 0.25, -0.5] / np.sqrt(0.1875)])
ADV_S = np.asarray([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])  # all-equal group -> 0, not NaN
KINDS = {"judge": "pairwise", "clip": "pointwise"}


def _fake_sources():
    return {
        "judge": lambda **kw: reg.pairwise_source("judge", lambda prompts, images: P),
        "clip": lambda **kw: reg.pointwise_source("clip", lambda prompts, images: SCORES),
    }


IMAGES = np.zeros((2, 3, 4, 4, 3), np.float32)
PROMPTS = ["a", "b"]


def test_hand_computed_advantages_and_mix():
    out = reg.advantages_from_outputs({"judge": P, "clip": SCORES}, KINDS,
                                      {"judge": 0.4, "clip": 0.6}, ddof=1, adv_clip_max=None)
    np.testing.assert_allclose(out.rewards["judge"], WIN, atol=1e-7)
    np.testing.assert_allclose(out.rewards["clip"], SCORES)
    np.testing.assert_allclose(out.source_advantages["judge"], ADV_P, atol=1e-6)
    np.testing.assert_allclose(out.source_advantages["clip"], ADV_S, atol=1e-6)
    np.testing.assert_allclose(out.advantages, 0.4 * ADV_P + 0.6 * ADV_S, atol=1e-6)
    np.testing.assert_allclose(out.advantages[0], [-0.2, 0.0, 0.2], atol=1e-6)
    d = {k: float(v) for k, v in out.diagnostics.items()}
    assert d["judge/win_rate_mean"] == pytest.approx(0.5)
    assert d["judge/tie_frac"] == pytest.approx(2 / 12)
    assert d["judge/group_std"] == pytest.approx((0.5 + math.sqrt(0.1875)) / 2, abs=1e-6)
    assert d["judge/adv_spread"] == pytest.approx((2.0 + 0.75 / math.sqrt(0.1875)) / 2, abs=1e-5)
    assert d["judge/reward_mean"] == pytest.approx(0.5)
    assert d["clip/reward_mean"] == pytest.approx(3.5)
    assert d["clip/reward_std"] == pytest.approx(np.std(SCORES))
    assert d["clip/group_std"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert d["clip/adv_abs_max"] == pytest.approx(1.0, abs=1e-6)
    assert "clip/win_rate_mean" not in d
    assert d["advantage/clip_frac"] == 0.0


def test_ddof_zero_and_clipping():
    out = reg.advantages_from_outputs({"judge": P[:1]}, {"judge": "pairwise"}, {"judge": 3.0},
                                      ddof=0, adv_clip_max=2.0)
    a = 3.0 * 0.5 / math.sqrt(1 / 6)  # population std of [1, .5, 0] is sqrt(1/6)
    assert a > 2.0
    np.testing.assert_allclose(out.source_advantages["judge"], [[a / 3, 0.0, -a / 3]],
                               atol=1e-6)
    np.testing.assert_allclose(out.advantages, [[2.0, 0.0, -2.0]], atol=1e-6)
    assert float(out.diagnostics["advantage/clip_frac"]) == pytest.approx(2 / 3)
    assert float(out.diagnostics["advantage/abs_max"]) == pytest.approx(2.0)


def test_paper_worked_example():
    """MISSION.md: HPS scores vs win rates, with the population std (ddof=0)."""
    hps = np.asarray([[0.3457, 0.3530, 0.3496, 0.3494]], np.float32)
    ranks = np.asarray([[0, 2, 3, 1]], np.float32)  # win rates [0, .67, 1, .33]
    out = reg.advantages_from_outputs(
        {"hps": hps, "pref": adv_lib.preferences_from_scores(ranks)},
        {"hps": "pointwise", "pref": "pairwise"}, {"hps": 0.0, "pref": 1.0}, ddof=0)
    np.testing.assert_allclose(out.rewards["pref"], [[0, 2 / 3, 1, 1 / 3]], atol=1e-6)
    np.testing.assert_allclose(out.source_advantages["hps"], [[-1.44, 1.38, 0.07, -0.01]],
                               atol=0.015)
    np.testing.assert_allclose(out.source_advantages["pref"], [[-1.34, 0.45, 1.34, -0.45]],
                               atol=0.01)
    np.testing.assert_allclose(out.advantages, out.source_advantages["pref"], atol=1e-6)
    assert float(out.diagnostics["hps/group_std"]) < 0.003  # the illusory-advantage setting


def test_from_outputs_is_jittable():
    mix = reg.build_reward_mix({"judge": 0.4, "clip": 0.6}, factories=_fake_sources(),
                               adv_clip_max=5.0)
    eager = mix.from_outputs({"judge": P, "clip": SCORES})
    jitted = jax.jit(mix.from_outputs)({"judge": jnp.asarray(P), "clip": jnp.asarray(SCORES)})
    chex.assert_trees_all_close(jitted, eager, atol=1e-6)


def test_mix_calls_sources_and_reports():
    mix = reg.build_reward_mix({"judge": 0.4, "clip": 0.6}, factories=_fake_sources(), ddof=1,
                               adv_clip_max=5.0)
    out = mix(PROMPTS, IMAGES)
    np.testing.assert_allclose(out.advantages, 0.4 * ADV_P + 0.6 * ADV_S, atol=1e-6)
    assert all(isinstance(v, float) for v in out.diagnostics.values())
    assert {"judge/time_s", "clip/time_s", "judge/win_rate_mean"} <= set(out.diagnostics)
    with pytest.raises(ValueError, match="2 prompts for 1 groups"):
        mix(PROMPTS, IMAGES[:1])
    with pytest.raises(ValueError, match=r"\[N, G, H, W, 3\]"):
        mix(PROMPTS, IMAGES[:, 0])


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError) as e:
        reg.build_reward_mix({"pairwise_modle": 1.0})
    msg = str(e.value)
    assert "pairwise_modle" in msg
    for known in ("clip", "pairwise_model", "pointwise_model", "vlm_judge"):
        assert known in msg


def test_spec_validation():
    f = _fake_sources()
    for bad in ({}, {"judge": -1.0}, {"judge": float("nan")}, {"judge": True},
                {"judge": "1"}, {"judge": 0.0}):
        with pytest.raises(ValueError):
            reg.build_reward_mix(bad, factories=f)
    with pytest.raises(ValueError, match="does not use"):
        reg.build_reward_mix({"judge": 1.0}, {"clip": {}}, factories=f)
    # weight 0: computed for its diagnostics, no effect on the advantage
    out = reg.build_reward_mix({"judge": 1.0, "clip": 0.0}, factories=f, ddof=1)(PROMPTS, IMAGES)
    np.testing.assert_allclose(out.advantages, ADV_P, atol=1e-6)
    assert "clip/group_std" in out.diagnostics


def test_config_dict_spec_and_options():
    seen = {}

    def factory(**kw):
        seen.update(kw)
        return reg.pointwise_source("verifier", lambda prompts, images: SCORES)

    spec = ml_collections.ConfigDict({"verifier": 1.0})
    options = ml_collections.ConfigDict({"verifier": {"threshold": 0.5, "nested": {"a": 1}}})
    mix = reg.build_reward_mix(spec, options, factories={"verifier": factory}, ddof=1)
    assert seen == {"threshold": 0.5, "nested": {"a": 1}}
    np.testing.assert_allclose(mix(PROMPTS, IMAGES).advantages, ADV_S, atol=1e-6)


def test_register_reward():
    # A name no module registers: other tests import prefgrpo_jax.toyworld.reward,
    # which adds 'verifier' to the global registry.
    factories = dict(reg.REWARD_FACTORIES)
    custom = lambda **kw: reg.pointwise_source("custom_score", lambda prompts, images: SCORES)
    reg.register_reward("custom_score", custom, factories=factories)
    assert "custom_score" in reg.known_rewards(factories)
    assert "custom_score" not in reg.REWARD_FACTORIES  # the global registry is untouched
    with pytest.raises(ValueError, match="already registered"):
        reg.register_reward("custom_score", custom, factories=factories)
    reg.register_reward("custom_score", custom, factories=factories, overwrite=True)
    for bad in ("", "a/b", None):
        with pytest.raises(ValueError):
            reg.register_reward(bad, custom, factories=factories)
    with pytest.raises(TypeError):
        reg.register_reward("x", 3, factories=factories)
    with pytest.raises(TypeError, match="not a RewardSource"):
        reg.build_reward_mix({"x": 1.0}, factories={"x": lambda: "nope"})


def test_source_output_is_checked():
    wrong = reg.pairwise_source("j", lambda prompts, images: P[:, :2, :2])
    with pytest.raises(ValueError, match=r"'j' \(pairwise\) returned shape \(2, 2, 2\)"):
        wrong(PROMPTS, IMAGES)
    nan = reg.pointwise_source("s", lambda prompts, images: np.full((2, 3), np.nan))
    with pytest.raises(ValueError, match="NaN"):
        nan(PROMPTS, IMAGES)
    with pytest.raises(ValueError, match="kind"):
        reg.RewardSource("x", "scalar", lambda p, i: None)
    with pytest.raises(ValueError, match="disagree"):
        reg.advantages_from_outputs({"a": P, "b": SCORES[:, :2]},
                                    {"a": "pairwise", "b": "pointwise"}, {"a": 1.0, "b": 1.0})


def test_vlm_judge_source():
    class FakeJudge:
        def __init__(self):
            self.calls = []

        def preference_matrix(self, prompts, images):
            self.calls.append((list(prompts), np.shape(images)))
            return P

    judge = FakeJudge()
    mix = reg.build_reward_mix({"vlm_judge": 1.0}, {"vlm_judge": {"judge": judge}}, ddof=1)
    out = mix(PROMPTS, IMAGES)
    assert judge.calls == [(PROMPTS, IMAGES.shape)]
    np.testing.assert_allclose(out.advantages, ADV_P, atol=1e-6)
    # built from keywords: an unreachable judge raises instead of giving all-0.5 rewards
    from prefgrpo_jax.rewards.judge import JudgeUnavailableError

    mix = reg.build_reward_mix({"vlm_judge": 1.0}, {"vlm_judge": {
        "base_url": "http://127.0.0.1:9", "model": "m", "retries": 0, "timeout_s": 2.0}})
    assert mix.sources["vlm_judge"].kind == "pairwise"
    with pytest.raises(JudgeUnavailableError):
        mix(["a"], np.zeros((1, 2, 4, 4, 3), np.float32))


# --------------------------------------------------------------------------- #
# In-graph model sources
# --------------------------------------------------------------------------- #

TOY = pw.ToyBackboneConfig(vocab_size=12, channels=(8,), embed_dim=16, bigram_buckets=16,
                           feature_dim=24)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    tok = pw.WordTokenizer(["a", "red", "blue", "circle", "square"], max_len=5)
    out = {}
    for kind in ("pairwise", "pointwise"):
        model = pw.build_reward_model(pw.RewardModelConfig(kind=kind, hidden=16, depth=1,
                                                           toy=TOY), rngs=nnx.Rngs(3))
        d = tmp_path_factory.mktemp(kind)
        pw.save_reward_model(model, d, tokenizer=tok)
        out[kind] = (d, model)
    return tok, out


@pytest.mark.parametrize("kind", ["pairwise", "pointwise"])
def test_model_sources(kind, saved_models):
    tok, models = saved_models
    path, model = models[kind]
    name = f"{kind}_model"
    prompts = ["a red circle", "a blue square"]
    images = np.random.default_rng(0).uniform(size=(2, 4, 8, 8, 3)).astype(np.float32)
    ids, mask = tok(prompts)
    fns, params = pw.split_reward_model(model)
    direct = np.asarray(jax.jit(fns.group_reward)(params, ids, mask, images))
    for options in ({"path": str(path)}, {"model": model, "tokenizer": tok}):
        mix = reg.build_reward_mix({name: 1.0}, {name: options}, ddof=1, adv_clip_max=None)
        assert mix.sources[name].kind == kind
        out = mix(prompts, images)
        want = np.asarray(adv_lib.win_rates(direct)) if kind == "pairwise" else direct
        np.testing.assert_allclose(out.rewards[name], want, atol=1e-6)
        np.testing.assert_allclose(out.advantages,
                                   adv_lib.group_advantages(jnp.asarray(want), ddof=1),
                                   atol=1e-5)
        if kind == "pairwise":
            assert out.diagnostics[f"{name}/win_rate_mean"] == pytest.approx(0.5, abs=1e-6)
    other = "pointwise_model" if kind == "pairwise" else "pairwise_model"
    with pytest.raises(ValueError, match=f"expected a {other.split('_')[0]} reward model"):
        reg.build_reward_mix({other: 1.0}, {other: {"path": str(path)}})
    with pytest.raises(ValueError, match="exactly one"):
        reg.build_reward_mix({name: 1.0}, {name: {}})


# --------------------------------------------------------------------------- #
# CLIP: the pointwise "clip" source and the CLIP backbone of the PPRM
# --------------------------------------------------------------------------- #

CLIP_VOCAB = 600


def make_tiny_clip_dir(directory: Path) -> Path:
    """A tiny random transformers CLIPModel + CLIP tokenizer saved in ``directory``."""
    transformers = pytest.importorskip("transformers")
    from test_text_encoders import randomize_

    from prefgrpo_jax.toyworld.tokenizers import save_clip_tokenizer

    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=CLIP_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=CLIP_VOCAB - 2, eos_token_id=CLIP_VOCAB - 1,
            pad_token_id=CLIP_VOCAB - 1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            image_size=16, patch_size=8, hidden_act="gelu",
        ),
        projection_dim=24,
    )
    model = randomize_(transformers.CLIPModel(cfg), seed=3)
    model.save_pretrained(str(directory))
    save_clip_tokenizer(directory, vocab_size=CLIP_VOCAB)
    return directory


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip_dir(tmp_path_factory.mktemp("tiny_clip"))


def test_clip_source_matches_clip_score(clip_dir):
    from prefgrpo_jax.models import clip as clip_lib

    mix = reg.build_reward_mix({"clip": 1.0}, {"clip": {"path": str(clip_dir)}}, ddof=1)
    prompts = ["a red cube", "two blue spheres"]
    images = np.random.default_rng(0).uniform(size=(2, 3, 20, 24, 3)).astype(np.float32)
    out = mix(prompts, images)
    model = clip_lib.load_clip(clip_dir)
    ids, mask = pw.HFTokenizer.from_pretrained(clip_dir, max_length=77)(prompts)
    px = clip_lib.preprocess_images(jnp.asarray(images.reshape(6, 20, 24, 3)), size=16)
    ref = clip_lib.clip_score(model, px, jnp.repeat(ids, 3, 0), jnp.repeat(mask, 3, 0))
    np.testing.assert_allclose(out.rewards["clip"], np.asarray(ref).reshape(2, 3), atol=1e-5)
    assert np.all(np.abs(out.rewards["clip"]) <= 1.0 + 1e-6)


def test_clip_backbone_pprm_end_to_end(clip_dir, tmp_path):
    """CLIP-backbone PPRM: score groups, train the head (frozen CLIP), save, load,
    and use it as the registry's pairwise_model source."""
    from prefgrpo_jax.models.clip import load_clip

    clip = load_clip(clip_dir)
    tok = pw.HFTokenizer.from_pretrained(clip_dir, max_length=77)
    model = pw.build_reward_model(pw.RewardModelConfig(kind="pairwise", backbone="clip",
                                                       hidden=16, depth=1),
                                  rngs=nnx.Rngs(1), clip=clip)
    assert model.config.clip == clip.cfg and model.backbone.feature_dim == 24
    fns, params = pw.split_reward_model(model)
    prompts = ["a red cube", "two blue spheres to the left of a castle"]
    ids, mask = tok(prompts)
    images = np.random.default_rng(0).uniform(size=(2, 4, 20, 24, 3)).astype(np.float32)
    P_ = np.asarray(jax.jit(fns.group_reward)(params, ids, mask, images))
    assert P_.shape == (2, 4, 4)
    np.testing.assert_array_equal(P_ + P_.transpose(0, 2, 1), 1.0)
    np.testing.assert_array_equal(np.diagonal(P_, axis1=1, axis2=2), 0.5)

    # frozen-backbone training: features cached, CLIP weights bit-identical afterwards
    rng = np.random.default_rng(1)
    pairs = tr.PairArrays(np.repeat(ids, 8, 0), np.repeat(mask, 8, 0),
                          rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
                          rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
                          rng.integers(0, 2, 16).astype(np.float32))
    res = tr.train_reward_model(model, pairs, pairs, tr.TrainConfig(
        steps=5, batch_size=8, train_backbone=False, log_every=0), log=None)
    chex.assert_trees_all_equal(nnx.state(res.model.backbone, nnx.Param),
                                nnx.state(model.backbone, nnx.Param))
    assert np.isfinite(res.eval_metrics["loss"])

    # save -> load (tokenizer files included) -> identical outputs
    pw.save_reward_model(res.model, tmp_path, tokenizer=tok)
    loaded, tok2 = pw.load_reward_model(tmp_path)
    assert isinstance(tok2, pw.HFTokenizer)
    np.testing.assert_array_equal(tok2(prompts)[0], ids)
    (fa, pa), (fb, pb) = pw.split_reward_model(res.model), pw.split_reward_model(loaded)
    scorer = jax.jit(fns.group_reward)
    want = np.asarray(scorer(pa, ids, mask, images))
    np.testing.assert_array_equal(np.asarray(scorer(pb, ids, mask, images)), want)

    # ... and through the registry
    out = reg.build_reward_mix({"pairwise_model": 1.0},
                               {"pairwise_model": {"path": str(tmp_path)}})(prompts, images)
    np.testing.assert_allclose(out.rewards["pairwise_model"], adv_lib.win_rates(want),
                               atol=1e-6)

"""Parity of the Flax CLIPModel (vision tower, projections, logits) with transformers.

A tiny random fp32 ``CLIPModel`` is saved with ``save_pretrained`` and loaded
with ``load_clip``; pixel values are given directly (NCHW to torch, NHWC to
us); text comes from the tiny CLIP tokenizer with padding. Error bound for
every parity check: max |ours - torch| <= 1e-4 * max |torch|.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from prefgrpo_jax.convert import WeightMismatchError
from prefgrpo_jax.models import clip as clip_lib
from prefgrpo_jax.models import text_encoders as te
from test_text_encoders import (
    PROMPTS,
    assert_close_rel,
    bad_checkpoint_cases,
    randomize_,
    rewrite_checkpoint,
)
from prefgrpo_jax.toyworld.tokenizers import save_clip_tokenizer

transformers = pytest.importorskip("transformers")

VOCAB = 600
IMAGE, PATCH = 32, 8


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1,
        ),
        vision_config=dict(
            hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=IMAGE, patch_size=PATCH, hidden_act="gelu",
        ),
        projection_dim=24,
    )
    model = randomize_(transformers.CLIPModel(cfg), seed=3)
    d = tmp_path_factory.mktemp("clip")
    model.save_pretrained(str(d))
    return d, model


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip_tok")
    save_clip_tokenizer(d, vocab_size=VOCAB)
    tok = transformers.CLIPTokenizer.from_pretrained(str(d))
    enc = tok(PROMPTS, padding="max_length", max_length=24, truncation=True, return_tensors="np")
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def pixels():
    """Normalised-looking pixel values, NHWC; 2 images (texts: 3)."""
    return np.random.default_rng(0).normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def loaded(clip_dir):
    return clip_lib.load_clip(clip_dir[0])


def test_config_from_hf(clip_dir, loaded):
    cfg = loaded.cfg
    assert (cfg.projection_dim, cfg.text.hidden_size, cfg.vision.hidden_size) == (24, 32, 48)
    assert (cfg.vision.patch_size, cfg.vision.num_patches, cfg.vision.hidden_act) == (8, 16, "gelu")
    # The text tower is the one of text_encoders.py, with the shared layer class.
    assert isinstance(loaded.text_model, te.CLIPTextTransformer)
    assert type(loaded.vision_model.layers) is type(loaded.text_model.layers) is te.CLIPEncoderLayer


def test_clip_model_parity(clip_dir, loaded, tokens, pixels):
    _, ref_model = clip_dir
    ids, mask = tokens
    with torch.no_grad():
        pv = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
        ref = ref_model(input_ids=t_ids, pixel_values=pv, attention_mask=t_mask)
        ref_img = ref_model.get_image_features(pixel_values=pv).pooler_output.numpy()
        ref_txt = ref_model.get_text_features(input_ids=t_ids,
                                              attention_mask=t_mask).pooler_output.numpy()
    img = loaded.get_image_features(jnp.asarray(pixels))
    txt = loaded.get_text_features(jnp.asarray(ids), jnp.asarray(mask))
    chex.assert_shape([img, txt], [(2, 24), (3, 24)])
    assert_close_rel(img, ref_img, "get_image_features")
    assert_close_rel(txt, ref_txt, "get_text_features")
    normalize = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    assert_close_rel(normalize(np.asarray(img)), ref.image_embeds.numpy(), "image_embeds")
    assert_close_rel(normalize(np.asarray(txt)), ref.text_embeds.numpy(), "text_embeds")
    logits = loaded(jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
    chex.assert_shape(logits, (2, 3))
    assert_close_rel(logits, ref.logits_per_image.numpy(), "logits_per_image")

    # Vision tower internals: all hidden states, and the pooled (post-LN CLS) output.
    with torch.no_grad():
        vout = ref_model.vision_model(pixel_values=pv)
    hidden, pooled = loaded.vision_model(jnp.asarray(pixels))
    assert_close_rel(hidden, vout.last_hidden_state.numpy(), "vision last_hidden_state")
    assert_close_rel(pooled, vout.pooler_output.numpy(), "vision pooled")


def test_clip_score(clip_dir, loaded, tokens, pixels):
    _, ref_model = clip_dir
    ids, mask = tokens[0][:2], tokens[1][:2]
    with torch.no_grad():
        out = ref_model(input_ids=torch.from_numpy(ids),
                        pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()),
                        attention_mask=torch.from_numpy(mask))
    want = (out.image_embeds * out.text_embeds).sum(-1).numpy()
    score = clip_lib.clip_score(loaded, jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
    chex.assert_shape(score, (2,))
    assert score.dtype == jnp.float32
    assert_close_rel(score, want, "clip_score")
    assert np.all(np.abs(np.asarray(score)) <= 1 + 1e-6)


def test_jit_pure_functional(loaded, tokens, pixels):
    graphdef, params = nnx.split(loaded, nnx.Param)

    @jax.jit
    def score(params, px, ids, mask):
        return clip_lib.clip_score(nnx.merge(graphdef, params), px, ids, mask)

    ids, mask = jnp.asarray(tokens[0][:2]), jnp.asarray(tokens[1][:2])
    chex.assert_trees_all_close(
        score(params, jnp.asarray(pixels), ids, mask),
        clip_lib.clip_score(loaded, jnp.asarray(pixels), ids, mask), atol=1e-5)


def test_wrong_image_size_raises(loaded):
    with pytest.raises(ValueError, match="image size"):
        loaded.get_image_features(jnp.zeros((1, IMAGE + PATCH, IMAGE, 3)))


@pytest.mark.parametrize("case", range(3), ids=["missing", "extra", "shape"])
def test_bad_checkpoint(clip_dir, tmp_path, case):
    name, edit, expect = bad_checkpoint_cases(
        "vision_model.encoder.layers.0.mlp.fc2.bias", "visual_projection.weight"
    )[case]
    rewrite_checkpoint(clip_dir[0], tmp_path / name, edit)
    with pytest.raises(WeightMismatchError) as e:
        clip_lib.load_clip(tmp_path / name)
    for s in expect:
        assert s in str(e.value), str(e.value)


def test_position_ids_buffer_is_consumed(clip_dir, tmp_path, loaded, pixels):
    d = tmp_path / "with_buffers"
    rewrite_checkpoint(clip_dir[0], d, lambda t: {
        **t,
        "text_model.embeddings.position_ids": np.arange(77, dtype=np.int64)[None],
        "vision_model.embeddings.position_ids": np.arange(17, dtype=np.int64)[None],
    })
    px = jnp.asarray(pixels)
    chex.assert_trees_all_close(clip_lib.load_clip(d).get_image_features(px),
                                loaded.get_image_features(px))


# ---------------------------------------------------------------------------
# Preprocessing.


def test_preprocess_exact_when_no_resize():
    img = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    out = clip_lib.preprocess_images(img, 16)
    want = (img - jnp.asarray(clip_lib.OPENAI_CLIP_MEAN)) / jnp.asarray(clip_lib.OPENAI_CLIP_STD)
    chex.assert_trees_all_close(out, want, atol=1e-6)


@pytest.mark.parametrize("hw", [(40, 56), (96, 64), (20, 24)], ids=["down-wide", "down-tall", "up"])
def test_preprocess_close_to_transformers(hw):
    """Shortest side -> size (bicubic), center crop, normalise; vs CLIPImageProcessor (PIL).

    PIL resamples 8-bit images with its own bicubic filter, so only approximate
    agreement is expected. Measured on this smooth image: max 0.016 (about one
    8-bit step after normalisation), mean 0.0045; asserted: max 0.05, mean 0.01.
    """
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as P
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as P
    h, w = hw
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    img = np.stack([0.5 + 0.4 * np.sin(3 * xx + 2 * yy), xx * yy, 0.5 + 0.3 * np.cos(4 * yy)], -1)
    img8 = np.round(img * 255).astype(np.uint8)
    proc = P(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    want = proc(images=[img8], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = np.asarray(clip_lib.preprocess_images(jnp.asarray(img8[None] / 255.0), 32))
    assert ours.shape == want.shape == (1, 32, 32, 3)
    err = np.abs(ours - want)
    print(f"preprocess {hw}: max abs err {err.max():.3e}, mean {err.mean():.3e}")
    assert err.max() < 0.05 and err.mean() < 0.01

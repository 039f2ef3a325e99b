"""Parity of the Flax T5 encoder and CLIP text tower with transformers (PyTorch).

Tiny random fp32 models (layer norms randomised too), saved with
``save_pretrained`` and loaded through our checked loaders; token ids come from
the tiny tokenizers of ``prefgrpo_jax.toyworld.tokenizers`` with padding. Error bound for
every parity check: max |ours - torch| <= 1e-4 * max |torch|.
"""

from __future__ import annotations

import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from prefgrpo_jax.convert import WeightMismatchError
from prefgrpo_jax.models import text_encoders as te
from prefgrpo_jax.toyworld.tokenizers import save_clip_tokenizer, save_t5_tokenizer

transformers = pytest.importorskip("transformers")

REL_TOL = 1e-4
CLIP_VOCAB = 600  # tokenizer and model; EOS = 599, BOS = 598
T5_VOCAB = 300
PROMPTS = [
    "a red cube to the left of two blue spheres, in watercolor style",
    "An astronaut",
    "Is it raining? Yes - the number 42 on a blackboard!",
]


# ---------------------------------------------------------------------------
# Helpers (also used by test_clip.py).


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fills every parameter with non-trivial random values (norm weights ~ 1 +- 0.2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name and p.ndim == 1:
                p.copy_(1.0 + 0.2 * r if name.endswith("weight") else 0.2 * r)
            elif name.endswith("logit_scale"):
                p.fill_(2.3)
            elif p.ndim == 1:  # biases, class embedding
                p.copy_(0.2 * r)
            elif "embed" in name or "shared" in name or "relative_attention_bias" in name:
                p.copy_(r)
            else:  # linear / conv weights: fan-in scaling
                p.copy_(r / np.sqrt(np.prod(p.shape[1:])))
    return model.eval()


def assert_close_rel(ours, ref, what: str, rel_tol: float = REL_TOL) -> float:
    """Asserts max |ours - ref| <= rel_tol * max |ref|; returns the relative error."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    scale = float(np.max(np.abs(ref)))
    err = float(np.max(np.abs(ours - ref)))
    print(f"{what}: max abs err {err:.3e}, output scale {scale:.3e}, rel {err / scale:.3e}")
    assert err <= rel_tol * scale, f"{what}: max abs err {err} > {rel_tol} * {scale}"
    return err / scale


def rewrite_checkpoint(src_dir, dst_dir, edit) -> None:
    """Copies a save_pretrained dir, applying ``edit(tensors) -> tensors`` to the weights."""
    shutil.copytree(src_dir, dst_dir)
    tensors = load_file(str(dst_dir / "model.safetensors"))
    save_file(edit(dict(tensors)), str(dst_dir / "model.safetensors"))


def bad_checkpoint_cases(key: str, shape_key: str):
    """(name, edit, expected substrings) for missing / extra / mis-shaped tensors."""

    def drop(t):
        del t[key]
        return t

    def extra(t):
        t["encoder.surprise.weight"] = np.zeros((3,), np.float32)
        return t

    def reshape(t):
        t[shape_key] = np.zeros(t[shape_key].shape[:-1] + (t[shape_key].shape[-1] + 1,),
                                np.float32)
        return t

    return [
        ("missing", drop, ["missing in", key]),
        ("extra", extra, ["unexpected tensor", "encoder.surprise.weight"]),
        ("shape", reshape, ["shape mismatch", shape_key]),
    ]


# ---------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    save_clip_tokenizer(root / "clip", vocab_size=CLIP_VOCAB)
    save_t5_tokenizer(root / "t5", vocab_size=T5_VOCAB)
    return root / "clip", root / "t5"


@pytest.fixture(scope="module")
def t5_tokens(tokenizer_dirs):
    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dirs[1]))
    enc = tok(PROMPTS, padding="max_length", max_length=40, truncation=True, return_tensors="np")
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def clip_tokens(tokenizer_dirs):
    tok = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dirs[0]))
    enc = tok(PROMPTS, padding="max_length", max_length=32, truncation=True, return_tensors="np")
    return enc["input_ids"], enc["attention_mask"]


def _t5_config(ff: str):
    return transformers.T5Config(
        vocab_size=T5_VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=6,
        relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj=ff, dropout_rate=0.0, is_encoder_decoder=False,
    )


@pytest.fixture(scope="module", params=["gated-gelu", "relu"])
def t5_dir(request, tmp_path_factory):
    """Tiny T5 encoders: gated-GELU (T5 v1.1, FLUX) and ReLU (original T5).

    inner dim (6 heads x 8) != d_model (32); T = 40 > max_distance exercises the
    log buckets and their clamp.
    """
    model = randomize_(transformers.T5EncoderModel(_t5_config(request.param)), seed=1)
    d = tmp_path_factory.mktemp(f"t5_{request.param}")
    model.save_pretrained(str(d))
    return d, model


def _clip_text_config(eos_token_id: int, act: str):
    return transformers.CLIPTextConfig(
        vocab_size=CLIP_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
        bos_token_id=CLIP_VOCAB - 2, eos_token_id=eos_token_id, pad_token_id=CLIP_VOCAB - 1,
    )


@pytest.fixture(scope="module", params=[(2, "quick_gelu"), (CLIP_VOCAB - 1, "gelu")],
                ids=["legacy-eos2-quickgelu", "eos-id-gelu"])
def clip_text_dir(request, tmp_path_factory):
    """Tiny CLIPTextModels for both pooling rules (FLUX's config says eos_token_id=2)."""
    eos, act = request.param
    model = randomize_(transformers.CLIPTextModel(_clip_text_config(eos, act)), seed=2)
    d = tmp_path_factory.mktemp("clip_text")
    model.save_pretrained(str(d))
    return d, model


# ---------------------------------------------------------------------------
# T5.


def test_t5_config_from_hf():
    cfg = te.T5Config.from_hf(_t5_config("gated-gelu").to_dict())
    assert (cfg.dense_act_fn, cfg.is_gated_act, cfg.inner_dim) == ("gelu_new", True, 48)
    cfg = te.T5Config.from_hf({**_t5_config("relu").to_dict(), "dense_act_fn": "gelu"})
    assert (cfg.dense_act_fn, cfg.is_gated_act) == ("relu", False)
    with pytest.raises(ValueError, match="feed_forward_proj"):
        te.T5Config.from_hf({"feed_forward_proj": "fancy-gated-gelu"})


def test_t5_relative_position_bucket_matches_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-300, 301)[None, :]
    for buckets, dist in [(32, 128), (8, 20)]:
        ref = T5Attention._relative_position_bucket(
            torch.from_numpy(rel), bidirectional=True, num_buckets=buckets, max_distance=dist
        ).numpy()
        ours = te.t5_relative_position_bucket(jnp.asarray(rel), num_buckets=buckets,
                                              max_distance=dist)
        np.testing.assert_array_equal(np.asarray(ours), ref)


def test_t5_parity(t5_dir, t5_tokens):
    path, ref_model = t5_dir
    ids, mask = t5_tokens
    assert (mask == 0).any() and (mask == 1).any()
    with torch.no_grad():
        ref = ref_model(input_ids=torch.from_numpy(ids),
                        attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
        ref_nomask = ref_model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    model = te.load_t5(path)
    out = model(jnp.asarray(ids), jnp.asarray(mask))
    chex.assert_shape(out, (len(PROMPTS), ids.shape[1], 32))
    assert_close_rel(out, ref, "T5 last_hidden_state (masked)")
    assert_close_rel(model(jnp.asarray(ids)), ref_nomask, "T5 last_hidden_state (no mask)")


def test_t5_pure_functional_jit_and_bf16(t5_dir, t5_tokens):
    path, _ = t5_dir
    ids, mask = jnp.asarray(t5_tokens[0]), jnp.asarray(t5_tokens[1])
    model = te.load_t5(path)
    graphdef, params = nnx.split(model, nnx.Param)
    chex.clear_trace_counter()  # the test is parametrised

    @jax.jit
    @chex.assert_max_traces(n=1)
    def encode(params, ids, mask):
        return nnx.merge(graphdef, params)(ids, mask)

    eager = model(ids, mask)
    jitted = encode(params, ids, mask)
    encode(params, ids, mask)  # no retrace
    chex.assert_trees_all_close(jitted, eager, atol=1e-5, rtol=1e-5)

    model16 = te.load_t5(path, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(nnx.state(model16, nnx.Param)))
    out16 = model16(ids, mask)
    assert out16.dtype == jnp.bfloat16
    chex.assert_tree_all_finite(out16)
    # bf16 has 8 mantissa bits; two layers keep the error at the percent level.
    err = np.max(np.abs(np.asarray(out16, np.float32) - np.asarray(eager)))
    assert err <= 0.05 * np.max(np.abs(np.asarray(eager))), err


def test_t5_tied_embedding_copy_is_consumed(t5_dir, tmp_path, t5_tokens):
    path, _ = t5_dir
    d = tmp_path / "tied"
    rewrite_checkpoint(path, d, lambda t: {**t, "encoder.embed_tokens.weight": t["shared.weight"]})
    out = te.load_t5(d)(jnp.asarray(t5_tokens[0]))
    chex.assert_trees_all_close(out, te.load_t5(path)(jnp.asarray(t5_tokens[0])))
    # Only the tied copy present (no shared.weight) also loads.
    d2 = tmp_path / "only_copy"
    rewrite_checkpoint(path, d2, lambda t: {
        ("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in t.items()})
    te.load_t5(d2)


@pytest.mark.parametrize("case", range(3), ids=["missing", "extra", "shape"])
def test_t5_bad_checkpoint(t5_dir, tmp_path, case):
    path, _ = t5_dir
    name, edit, expect = bad_checkpoint_cases(
        "encoder.block.1.layer.1.DenseReluDense.wo.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    )[case]
    rewrite_checkpoint(path, tmp_path / name, edit)
    with pytest.raises(WeightMismatchError) as e:
        te.load_t5(tmp_path / name)
    for s in expect:
        assert s in str(e.value), str(e.value)


# ---------------------------------------------------------------------------
# CLIP text.


def test_clip_pooled_index_rules():
    ids = jnp.array([[598, 5, 7, 599, 599], [598, 599, 3, 599, 599]])
    np.testing.assert_array_equal(te.clip_text_pooled_index(ids, 599), [3, 1])
    np.testing.assert_array_equal(te.clip_text_pooled_index(ids, 2), [3, 1])  # argmax: first max
    ids = jnp.array([[598, 2, 7, 1, 0]])  # legacy rule ignores where id 2 is
    np.testing.assert_array_equal(te.clip_text_pooled_index(ids, 2), [0])
    np.testing.assert_array_equal(te.clip_text_pooled_index(ids, 7), [2])


def test_clip_text_parity(clip_text_dir, clip_tokens):
    path, ref_model = clip_text_dir
    ids, mask = clip_tokens
    assert (mask == 0).any()
    model = te.load_clip_text(path)
    assert model.cfg.eos_token_id == ref_model.config.eos_token_id
    for use_mask in (True, False):  # FLUX passes no mask to CLIP
        kw = {"attention_mask": torch.from_numpy(mask)} if use_mask else {}
        with torch.no_grad():
            ref = ref_model(input_ids=torch.from_numpy(ids), **kw)
        hidden, pooled = model(jnp.asarray(ids), jnp.asarray(mask) if use_mask else None)
        chex.assert_shape([hidden, pooled], [(len(PROMPTS), ids.shape[1], 32), (len(PROMPTS), 32)])
        assert_close_rel(hidden, ref.last_hidden_state.numpy(), f"CLIP text hidden mask={use_mask}")
        assert_close_rel(pooled, ref.pooler_output.numpy(), f"CLIP text pooled mask={use_mask}")


def test_clip_text_transformers4_layout(clip_text_dir, clip_tokens, tmp_path):
    """FLUX.1's text_encoder was saved by transformers 4: ``text_model.*`` plus, in
    older saves, the ``position_ids`` buffer."""
    path, ref_model = clip_text_dir
    d = tmp_path / "v4"
    rewrite_checkpoint(path, d, lambda t: {
        **{f"text_model.{k}": v for k, v in t.items()},
        "text_model.embeddings.position_ids": np.arange(77, dtype=np.int64)[None],
    })
    ids = jnp.asarray(clip_tokens[0])
    chex.assert_trees_all_close(te.load_clip_text(d)(ids), te.load_clip_text(path)(ids))


@pytest.mark.parametrize("case", range(3), ids=["missing", "extra", "shape"])
def test_clip_text_bad_checkpoint(clip_text_dir, tmp_path, case):
    path, _ = clip_text_dir
    name, edit, expect = bad_checkpoint_cases(
        "encoder.layers.1.self_attn.q_proj.bias", "embeddings.position_embedding.weight"
    )[case]
    rewrite_checkpoint(path, tmp_path / name, edit)
    with pytest.raises(WeightMismatchError) as e:
        te.load_clip_text(tmp_path / name)
    for s in expect:
        assert s in str(e.value), str(e.value)


def test_clip_text_too_long_raises(clip_text_dir):
    model = te.load_clip_text(clip_text_dir[0])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(jnp.zeros((1, 78), jnp.int32))


# ---------------------------------------------------------------------------
# FLUX conditioning end to end, and tokenizers.


def test_flux_encode_prompt_parity(tokenizer_dirs, tmp_path):
    """diffusers' FluxPipeline accepts the tiny tokenizers, and our encoders reproduce
    its ``encode_prompt``: T5 ``prompt_embeds`` and CLIP ``pooled_prompt_embeds``
    (FLUX pads CLIP to 77 and T5 to max_sequence_length, and passes no mask)."""
    diffusers = pytest.importorskip("diffusers")
    clip_dir, t5_tok_dir = tokenizer_dirs
    clip = randomize_(transformers.CLIPTextModel(_clip_text_config(2, "quick_gelu")), seed=4)
    t5 = randomize_(transformers.T5EncoderModel(_t5_config("gated-gelu")), seed=5)
    clip.save_pretrained(str(tmp_path / "text_encoder"))
    t5.save_pretrained(str(tmp_path / "text_encoder_2"))
    tok = transformers.CLIPTokenizer.from_pretrained(str(clip_dir))
    tok2 = transformers.T5TokenizerFast.from_pretrained(str(t5_tok_dir))
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=clip,
        tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok2, transformer=None,
    )
    with torch.no_grad():
        prompt_embeds, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None,
                                                      max_sequence_length=48)
    clip_ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True,
                   return_tensors="np")["input_ids"]
    t5_ids = tok2(PROMPTS, padding="max_length", max_length=48, truncation=True,
                  return_tensors="np")["input_ids"]
    _, ours_pooled = te.load_clip_text(tmp_path / "text_encoder")(jnp.asarray(clip_ids))
    ours_embeds = te.load_t5(tmp_path / "text_encoder_2")(jnp.asarray(t5_ids))
    assert_close_rel(ours_embeds, prompt_embeds.numpy(), "FLUX prompt_embeds (T5)")
    assert_close_rel(ours_pooled, pooled.numpy(), "FLUX pooled_prompt_embeds (CLIP)")


def test_tiny_tokenizers_load_and_tokenize(tokenizer_dirs):
    clip_dir, t5_dir = tokenizer_dirs
    for cls in (transformers.AutoTokenizer, transformers.CLIPTokenizer,
                transformers.CLIPTokenizerFast):
        tok = cls.from_pretrained(str(clip_dir))
        assert len(tok) == CLIP_VOCAB
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
            "<|startoftext|>", "<|endoftext|>", "<|endoftext|>")
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
            CLIP_VOCAB - 2, CLIP_VOCAB - 1, CLIP_VOCAB - 1)
        assert tok.model_max_length == 77
        enc = tok(PROMPTS + ["Zebra é 😀"], padding="max_length", max_length=77,
                  truncation=True, return_tensors="np")
        ids = enc["input_ids"]
        assert ids.shape == (4, 77) and ids.max() < CLIP_VOCAB
        assert (ids[:, 0] == tok.bos_token_id).all()
        n = enc["attention_mask"].sum(1)
        assert (ids[np.arange(4), n - 1] == tok.eos_token_id).all()
        assert tok.unk_token_id not in ids[0, 1:n[0] - 1]  # byte-level: nothing unknown
        # CLIP's decoder puts a space at every end of word (also before ',').
        decoded = tok.decode(ids[0], skip_special_tokens=True)
        assert decoded.replace(" ", "") == PROMPTS[0].lower().replace(" ", "")

    for cls in (transformers.AutoTokenizer, transformers.T5TokenizerFast):
        tok = cls.from_pretrained(str(t5_dir))
        assert len(tok) == T5_VOCAB
        assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
        enc = tok(PROMPTS, padding="max_length", max_length=64, truncation=True,
                  return_tensors="np")
        ids = enc["input_ids"]
        n = enc["attention_mask"].sum(1)
        assert ids.shape == (3, 64) and ids.max() < T5_VOCAB
        assert (ids[np.arange(3), n - 1] == 1).all() and (ids[0, n[0]:] == 0).all()
        assert 2 not in ids  # corpus characters are all known
        assert tok.decode(ids[0], skip_special_tokens=True) == PROMPTS[0]

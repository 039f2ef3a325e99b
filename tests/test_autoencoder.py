"""FLUX VAE: parity with diffusers' AutoencoderKL, latent packing, weight checks.

Tiny random models only (CPU, fp32). Error bound for parity: max-abs error
<= 1e-4 * max(1, max|reference|).
"""

import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FluxPipeline
from flax import nnx
from safetensors.numpy import save_file

from prefgrpo_jax import convert
from prefgrpo_jax.models import autoencoder as ae

SF, SHIFT = 0.3611, 0.1159
TOL = 1e-4


def _randomise_norms(vae: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in vae.modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.copy_(0.5 + torch.rand(mod.weight.shape, generator=g))
                mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=g))


def _assert_close(ours, ref, name):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    err = float(np.abs(ours - ref).max())
    bound = TOL * max(1.0, float(np.abs(ref).max()))
    print(f"{name}: max-abs err {err:.3e} (bound {bound:.1e}, ref scale {np.abs(ref).max():.3f})")
    assert err <= bound, f"{name}: max-abs error {err} > {bound}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch AutoencoderKL, its save_pretrained dir, our loaded Autoencoder)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=16, norm_num_groups=8,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=SF, shift_factor=SHIFT,
    ).eval()
    _randomise_norms(vae, 1)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return vae, path, ae.load_diffusers(path)


def test_config(tiny):
    _, path, model = tiny
    cfg = ae.AutoencoderConfig.from_diffusers(json.loads((path / "config.json").read_text()))
    assert cfg == model.cfg
    assert cfg.block_out_channels == (16, 32) and cfg.latent_channels == 16
    assert cfg.norm_num_groups == 8 and cfg.vae_scale_factor == 2
    assert (model.scaling_factor, model.shift_factor) == (SF, SHIFT)
    assert type(model.scaling_factor) is float and type(model.shift_factor) is float
    flux = ae.AutoencoderConfig.flux_dev()
    assert flux.vae_scale_factor == 8 and flux.latent_channels == 16
    assert (flux.scaling_factor, flux.shift_factor) == (0.3611, 0.1159)
    assert not flux.use_quant_conv and not flux.use_post_quant_conv
    assert ae.AutoencoderConfig.tiny().vae_scale_factor == 2
    with pytest.raises(ValueError, match="down_block_types"):
        ae.AutoencoderConfig.from_diffusers(
            {"block_out_channels": [16, 32], "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]})
    with pytest.raises(ValueError, match="act_fn"):
        ae.AutoencoderConfig.from_diffusers({"act_fn": "gelu"})


def test_encode_parity(tiny):
    vae, _, model = tiny
    x = np.random.default_rng(0).random((2, 16, 24, 3), dtype=np.float32)
    mean, logvar = model.encode(jnp.asarray(x))
    chex.assert_shape([mean, logvar], (2, 8, 12, 16))
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(x).permute(0, 3, 1, 2) * 2 - 1).latent_dist
    _assert_close(mean, dist.mean.permute(0, 2, 3, 1).numpy(), "encode mean")
    _assert_close(logvar, dist.logvar.permute(0, 2, 3, 1).numpy(), "encode logvar")
    lat = model.encode_to_latents(jnp.asarray(x))
    chex.assert_shape(lat, (2, 16, 8, 12))
    ref = ((dist.mean - SHIFT) * SF).numpy()
    _assert_close(lat, ref, "encode_to_latents")
    # A posterior sample differs from the mean but has the same shape.
    sample = model.encode_to_latents(jnp.asarray(x), key=jax.random.key(0))
    chex.assert_shape(sample, lat.shape)
    assert float(jnp.abs(sample - lat).max()) > 0


def test_decode_parity(tiny):
    vae, _, model = tiny
    z = np.random.default_rng(1).standard_normal((2, 16, 6, 4)).astype(np.float32)  # NCHW model space
    with torch.no_grad():
        raw = vae.decode(torch.from_numpy(z) / SF + SHIFT).sample
    img_ref = (raw / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    img = model.decode(jnp.asarray(z))
    chex.assert_shape(img, (2, 12, 8, 3))
    assert img.dtype == jnp.float32
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    _assert_close(img, img_ref, "decode (pipeline postprocess)")
    # Unclipped raw decoder output, NHWC, no scaling.
    zr = np.transpose(z, (0, 2, 3, 1))
    with torch.no_grad():
        raw2 = vae.decode(torch.from_numpy(z)).sample.permute(0, 2, 3, 1).numpy()
    _assert_close(model.decode_raw(jnp.asarray(zr)), raw2, "decode_raw")
    # Clipping must not be what makes the first comparison pass.
    assert 0.05 < float(np.mean((img_ref > 0) & (img_ref < 1)))


def test_bad_input_shapes(tiny):
    _, _, model = tiny
    with pytest.raises(ValueError, match="NCHW"):
        model.decode(jnp.zeros((1, 4, 4, 16)))
    with pytest.raises(ValueError, match="multiples"):
        model.encode(jnp.zeros((1, 15, 16, 3)))


def test_jitted_decode_traces_once_per_shape(tiny):
    _, _, model = tiny
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    @chex.assert_max_traces(n=2)
    def decode(params, z):
        return nnx.merge(graphdef, params, rest).decode(z)

    eager = model.decode(jnp.ones((1, 16, 4, 4)))
    for seed in range(3):
        out = decode(params, jax.random.normal(jax.random.key(seed), (1, 16, 4, 4)))
    chex.assert_shape(out, (1, 8, 8, 3))
    out = decode(params, jnp.ones((1, 16, 4, 4)))
    np.testing.assert_allclose(out, eager, atol=1e-5)
    for seed in range(2):  # a second shape: exactly one more trace
        decode(params, jax.random.normal(jax.random.key(seed), (2, 16, 6, 4)))


def test_bf16_load(tiny):
    _, path, model = tiny
    m16 = ae.load_diffusers(path, dtype=jnp.bfloat16)
    assert m16.decoder.conv_in.kernel.dtype == jnp.bfloat16
    z = jax.random.normal(jax.random.key(0), (1, 16, 4, 4))
    out = m16.decode(z)
    assert out.dtype == jnp.float32
    err = float(jnp.abs(out - model.decode(z)).max())
    assert err < 5e-2, err


def test_quant_convs_no_attention(tmp_path):
    """SD-style options: quant/post-quant convs, no mid attention, shift_factor null."""
    torch.manual_seed(1)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=False,
        scaling_factor=0.18215, shift_factor=None,
    ).eval()
    _randomise_norms(vae, 2)
    vae.save_pretrained(tmp_path)
    model = ae.load_diffusers(tmp_path)
    assert model.cfg.use_quant_conv and model.cfg.use_post_quant_conv
    assert model.decoder.mid_block.attention is None and model.shift_factor == 0.0
    x = np.random.default_rng(2).random((1, 8, 8, 3), dtype=np.float32)
    z = np.random.default_rng(3).standard_normal((1, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        mean_ref = vae.encode(torch.from_numpy(x).permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean
        img_ref = (vae.decode(torch.from_numpy(z) / 0.18215).sample / 2 + 0.5).clamp(0, 1)
    _assert_close(model.encode(jnp.asarray(x))[0], mean_ref.permute(0, 2, 3, 1).numpy(), "quant encode")
    _assert_close(model.decode(jnp.asarray(z)), img_ref.permute(0, 2, 3, 1).numpy(), "post-quant decode")


def _write_variant(src_dir, dst_dir, tensors):
    dst_dir.mkdir()
    shutil.copy(src_dir / "config.json", dst_dir / "config.json")
    save_file(tensors, str(dst_dir / "diffusion_pytorch_model.safetensors"))
    return dst_dir


def test_weight_mismatch_errors(tiny, tmp_path):
    _, path, _ = tiny
    tensors = convert.read_safetensors(path)

    missing = dict(tensors)
    del missing["decoder.mid_block.attentions.0.to_k.weight"]
    with pytest.raises(convert.WeightMismatchError, match=r"missing in .*decoder\.mid_block\.attentions\.0\.to_k\.weight"):
        ae.load_diffusers(_write_variant(path, tmp_path / "missing", missing))

    bad = dict(tensors)
    bad["encoder.conv_out.weight"] = np.zeros((30, 32, 3, 3), np.float32)
    with pytest.raises(convert.WeightMismatchError, match=r"shape mismatch: encoder\.conv_out\.weight"):
        ae.load_diffusers(_write_variant(path, tmp_path / "shape", bad))

    extra = dict(tensors)
    extra["quant_conv.weight"] = np.zeros((32, 32, 1, 1), np.float32)
    with pytest.raises(convert.WeightMismatchError, match=r"unexpected tensor in .*quant_conv\.weight"):
        ae.load_diffusers(_write_variant(path, tmp_path / "extra", extra))


def test_every_tensor_consumed(tiny):
    _, path, model = tiny
    src = convert.SourceTensors(convert.read_safetensors(path))
    mapped = ae.map_diffusers(src, model.cfg)
    assert src.unused() == [] and src.missing == []
    assert set(mapped) == set(convert.flat_params(model))


# ---------------------------------------------------------------------------
# Packing.


@pytest.mark.parametrize("hw", [(90, 90), (6, 10)])
def test_pack_unpack_matches_diffusers(hw):
    h, w = hw
    z = np.random.default_rng(0).standard_normal((2, 16, h, w)).astype(np.float32)
    packed = ae.pack_latents(jnp.asarray(z))
    chex.assert_shape(packed, (2, (h // 2) * (w // 2), 64))
    ref = FluxPipeline._pack_latents(torch.from_numpy(z), 2, 16, h, w).numpy()
    np.testing.assert_array_equal(np.asarray(packed), ref)
    # diffusers' unpack takes pixel sizes; vae_scale_factor 8 for FLUX.
    ref_un = FluxPipeline._unpack_latents(torch.from_numpy(ref), h * 8, w * 8, 8).numpy()
    np.testing.assert_array_equal(np.asarray(ae.unpack_latents(packed, h, w)), ref_un)
    np.testing.assert_array_equal(np.asarray(ae.unpack_latents(packed, h, w)), z)
    ids = ae.latent_image_ids(h, w)
    assert ids.dtype == jnp.float32
    ref_ids = FluxPipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(np.asarray(ids), ref_ids)


def test_latent_hw():
    assert ae.latent_hw(720, 720) == (90, 90)
    assert ae.latent_hw(1024, 768) == (128, 96)
    for height, width in [(720, 1280), (1000, 520), (17, 33)]:
        want = tuple(2 * (s // 16) for s in (height, width))
        assert ae.latent_hw(height, width) == want
    assert ae.latent_hw(64, 64, vae_scale_factor=2) == (32, 32)
    with pytest.raises(ValueError):
        ae.unpack_latents(jnp.zeros((1, 10, 64)), 6, 6)

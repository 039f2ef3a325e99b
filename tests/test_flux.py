"""FLUX transformer: parity with diffusers' PyTorch FluxTransformer2DModel, weight
loading (diffusers and BFL names), error reporting, compile-once, remat and bf16.

Tiny config (hidden 64, 2 heads, 2 double + 2 single blocks), fp32, CPU.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from prefgrpo_jax.convert import WeightMismatchError, flat_params
from prefgrpo_jax.models.flux import (
    FluxConfig,
    REMAT_POLICIES,
    FluxTransformer,
    load_bfl,
    load_diffusers,
    timestep_embedding,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

CFG = FluxConfig.tiny(in_channels=16, out_channels=16)
B, H, W, T = 2, 3, 4, 5  # batch, latent grid (packed tokens), text tokens
L = H * W

# fp32 parity bound on max|v_jax - v_torch| relative to max|v_torch|. Measured 4.5e-6
# (max-abs 1.0e-5 at max|v| 2.3) on this CPU.
PARITY_RTOL = 1e-4
# bf16 params + bf16 compute vs the fp32 torch model, same metric. Measured 1.0e-2.
BF16_RTOL = 5e-2


def _torch_model() -> "torch.nn.Module":
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(**CFG.to_diffusers()).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Move every tensor off its init so zero-init / ones-init layers (norm
            # scales, adaLN biases) cannot hide a wrong mapping.
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if p.ndim == 1:
                base = 1.0 if "norm" in name and "linear" not in name else 0.0
                p.copy_(base + 0.3 * noise)
            else:
                p.add_(0.05 * noise)
    return model


def _inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    img_ids = np.stack([np.zeros_like(rows), rows, cols], -1).reshape(L, 3).astype(np.float32)
    txt_ids = np.zeros((T, 3), np.float32)
    return {
        "img": rng.standard_normal((B, L, CFG.in_channels)).astype(np.float32),
        "img_ids": np.broadcast_to(img_ids, (B, L, 3)).copy(),
        "txt": rng.standard_normal((B, T, CFG.context_dim)).astype(np.float32),
        "txt_ids": np.broadcast_to(txt_ids, (B, T, 3)).copy(),
        "timesteps": np.array([0.3, 0.95], np.float32)[:B],
        "y": rng.standard_normal((B, CFG.vec_dim)).astype(np.float32),
        "guidance": np.array([3.5, 1.0], np.float32)[:B],
    }


def _torch_velocity(model, x: dict[str, np.ndarray]) -> np.ndarray:
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    with torch.no_grad():
        out = model(
            hidden_states=t["img"], encoder_hidden_states=t["txt"],
            pooled_projections=t["y"], timestep=t["timesteps"],  # in [0, 1]; x1000 inside
            img_ids=t["img_ids"][0], txt_ids=t["txt_ids"][0], guidance=t["guidance"],
            return_dict=False,
        )[0]
    return out.numpy()


def velocity(model: FluxTransformer, x: dict[str, np.ndarray]) -> np.ndarray:
    graphdef, params = nnx.split(model)
    return np.asarray(_velocity_jit(params, graphdef, x))


_velocity_jit = jax.jit(lambda params, graphdef, x: nnx.merge(graphdef, params)(**x),
                        static_argnums=1)


def _max_rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """max|a - ref| / max|ref| (printed with the absolute error under ``pytest -s``)."""
    abs_err = float(np.max(np.abs(np.asarray(a, np.float32) - ref)))
    print(f"[max-abs err {abs_err:.2e}, max|ref| {np.max(np.abs(ref)):.3f}]", end=" ")
    return abs_err / float(np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(tiny torch model, its state dict as numpy, its diffusers dir, inputs, torch velocity)."""
    model = _torch_model()
    path = tmp_path_factory.mktemp("flux") / "transformer"
    model.save_pretrained(path, safe_serialization=True)
    x = _inputs()
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return model, sd, path, x, _torch_velocity(model, x)


@pytest.fixture(scope="module")
def loaded(reference):
    return load_diffusers(reference[2])


# ---------------------------------------------------------------------------


def test_config_validation_and_from_diffusers():
    dev = FluxConfig.flux_dev()
    assert (dev.hidden_size, dev.head_dim, dev.depth, dev.depth_single) == (3072, 128, 19, 38)
    assert FluxConfig.from_diffusers(dev.to_diffusers()) == dev
    with pytest.raises(ValueError, match="sum\\(axes_dim\\)"):
        FluxConfig.tiny(axes_dim=(8, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        FluxConfig.tiny(num_heads=3)
    with pytest.raises(ValueError, match="patch_size"):
        FluxConfig.from_diffusers({**CFG.to_diffusers(), "patch_size": 2})


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import Timesteps

    t = np.array([0.0, 0.25, 0.731, 1.0], np.float32)
    ref = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(
        torch.from_numpy(t) * 1000).numpy()
    np.testing.assert_allclose(np.asarray(timestep_embedding(jnp.asarray(t), 256)), ref,
                               atol=1e-4)  # fp32 phase resolution at 1e3 rad: 6e-5


def test_diffusers_parity(reference, loaded):
    *_, x, ref = reference
    out = velocity(loaded, x)
    assert out.shape == (B, L, CFG.out_channels) and out.dtype == np.float32
    err = _max_rel_err(out, ref)
    print(f"diffusers parity: max|dv|/max|v| = {err:.2e} (max|v| = {np.abs(ref).max():.3f})")
    assert err <= PARITY_RTOL


def _diffusers_to_bfl(sd: dict[str, np.ndarray], cfg: FluxConfig) -> dict[str, np.ndarray]:
    """Inverse of map_diffusers in BFL names (written independently for the test)."""
    out = {}

    def lin(dst, src):
        out[f"{dst}.weight"], out[f"{dst}.bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def cat(dst, srcs):
        for s in ("weight", "bias"):
            out[f"{dst}.{s}"] = np.concatenate([sd[f"{x}.{s}"] for x in srcs], axis=0)

    lin("img_in", "x_embedder")
    lin("txt_in", "context_embedder")
    lin("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    lin("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    lin("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
    lin("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    lin("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    lin("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    for i in range(cfg.depth):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        lin(f"{b}.img_mod.lin", f"{d}.norm1.linear")
        lin(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear")
        cat(f"{b}.img_attn.qkv", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"])
        cat(f"{b}.txt_attn.qkv",
            [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"])
        out[f"{b}.img_attn.norm.query_norm.scale"] = sd[f"{d}.attn.norm_q.weight"]
        out[f"{b}.img_attn.norm.key_norm.scale"] = sd[f"{d}.attn.norm_k.weight"]
        out[f"{b}.txt_attn.norm.query_norm.scale"] = sd[f"{d}.attn.norm_added_q.weight"]
        out[f"{b}.txt_attn.norm.key_norm.scale"] = sd[f"{d}.attn.norm_added_k.weight"]
        lin(f"{b}.img_attn.proj", f"{d}.attn.to_out.0")
        lin(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out")
        lin(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj")
        lin(f"{b}.img_mlp.2", f"{d}.ff.net.2")
        lin(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
        lin(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2")
    for i in range(cfg.depth_single):
        s, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        cat(f"{b}.linear1", [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v",
                             f"{s}.proj_mlp"])
        lin(f"{b}.linear2", f"{s}.proj_out")
        lin(f"{b}.modulation.lin", f"{s}.norm.linear")
        out[f"{b}.norm.query_norm.scale"] = sd[f"{s}.attn.norm_q.weight"]
        out[f"{b}.norm.key_norm.scale"] = sd[f"{s}.attn.norm_k.weight"]
    # diffusers norm_out rows are (scale, shift); BFL's adaLN rows are (shift, scale).
    for s in ("weight", "bias"):
        scale, shift = np.split(sd[f"norm_out.linear.{s}"], 2, axis=0)
        out[f"final_layer.adaLN_modulation.1.{s}"] = np.concatenate([shift, scale], axis=0)
    lin("final_layer.linear", "proj_out")
    assert sum(v.size for v in out.values()) == sum(v.size for v in sd.values())
    return out


def test_bfl_parity(reference, loaded, tmp_path):
    _, sd, _, x, ref = reference
    file = tmp_path / "flux_tiny_bfl.safetensors"
    save_file(_diffusers_to_bfl(sd, CFG), str(file))
    model = load_bfl(file, CFG)
    a, b = flat_params(model), flat_params(loaded)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    err = _max_rel_err(velocity(model, x), ref)
    print(f"BFL parity: max|dv|/max|v| = {err:.2e}")
    assert err <= PARITY_RTOL


def test_bad_checkpoint_lists_every_offender(reference, tmp_path):
    _, sd, path, _, _ = reference
    bad = dict(sd)
    bad["transformer_blocks.0.attn.extra_proj.weight"] = np.zeros((3, 3), np.float32)
    bad["single_transformer_blocks.1.proj_mlp.bias"] = np.zeros((7,), np.float32)
    del bad["transformer_blocks.1.ff.net.2.weight"]
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(bad, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightMismatchError) as info:
        load_diffusers(tmp_path)
    msg = str(info.value)
    assert "transformer_blocks.0.attn.extra_proj.weight" in msg
    assert "single_transformer_blocks.1.proj_mlp.bias has (7,)" in msg
    assert "missing in diffusers checkpoint" in msg
    assert "transformer_blocks.1.ff.net.2.weight" in msg

    with pytest.raises(FileNotFoundError, match="config.json"):
        load_diffusers(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_bfl(tmp_path / "nothing.safetensors", CFG)


def test_guidance_required(loaded):
    x = _inputs()
    x["guidance"] = None
    with pytest.raises(ValueError, match="guidance"):
        loaded(**{k: (None if v is None else jnp.asarray(v)) for k, v in x.items()})


def test_compiles_once_per_shape(loaded):
    graphdef, params = nnx.split(loaded)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(params, x):
        return nnx.merge(graphdef, params)(**x)

    x0, x1 = _inputs(0), _inputs(1)
    v0, v1 = f(params, x0), f(params, x1)
    assert not np.allclose(np.asarray(v0), np.asarray(v1))
    np.testing.assert_allclose(np.asarray(v1), velocity(loaded, x1), rtol=1e-5, atol=1e-5)


def _loss_and_grad(model, x):
    """((mean v^2, v), d/dparams) of ``model`` on inputs ``x``, jitted."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def f(params):
        def loss(p):
            v = nnx.merge(graphdef, p)(**x)
            return jnp.mean(jnp.square(v)), v
        return jax.value_and_grad(loss, has_aux=True)(params)

    return f(params)


def _assert_same_output_and_grads(model, baseline, x):
    (_, v0), g0 = _loss_and_grad(baseline, x)
    (_, v1), g1 = _loss_and_grad(model, x)
    np.testing.assert_allclose(np.asarray(v1), np.asarray(v0), rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(g1, g0, rtol=1e-5, atol=1e-6)
    chex.assert_tree_all_finite(g0)


@pytest.mark.parametrize("policy", REMAT_POLICIES)
def test_remat_same_output_and_grads(reference, loaded, policy):
    _, _, path, x, _ = reference
    remat = load_diffusers(path, remat=True, remat_policy=policy)
    assert remat.remat and not loaded.remat and remat.remat_policy == policy
    _assert_same_output_and_grads(remat, loaded, x)


def test_unrolled_blocks_same_output_and_grads(reference, loaded):
    # scan_unroll=True (straight-line blocks, a CPU experiment of train_variants.py)
    # is the same function as the scanned loop.
    _, _, path, x, _ = reference
    unrolled = load_diffusers(path)
    unrolled.scan_unroll = True
    assert loaded.scan_unroll == 1
    _assert_same_output_and_grads(unrolled, loaded, x)


def test_unknown_remat_policy_is_named():
    with pytest.raises(ValueError, match="Unknown remat policy 'save_everything'.*nothing_saveable"):
        FluxTransformer(FluxConfig.tiny(), rngs=nnx.Rngs(0), remat=True, remat_policy="save_everything")


def test_bf16_params_drift_bounded(reference):
    _, _, path, x, ref = reference
    model = load_diffusers(path, dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.bfloat16 for v in flat_params(model).values())
    out = velocity(model, x)
    assert out.dtype == jnp.bfloat16
    err = _max_rel_err(out, ref)
    print(f"bf16 drift: max|dv|/max|v| = {err:.2e}")
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    assert err <= BF16_RTOL


def _grad_jaxpr(depth: int, remat: bool) -> str:
    cfg = FluxConfig.tiny(in_channels=16, out_channels=16, depth=depth, depth_single=depth)
    abstract = nnx.eval_shape(lambda: FluxTransformer(cfg, rngs=nnx.Rngs(0), remat=remat))
    graphdef, params = nnx.split(abstract)
    x = _inputs()
    jaxpr = jax.make_jaxpr(
        jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(**x))))(params)
    return str(jaxpr)


def test_program_size_independent_of_depth_and_remat_present():
    shallow, deep = _grad_jaxpr(1, False), _grad_jaxpr(3, False)
    # Blocks live inside lax.scan: the program is the same up to the layer-axis sizes.
    assert re.sub(r"\d+", "N", shallow) == re.sub(r"\d+", "N", deep)
    assert "scan[" in deep and "remat" not in deep
    assert _grad_jaxpr(2, True).count("remat") == 2  # one per scanned block body


def test_no_guidance_variant_parity(tmp_path):
    """guidance_embeds=False (FLUX.1-schnell layout): no guidance_in, guidance ignored."""
    cfg = FluxConfig.tiny(in_channels=16, out_channels=16, depth=1, depth_single=1,
                          guidance_embed=False)
    torch.manual_seed(2)
    model = diffusers.FluxTransformer2DModel(**cfg.to_diffusers()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_diffusers(tmp_path)
    assert ours.guidance_in is None
    x = _inputs()
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    with torch.no_grad():
        ref = model(hidden_states=t["img"], encoder_hidden_states=t["txt"],
                    pooled_projections=t["y"], timestep=t["timesteps"],
                    img_ids=t["img_ids"][0], txt_ids=t["txt_ids"][0],
                    return_dict=False)[0].numpy()
    del x["guidance"]
    err = _max_rel_err(velocity(ours, x), ref)
    print(f"no-guidance parity: max|dv|/max|v| = {err:.2e}")
    assert err <= PARITY_RTOL

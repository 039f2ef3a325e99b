"""model.attention: every implementation against the einsum reference.

On the CPU: xla, chunked and splash (in Pallas' interpreter, also sharded)
equal einsum; the cuDNN and splash kernels lower for CUDA and TPU through
``jax.export``.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_helpers import env

from prefgrpo_jax import config as config_lib
from prefgrpo_jax.models import flux

REPO = Path(__file__).resolve().parent.parent
# Sequence 200 (not a multiple of the chunk sizes below nor of splash's
# 128-token tiles), 2 heads of 32: small enough for Pallas' interpreter.
B, L, H, D = 2, 200, 2, 32
# Max |impl - reference| on outputs up to ~0.75: fp32 differs by summation
# order only (measured <= 5e-7); bf16 by about one rounding of the output
# (2^-8 relative: 4e-3 measured for splash, which rounds probabilities first).
TOL = {jnp.float32: 2e-6, jnp.bfloat16: 8e-3}


def _qkv(dtype, length=L):
    keys = jax.random.split(jax.random.key(0), 3)
    return tuple(jax.random.normal(k, (B, length, H, D), jnp.float32).astype(dtype) for k in keys)


def _err(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_impls_equal_einsum_on_cpu(dtype):
    q, k, v = _qkv(dtype)
    ref = flux.einsum_attention(q, k, v)
    assert ref.shape == (B, L, H, D) and ref.dtype == dtype
    outs = {
        "xla": jax.jit(flux.xla_attention)(q, k, v),
        "splash(interpret)": jax.jit(lambda *a: flux.splash_attention(*a, interpret=True))(q, k, v),
    }
    for chunk in (16, 64, 128, 512):  # 64 and 128 do not divide 200; 512 > L is one chunk
        outs[f"chunked{chunk}"] = jax.jit(flux.chunked_attention, static_argnums=3)(q, k, v, chunk)
    for name, out in outs.items():
        assert out.shape == ref.shape and out.dtype == dtype, name
        assert _err(out, ref) < TOL[dtype], (name, _err(out, ref))
    # The tolerance is tight enough to catch a wrong softmax scale.
    assert _err(flux.einsum_attention(q * 1.1, k, v), ref) > 10 * TOL[dtype]


def test_splash_pads_ragged_length_without_leaking():
    # 130 tokens pad to 256: the padded keys sit in their own segment, so a
    # real query's output equals attention over the 130 real keys only.
    q, k, v = _qkv(jnp.float32, length=130)
    out = jax.jit(lambda *a: flux.splash_attention(*a, interpret=True))(q, k, v)
    assert _err(out, flux.einsum_attention(q, k, v)) < TOL[jnp.float32]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_gradients_equal_einsum(dtype):
    q, k, v = _qkv(dtype)
    w = jax.random.normal(jax.random.key(1), (B, L, H, D), jnp.float32)

    def grads(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    ref = grads(flux.einsum_attention)
    # Gradients sum over all 200 keys or queries: a few times the forward's tolerance.
    tol = 4 * TOL[dtype] * (1 if dtype == jnp.float32 else 4)
    for chunk in (16, 64):
        for name, g, r in zip("qkv", grads(lambda q, k, v: flux.chunked_attention(q, k, v, chunk)), ref):
            scale = float(jnp.max(jnp.abs(r.astype(jnp.float32))))
            assert g.dtype == dtype and _err(g, r) < tol * max(scale, 1.0), (chunk, name, _err(g, r), scale)


def test_chunked_scores_are_one_chunk_at_a_time():
    # The jaxpr of the chunked forward+backward never holds an [.., L, L] array:
    # only [.., chunk, L] score blocks (the point of the variant).
    q, k, v = _qkv(jnp.float32)
    loss = lambda q, k, v: jnp.sum(flux.chunked_attention(q, k, v, 16))
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    def shapes(jpr):
        for eqn in jpr.eqns:
            for var in eqn.outvars:
                yield getattr(var.aval, "shape", ())
            for sub in jax.core.jaxprs_in_params(eqn.params):
                yield from shapes(sub)

    all_shapes = list(shapes(jaxpr.jaxpr))
    assert not [s for s in all_shapes if s.count(L) >= 2]
    assert [s for s in all_shapes if s[-2:] == (16, L)]  # the per-chunk scores exist
    einsum_jaxpr = jax.make_jaxpr(jax.grad(lambda q, k, v: jnp.sum(flux.einsum_attention(q, k, v)),
                                           argnums=(0, 1, 2)))(q, k, v)
    assert [s for s in shapes(einsum_jaxpr.jaxpr) if s.count(L) >= 2]  # the check can fail


def test_transformer_chunked_equals_einsum():
    cfg = flux.FluxConfig.tiny(depth=1, depth_single=1)
    rng = np.random.default_rng(0)
    b, n_img, n_txt = 2, 24, 8
    img_ids = np.stack(np.meshgrid(np.arange(4), np.arange(6), indexing="ij"), -1).reshape(-1, 2)
    inputs = (
        jnp.asarray(rng.normal(size=(b, n_img, cfg.in_channels)), jnp.float32),
        jnp.broadcast_to(jnp.concatenate([jnp.zeros((n_img, 1)), img_ids], -1), (b, n_img, 3)),
        jnp.asarray(rng.normal(size=(b, n_txt, cfg.context_dim)), jnp.float32),
        jnp.zeros((b, n_txt, 3), jnp.float32),
        jnp.asarray([0.3, 0.8], jnp.float32),
        jnp.asarray(rng.normal(size=(b, cfg.vec_dim)), jnp.float32),
        jnp.full((b,), 3.5, jnp.float32),
    )

    def velocity(attention, **kw):
        model = flux.FluxTransformer(cfg, rngs=nnx.Rngs(0), attention=attention, **kw)
        return jax.jit(lambda m, *a: m(*a))(model, *inputs)

    # 32 tokens in chunks of 12: three chunks, the last ragged.
    ref, out = velocity("einsum"), velocity("chunked", attention_chunk=12)
    assert _err(out, ref) < 1e-5, _err(out, ref)


def test_auto_resolution_and_errors_name_the_field():
    assert jax.default_backend() == "cpu"
    assert flux.resolve_attention("auto") == "einsum"
    for impl, platform in (("cudnn", "GPU"), ("splash", "TPU")):
        with pytest.raises(ValueError, match=f"model.attention='{impl}' runs only on {platform}.*use 'auto'"):
            flux.resolve_attention(impl)
    with pytest.raises(ValueError, match="model.attention.*use one of auto, einsum"):
        flux.FluxTransformer(flux.FluxConfig.tiny(), rngs=nnx.Rngs(0), attention="flash")
    with pytest.raises(ValueError, match="model.attention_chunk=0: must be >= 1"):
        flux.FluxTransformer(flux.FluxConfig.tiny(), rngs=nnx.Rngs(0), attention="chunked",
                             attention_chunk=0)
    c = config_lib.base_config()
    c.model.attention = "flash"
    c.model.attention_chunk = 0
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate(c, num_devices=1)
    assert "config.model.attention='flash': must be one of ('auto', 'einsum'" in str(err.value)
    assert "config.model.attention_chunk=0: must be >= 1" in str(err.value)


# FLUX.1-dev's attention: 512 text + 4096 image tokens, 24 heads of 128.
_FLUX_QKV = jax.ShapeDtypeStruct((1, 4608, 24, 128), jnp.bfloat16)
# cuDNN's custom calls carry no serialization-compatibility guarantee, so
# jax.export refuses them unless told; these tests only lower, never store.
_CUDNN_CALLS = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")


def _export_fwd_bwd(fn, platform, qkv=_FLUX_QKV):
    """StableHLO text of ``fn``'s forward and backward lowered for ``platform``."""
    def fwd_bwd(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(out)

    checks = [jax.export.DisabledSafetyCheck.custom_call(c) for c in _CUDNN_CALLS]
    exported = jax.export.export(jax.jit(fwd_bwd), platforms=[platform], disabled_checks=checks)(
        *[qkv] * 3)
    assert exported.platforms == (platform,)
    assert exported.out_avals[0].shape == qkv.shape and exported.out_avals[0].dtype == qkv.dtype
    return exported.mlir_module()


def _assert_cudnn_fused(module):
    for call in _CUDNN_CALLS:  # the fused kernels, forward and backward, not a fallback
        assert f"custom_call @{call}(" in module, call


def test_cudnn_lowers_for_cuda():
    try:
        module = _export_fwd_bwd(flux.cudnn_attention, "cuda")
    except RuntimeError as e:
        if "cuDNN" not in str(e):
            raise
        # A CPU-only jaxlib has no CUDA plugin, and JAX asks it for the cuDNN
        # version while tracing, before any lowering.
        pytest.skip(f"this jaxlib cannot lower cuDNN attention for cuda: {e}")
    _assert_cudnn_fused(module)


def test_cudnn_lowers_for_cuda_given_a_cudnn_version(monkeypatch):
    # The one thing a CPU-only jaxlib lacks is the cuDNN version query
    # (cuDNN 9.10 stated here); shapes, layout, dtypes and JAX's own checks of
    # them are real, so the wrapper is checked even without a CUDA plugin.
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
    _assert_cudnn_fused(_export_fwd_bwd(flux.cudnn_attention, "cuda"))
    # fp32 activations run the bf16 kernel and come back fp32.
    fp32 = jax.ShapeDtypeStruct(_FLUX_QKV.shape, jnp.float32)
    module = _export_fwd_bwd(flux.cudnn_attention, "cuda", fp32)
    _assert_cudnn_fused(module)
    assert "(tensor<1x4608x24x128xbf16>, tensor<1x4608x24x128xbf16>, tensor<1x4608x24x128xbf16>)" in module


def test_splash_lowers_for_tpu():
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    module = _export_fwd_bwd(flux.splash_attention, "tpu")
    assert "tpu_custom_call" in module  # Mosaic kernels, forward and backward
    assert module.count("tpu_custom_call") >= 2


def test_splash_runs_sharded_in_a_shard_map():
    # 4 simulated devices, batch over "fsdp" and heads over "tensor" (the
    # trainer's activation rules). XLA cannot partition a Mosaic kernel: the
    # bare kernel fails to lower for a 4-device TPU program, which is why
    # splash_attention wraps it in a shard_map.
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "attention_probe.py")],
                          env=env(devices=4), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["err"] < TOL[jnp.float32]
    assert probe["out_spec"] == "P('fsdp', None, 'tensor')"
    assert probe["wrapped"].startswith("lowered"), probe["wrapped"]
    assert "cannot be automatically partitioned" in probe["bare"], probe["bare"]


def test_config_reaches_the_loaded_transformer(tiny_flux_dir):
    from prefgrpo_jax import plan
    from prefgrpo_jax import state as state_lib

    c = config_lib.base_config()
    c.model.path = str(tiny_flux_dir)
    c.model.attention, c.model.attention_chunk = "chunked", 5
    for load in (True, False):
        model = state_lib.load_pipeline(c, load_transformer=load).transformer
        assert (model.attention, model.attention_chunk) == ("chunked", 5)
    # The plan compiles on CPU devices: accelerator kernels are planned as chunked.
    assert [plan._plan_attention(a) for a in ("auto", "einsum", "cudnn", "splash")] == [
        "auto", "einsum", "chunked", "chunked"]

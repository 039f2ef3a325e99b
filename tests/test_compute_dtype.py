"""bf16 compute on fp32 master weights: how far log-probs and ratios drift from fp32."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefgrpo_jax import sampling
from prefgrpo_jax.models import flux
from prefgrpo_jax.pipeline import compute_dtype_of, make_velocity_fn


def _model(compute_dtype):
    return flux.FluxTransformer(flux.FluxConfig.tiny(), rngs=nnx.Rngs(0), dtype=compute_dtype)


def test_bf16_compute_casts_params_and_keeps_sde_fp32():
    fp32, bf16 = _model(jnp.float32), _model(jnp.bfloat16)
    assert compute_dtype_of(fp32) is None and compute_dtype_of(bf16) == jnp.bfloat16
    graph16, params = nnx.split(bf16)
    _, params32 = nnx.split(fp32)
    v32, v16 = make_velocity_fn(nnx.split(fp32)[0]), make_velocity_fn(graph16, jnp.bfloat16)
    cfg = fp32.cfg
    b, seq, txt = 4, 16, 8
    rng = np.random.default_rng(0)
    cond = {
        "img_ids": jnp.asarray(rng.normal(size=(b, seq, 3)), jnp.float32),
        "txt": jnp.asarray(rng.normal(size=(b, txt, cfg.context_dim)), jnp.float32),
        "txt_ids": jnp.zeros((b, txt, 3), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(b, cfg.vec_dim)), jnp.float32),
        "guidance": jnp.full((b,), 3.5, jnp.float32),
    }
    config = sampling.SamplerConfig(num_steps=6, group_size=2)
    traj = sampling.sample_trajectory(v32, config, params32, jax.random.key(1), cond, (seq, cfg.in_channels))
    sigmas = config.sigmas()
    errs, ratio_errs = [], []
    for i in range(config.num_steps - 1):
        x, x_next = traj.latents[:, i], traj.latents[:, i + 1]
        t = jnp.full((b,), sigmas[i], jnp.float32)
        logps = []
        for fn in (v32, v16):
            v = fn(params, x, t, cond)
            _, logp, _, _ = sampling.sde_step(x, v, sigmas[i], sigmas[i + 1], eta=config.eta,
                                             sigma_max=sigmas[1], next_sample=x_next)
            assert logp.dtype == jnp.float32
            logps.append(logp)
        np.testing.assert_allclose(logps[0], traj.log_probs[:, i], rtol=1e-5, atol=1e-5)
        errs.append(float(jnp.max(jnp.abs(logps[1] - logps[0]))))
        ratio_errs.append(float(jnp.max(jnp.abs(jnp.exp(logps[1] - logps[0]) - 1))))
    # Measured on this model (2026-12-03): max |d logp| 3.3e-4, max |ratio - 1|
    # 3.3e-4 over 5 transitions: bf16's 8 mantissa bits in the velocity only.
    # The bounds leave 3x margin.
    assert max(errs) < 1e-3, errs
    assert max(ratio_errs) < 1e-3, ratio_errs
    assert max(errs) > 0  # bf16 really was used

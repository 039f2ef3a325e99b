"""Our rollout updates against a PyTorch transcription of the reference's loop.

The reference (CodeGoat24/Pref-GRPO ``fastvideo/train_flux.py``, HEAD) trains one
rollout like this, per rank holding one prompt's group of G images:

* rewards -> per-source group advantages (unbiased std + 1e-8), weighted sum,
  optionally renormalised over the global batch (``--apply_gdpo``), clipped to
  +-adv_clip_max inside the loop;
* one random permutation of the first S-1 steps per sample; the first
  ``int(fraction (S-1))`` are trained;
* for every sample i, for every trained step: the Flow-GRPO transition under the
  current params, the ratio (plain, or GRPO-Guard's with ``--rationorm``), the
  clipped loss (divided by |dt| with rationorm) divided by
  ``gradient_accumulation_steps x trained steps``, ``backward``;
* every ``gradient_accumulation_steps`` samples: gradients averaged over ranks,
  ``clip_grad_norm_`` (its return value is the logged norm), AdamW step.

With G = 4 and accumulation 2 that is 2 optimizer steps per rollout, the second
off-policy. The loop below is written in PyTorch (float64) from those published
formulas, sample by sample and timestep by timestep, and compared with
``grpo.rollout_updates`` (fp32, batched, scanned) after each update.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefgrpo_jax import grpo, sampling
from prefgrpo_jax.rewards import registry

torch = pytest.importorskip("torch")

N, G, L, C, D, H = 2, 4, 4, 3, 5, 8  # prompts (= ranks), group, tokens, channels, cond, hidden
S, ETA, SHIFT, FRACTION = 6, 0.7, 3.0, 0.6
UPDATES = 2  # G / gradient_accumulation_steps
LR, WD, MAX_NORM, CLIP, ADV_CLIP = 1e-3, 1e-4, 0.1, 1e-4, 5.0  # the norm clip acts in some updates
WEIGHTS = {"judge": 0.7, "score": 1.4}  # the paper-era mix: win rate + CLIP


def init_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(0, 0.5, (C, H)), "wc": rng.normal(0, 0.5, (D, H)),
        "wt": rng.normal(0, 0.5, (H,)), "b1": rng.normal(0, 0.1, (H,)),
        "w2": rng.normal(0, 0.5, (H, C)), "b2": rng.normal(0, 0.1, (C,)),
    }


def jax_velocity(params, x, t, cond):
    h = jnp.tanh(x @ params["w1"] + (cond["c"] @ params["wc"])[:, None, :]
                 + t[:, None, None] * params["wt"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def torch_velocity(p, x, t, c):  # x [L, C], t scalar, c [D]
    h = torch.tanh(x @ p["w1"] + c @ p["wc"] + t * p["wt"] + p["b1"])
    return h @ p["w2"] + p["b2"]


def torch_sigmas():
    t = torch.linspace(1.0, 0.0, S + 1, dtype=torch.float64)
    return SHIFT * t / (1.0 + (SHIFT - 1.0) * t)


def torch_flow_step(p, x, x_next, c, j, sigmas):
    """Flow-GRPO transition j: (log-prob averaged over elements, mean, std, dt)."""
    sigma, sigma_next = sigmas[j], sigmas[j + 1]
    dt = sigma_next - sigma
    v = torch_velocity(p, x, sigma, c)
    den = sigmas[1] if float(sigma) == 1.0 else sigma
    std_t = torch.sqrt(sigma / (1.0 - den)) * ETA
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    s = std_t * torch.sqrt(-dt)
    logp = (-((x_next - mean) ** 2) / (2 * s**2) - torch.log(s) - math.log(math.sqrt(2 * math.pi))).mean()
    return logp, mean, s, dt


def torch_advantages(judge_P, scores, gdpo):
    """Per-source group advantages, weighted sum, optional GDPO (not yet clipped)."""
    g = judge_P.shape[-1]
    off = 1.0 - torch.eye(g, dtype=torch.float64)
    win = (judge_P * off).sum(-1) / (g - 1)
    total = torch.zeros(N * G, dtype=torch.float64)
    for name, r in (("judge", win), ("score", scores)):
        r = r.reshape(-1)
        adv = torch.zeros_like(r)
        for n in range(N):  # one group per rank
            grp = r[n * G:(n + 1) * G]
            adv[n * G:(n + 1) * G] = (grp - grp.mean()) / (grp.std() + 1e-8)
        total = total + WEIGHTS[name] * adv
    if gdpo:
        total = (total - total.mean()) / (total.std() + 1e-8)
    return total


def torch_reference(params0, latents, cond, perms, adv, rationorm):
    """The reference's rollout loop; returns per-update metrics and params."""
    sigmas = torch_sigmas()
    p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params0.items()}
    opt = torch.optim.AdamW(p.values(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
    lat = torch.tensor(latents, dtype=torch.float64)
    cnd = torch.tensor(cond, dtype=torch.float64)
    # The rollout: old log-probs and means under the initial params.
    with torch.no_grad():
        old = [[torch_flow_step(p, lat[b, j], lat[b, j + 1], cnd[b], j, sigmas)[:2] for j in range(S)]
               for b in range(N * G)]
    k = int((S - 1) * FRACTION)
    accum = G // UPDATES
    adv = torch.clamp(adv, -ADV_CLIP, ADV_CLIP)
    results = []
    for u in range(UPDATES):
        opt.zero_grad()
        total_loss, ratios = 0.0, []
        for n in range(N):  # ranks; FSDP averages their gradients
            for i in range(u * accum, (u + 1) * accum):
                b = n * G + i
                for j in perms[b, :k]:
                    j = int(j)
                    logp, mean, s, dt = torch_flow_step(p, lat[b, j], lat[b, j + 1], cnd[b], j, sigmas)
                    logp_old, mean_old = old[b][j]
                    if rationorm:
                        bias = ((mean - mean_old) ** 2).mean() / (2 * s**2)
                        ratio = torch.exp((logp - logp_old + bias) * s)
                    else:
                        ratio = torch.exp(logp - logp_old)
                    loss = torch.maximum(-adv[b] * ratio, -adv[b] * torch.clamp(ratio, 1 - CLIP, 1 + CLIP))
                    if rationorm:
                        loss = loss / dt.abs()
                    loss = loss / (accum * k) / N
                    loss.backward()
                    total_loss += loss.item()
                    ratios.append(ratio.item())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(p.values()), MAX_NORM))
        opt.step()
        ratios = np.array(ratios)
        results.append({
            "loss": total_loss, "grad_norm": grad_norm, "ratio_mean": ratios.mean(),
            "ratio_min": ratios.min(), "ratio_max": ratios.max(),
            "clip_fraction": float(np.mean(np.abs(ratios - 1) > CLIP)),
            "params": {kk: v.detach().numpy().copy() for kk, v in p.items()},
        })
    return old, results


@pytest.mark.parametrize("rationorm,gdpo", [(False, False), (False, True), (True, False), (True, True)])
def test_two_updates_per_rollout_match_the_reference_loop(rationorm, gdpo):
    params0 = init_params()
    rng = np.random.default_rng(1)
    cond = rng.normal(size=(N * G, D))
    # Rewards: a noisy pairwise judge (P + P^T = 1) and a pointwise score.
    upper = (rng.random((N, G, G)) < 0.5).astype(np.float64)
    judge_P = np.triu(upper, 1) + np.tril(1.0 - np.transpose(np.triu(upper, 1), (0, 2, 1)), -1)
    judge_P[:, np.arange(G), np.arange(G)] = 0.5
    scores = rng.normal(size=(N, G))
    k = int((S - 1) * FRACTION)
    perms = np.stack([rng.permutation(S - 1)[:k] for _ in range(N * G)])

    # Ours: the rollout, advantages, then rollout_updates.
    sampler = sampling.SamplerConfig(num_steps=S, eta=ETA, mode="flow", shift=SHIFT, group_size=G,
                                     return_means=True)
    jparams = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params0)
    cond_j = {"c": jnp.asarray(cond, jnp.float32)}
    traj = sampling.sample_trajectory(jax_velocity, sampler, jparams, jax.random.key(0), cond_j, (L, C))
    out = registry.advantages_from_outputs(
        {"judge": judge_P, "score": scores}, {"judge": "pairwise", "score": "pointwise"}, WEIGHTS,
        ddof=1, adv_clip_max=ADV_CLIP, gdpo=gdpo)
    cfg = grpo.GRPOConfig(clip_range=CLIP, timestep_fraction=FRACTION, micro_batches=2,
                          timestep_chunk=k, rationorm=rationorm, updates_per_rollout=UPDATES)
    opt = grpo.make_optimizer(LR, weight_decay=WD, max_grad_norm=MAX_NORM)
    step = grpo.make_train_step(jax_velocity, sampler, cfg, opt)
    batch = grpo.rollout_batch(traj, out.advantages, cond_j)
    batch["timesteps"] = jnp.asarray(perms, jnp.int32)
    seen = []
    state, metrics = grpo.rollout_updates(
        step, grpo.init_train_state(jparams, opt), batch, updates=UPDATES, group_size=G,
        after_update=lambda s: seen.append(jax.tree.map(np.asarray, s["params"])) or s)

    # The reference, on the same rollout.
    ref_adv = torch_advantages(torch.tensor(judge_P), torch.tensor(scores), gdpo)
    np.testing.assert_allclose(np.asarray(out.advantages).reshape(-1),
                               np.clip(ref_adv.numpy(), -ADV_CLIP, ADV_CLIP), rtol=1e-5, atol=1e-5)
    old, ref = torch_reference(params0, np.asarray(traj.latents, np.float64), cond, perms, ref_adv, rationorm)
    old_logp = np.array([[float(lp) for lp, _ in row] for row in old])
    old_mean = np.array([[m.numpy() for _, m in row] for row in old])
    np.testing.assert_allclose(np.asarray(traj.log_probs), old_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(traj.means), old_mean, atol=1e-5)

    for u, (ours, theirs) in enumerate(zip(metrics, ref)):
        # Loss and gradient norm: rtol 1e-4 (fp32 vs float64 over ~10^2 terms).
        np.testing.assert_allclose(float(ours["loss"]), theirs["loss"], rtol=1e-4, atol=1e-7, err_msg=f"update {u + 1}")
        np.testing.assert_allclose(float(ours["grad_norm"]), theirs["grad_norm"], rtol=1e-4, err_msg=f"update {u + 1}")
        for name in ("ratio_mean", "ratio_min", "ratio_max"):
            np.testing.assert_allclose(float(ours[name]), theirs[name], rtol=1e-6, err_msg=f"{name}, update {u + 1}")
        assert float(ours["clip_fraction"]) == pytest.approx(theirs["clip_fraction"])
        # Params after the AdamW step: one step moves them by ~lr = 1e-3.
        for name in params0:
            np.testing.assert_allclose(seen[u][name], theirs["params"][name], atol=2e-6, err_msg=f"{name}, update {u + 1}")
    # Update 1 is on-policy (the ratio is 1 up to rounding, nothing clipped); update 2 is not.
    assert float(metrics[0]["clip_fraction"]) == 0.0
    assert abs(ref[1]["ratio_max"] - 1) > CLIP or abs(ref[1]["ratio_min"] - 1) > CLIP
    assert float(metrics[1]["clip_fraction"]) > 0.0
    combined = grpo.combine_update_metrics(metrics)
    assert combined["clip_fraction/update1"] == 0.0 and combined["clip_fraction/update2"] > 0.0


def test_rollout_part_takes_a_slice_of_every_group():
    b = jnp.arange(N * G)
    parts = [np.asarray(grpo.rollout_part({"x": b}, u, 2, G)["x"]) for u in range(2)]
    np.testing.assert_array_equal(parts[0], [0, 1, 4, 5])
    np.testing.assert_array_equal(parts[1], [2, 3, 6, 7])
    with pytest.raises(ValueError, match="updates_per_rollout"):
        grpo.rollout_part({"x": b}, 0, 3, G)

"""Pairwise reward scoring of a whole group: vectorised vs naive per-pair.

All G(G-1)/2 unordered pairs of one group (one prompt), G in {4, 8, 16, 32},
with the pairwise preference reward model of ``prefgrpo_jax.rewards.pairwise``
on a CLIP backbone (our Flax CLIP towers, random weights):

* vectorised: ``RewardFns.group_reward`` -- the backbone encodes each of the G
  images (and the prompt) once, the antisymmetric head fills the G x G matrix
  in one call (jitted);
* naive, batched: ``pair_logits_from_inputs`` on all pairs in one jitted call
  -- the backbone runs on both images of every pair (G(G-1) image encodings)
  and on the prompt once per pair;
* naive, per pair: the same, one jitted call per pair in a Python loop (the
  shape of a judge that is asked pair after pair).

Pairs/s = G(G-1)/2 / time. The three agree on every P[i, j] (checked).
"""

from __future__ import annotations

import time
from typing import Any

from experiments import bench_common as bc

# CLIP towers for the backbone (random weights; FLOPs, not quality, matter here).
CLIPS = {
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, image_size=32, patch_size=8),
                 text=dict(vocab_size=100, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2,
                           max_position_embeddings=16, eos_token_id=2, projection_dim=32),
                 projection_dim=32, image_hw=48, text_len=16),
    # ViT-S/32-like vision tower at 224 (50 tokens), small text tower; 256x256 inputs are
    # resized in-graph like decoded FLUX images would be.
    "medium": dict(vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                               num_attention_heads=6, image_size=224, patch_size=32),
                   text=dict(vocab_size=1000, hidden_size=256, intermediate_size=1024,
                             num_hidden_layers=4, num_attention_heads=4,
                             max_position_embeddings=77, eos_token_id=2, projection_dim=256),
                   projection_dim=256, image_hw=256, text_len=77),
}
SIZES = {
    "tiny": dict(clip="tiny", groups=[4, 8], reps=2, naive_reps=1, per_pair_max_group=8),
    "medium": dict(clip="medium", groups=[4, 8, 16, 32], reps=3, naive_reps=1,
                   per_pair_max_group=32),
}


def worker(clip: str, groups: list[int], reps: int, naive_reps: int,
           per_pair_max_group: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from prefgrpo_jax.models.clip import CLIPConfig, CLIPVisionConfig
    from prefgrpo_jax.models.text_encoders import CLIPTextConfig
    from prefgrpo_jax.rewards import pairwise

    c = CLIPS[clip]
    ccfg = CLIPConfig(text=CLIPTextConfig(**c["text"]), vision=CLIPVisionConfig(**c["vision"]),
                      projection_dim=c["projection_dim"])
    cfg = pairwise.RewardModelConfig(kind="pairwise", backbone="clip", hidden=64, depth=2,
                                     clip=ccfg)
    model = pairwise.build_reward_model(cfg, rngs=nnx.Rngs(0))
    fns, params = pairwise.split_reward_model(model)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    rng = np.random.default_rng(0)
    T, HW = c["text_len"], c["image_hw"]
    ids = rng.integers(3, c["text"]["vocab_size"], (1, T)).astype(np.int32)
    ids[0, -1] = c["text"]["eos_token_id"]
    mask = np.ones((1, T), np.int32)

    vectorised = jax.jit(fns.group_reward)
    naive = jax.jit(lambda p, i, m, a, b: pairwise.probs_from_logits(
        fns.merge(p).pair_logits_from_inputs(i, m, a, b)))
    out = []
    for g in groups:
        images = jnp.asarray(rng.random((1, g, HW, HW, 3), dtype=np.float32))
        ii, jj = np.triu_indices(g, k=1)
        n_pairs = len(ii)
        a, b = images[0, ii], images[0, jj]
        pid, pmask = jnp.asarray(np.repeat(ids, n_pairs, 0)), jnp.asarray(
            np.repeat(mask, n_pairs, 0))
        ids1, mask1 = jnp.asarray(ids), jnp.asarray(mask)
        r: dict[str, Any] = {"group": g, "pairs": n_pairs}

        t = time.perf_counter()
        P = jax.block_until_ready(vectorised(params, ids1, mask1, images))
        r["vectorised"] = bc.timed(lambda: jax.block_until_ready(
            vectorised(params, ids1, mask1, images)), reps=reps)
        r["vectorised"]["first_call_total_s"] = time.perf_counter() - t

        t = time.perf_counter()
        Pn = jax.block_until_ready(naive(params, pid, pmask, a, b))
        r["naive_batched"] = bc.timed(lambda: jax.block_until_ready(
            naive(params, pid, pmask, a, b)), reps=naive_reps)
        r["naive_batched"]["first_call_total_s"] = time.perf_counter() - t
        r["max_abs_diff_naive_vs_vectorised"] = float(
            jnp.max(jnp.abs(Pn - P[0, ii, jj])))

        if g <= per_pair_max_group:
            singles = [(a[k:k + 1], b[k:k + 1]) for k in range(n_pairs)]

            def per_pair():
                res = [naive(params, ids1, mask1, x, y) for x, y in singles]
                return jax.block_until_ready(res)
            r["naive_per_pair"] = bc.timed(per_pair, reps=naive_reps)
        for name in ("vectorised", "naive_batched", "naive_per_pair"):
            if name in r:
                r[name]["pairs_per_s"] = n_pairs / r[name]["steady_s"]
                r[name]["image_encodings"] = g if name == "vectorised" else 2 * n_pairs
        out.append(r)
    return {"per_group": out, "reward_model_params": n_params, "clip": c}


def run(size: str, out_dir: str, threads: int, argv: list[str],
        overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    started, load0 = time.time(), bc.loadavg()
    s = {**SIZES[size], **(overrides or {})}
    r = bc.run_worker("experiments.bench_pairs:worker",
                      dict(clip=s["clip"], groups=s["groups"], reps=s["reps"],
                           naive_reps=s["naive_reps"],
                           per_pair_max_group=s["per_pair_max_group"]), threads=threads)
    rows = []
    for x in r["per_group"]:
        v, nb, npp = x["vectorised"], x["naive_batched"], x.get("naive_per_pair")
        x["speedup_vs_naive_batched"] = nb["steady_s"] / v["steady_s"]
        x["speedup_vs_naive_per_pair"] = npp["steady_s"] / v["steady_s"] if npp else None
        rows.append([x["group"], x["pairs"], v["steady_s"], v["pairs_per_s"], nb["steady_s"],
                     nb["pairs_per_s"], npp["steady_s"] if npp else None,
                     npp["pairs_per_s"] if npp else None, x["speedup_vs_naive_batched"],
                     x["speedup_vs_naive_per_pair"], x["max_abs_diff_naive_vs_vectorised"]])
    first, last = r["per_group"][0], r["per_group"][-1]
    growth = {
        "group_ratio": last["group"] / first["group"],
        "pairs_ratio": last["pairs"] / first["pairs"],
        "vectorised_time_ratio": last["vectorised"]["steady_s"] / first["vectorised"]["steady_s"],
        "naive_batched_time_ratio": (last["naive_batched"]["steady_s"]
                                     / first["naive_batched"]["steady_s"]),
    }
    c = r["clip"]
    payload = {
        "config": {"size": size, **s, "reward_model": "PairwiseRewardModel, CLIP backbone",
                   "reward_model_params": r["reward_model_params"], "clip": c,
                   "dtype": "float32"},
        "threads": bc.thread_settings_doc(threads),
        "results": r["per_group"], "growth": growth,
    }
    md = [
        f"Pairwise reward model (`prefgrpo_jax.rewards.pairwise`, CLIP backbone: vision "
        f"{c['vision']['num_hidden_layers']}x{c['vision']['hidden_size']} at "
        f"{c['vision']['image_size']}px / patch {c['vision']['patch_size']}, text "
        f"{c['text']['num_hidden_layers']}x{c['text']['hidden_size']}; "
        f"{r['reward_model_params']:,} params, random weights), {c['image_hw']}x{c['image_hw']} "
        f"input images resized in-graph, one prompt, fp32, {threads} threads. "
        "Times are per group (all G(G-1)/2 pairs).\n",
        bc.md_table(["G", "pairs", "vectorised s", "vectorised pairs/s", "naive batched s",
                     "naive batched pairs/s", "naive per-pair s", "naive per-pair pairs/s",
                     "speed-up vs batched", "speed-up vs per-pair", "max abs dP"], rows),
        "",
        f"Growth from G={first['group']} to G={last['group']} (x{growth['group_ratio']:g} "
        f"images, x{growth['pairs_ratio']:g} pairs): vectorised time "
        f"x{growth['vectorised_time_ratio']:.2f}, naive batched time "
        f"x{growth['naive_batched_time_ratio']:.2f}. The vectorised scorer's cost is the G "
        "backbone passes plus an O(G^2) head on D-dim features; the naive one runs the "
        "backbone G(G-1) times.",
    ]
    bc.write_results("pairs", out_dir, payload, "\n".join(md), started=started,
                     load_before=load0, argv=argv)
    return payload

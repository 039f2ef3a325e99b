"""The overlapped step: the judge works while the accelerators decode and train.

Sequentially, a step samples, decodes everything, sends every pair to the
judge, waits for the last answer, then trains: the accelerators idle for the
whole judging. With ``train.overlap``:

1. the rollout's reward latents are decoded in chunks of groups (each chunk its
   own dispatch; the host blocks only on the chunk it needs) and each chunk is
   moved to the host as uint8 (4x less than fp32) and handed to the reward
   sources at once: a judge (``RewardSource.start_round``) queues the chunk's
   pairs while the next chunk decodes; other sources score the chunk;
2. the first update of the rollout trains micro-batch by micro-batch, each
   micro-batch made of whole groups (``grpo.make_train_step(split=True)``),
   dispatched as soon as its groups' advantages are in, while the judge works
   on later groups. This needs advantages computed per group
   (``train.adv_norm='group'``, no ``reward.gdpo``) and groups that split evenly
   into ``train.micro_batches``; otherwise every reward is awaited first and
   the update runs as usual (logged once). Later updates of the rollout
   (``updates_per_rollout > 1``) need the first update's params and every
   group's advantages, so they run as usual.

``judge_wait_s``: the time the host waited for the judge with no accelerator
work left to wait for (before each wait on the judge the host first waits for
the work already dispatched, so this is accelerator idle time).

Single process only: the chunked decode slices the global batch by rows.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prefgrpo_jax import grpo, sampling
from prefgrpo_jax.rewards.registry import RewardMix


@jax.jit
def to_uint8(images: jax.Array) -> jax.Array:
    """``[..., 3]`` in [0, 1] -> uint8, rounded to nearest on the accelerator (what the
    judge receives; the host-side ``judge.image_to_uint8`` rounds the same way, up
    to fp32 vs fp64 at exact .5 boundaries)."""
    return jnp.clip(jnp.round(images.astype(jnp.float32) * 255.0), 0, 255).astype(jnp.uint8)


def group_chunks(num_groups: int, chunks: int) -> list[range]:
    """``num_groups`` split into ``min(chunks, num_groups)`` contiguous near-equal ranges."""
    parts = np.array_split(np.arange(num_groups), max(1, min(chunks, num_groups)))
    return [range(int(p[0]), int(p[-1]) + 1) for p in parts]


class RewardStream:
    """A step's rewards, fed chunk by chunk as the groups are decoded.

    ``add(groups, uint8, floats)``: hands a chunk (``[n, G, H, W, 3]`` on the host)
    to every source: a source with ``start_round`` gets the uint8 images group by
    group (its requests start at once), any other is called on the float chunk.
    ``advantages(groups)``: ``[n, G]`` fp32 of those groups, waiting for them
    (only valid when advantages are per group). ``outputs()``: every source's
    output for the whole batch. ``wait_s``: seconds spent waiting on the sources.
    """

    def __init__(self, mix: RewardMix, prompts: Sequence[str], group_size: int):
        self.mix = mix
        self.prompts = list(prompts)
        self.group_size = int(group_size)
        n = len(self.prompts)
        self.rounds = {name: src.start_round(n, self.group_size)
                       for name, src in mix.sources.items() if src.start_round is not None}
        self._chunks: dict[str, dict[int, np.ndarray]] = {
            name: {} for name in mix.sources if name not in self.rounds}
        self.wait_s = 0.0

    @property
    def needs_floats(self) -> bool:
        """True when a source scores float images (not only judges taking uint8)."""
        return bool(self._chunks)

    def add(self, groups: range, uint8: np.ndarray | None, floats: np.ndarray | None) -> None:
        for name, judging in self.rounds.items():
            for row, b in enumerate(groups):
                judging.submit(b, self.prompts[b], uint8[row])
        for name, parts in self._chunks.items():
            src = self.mix.sources[name]
            parts[groups.start] = src.checked(
                src.fn(self.prompts[groups.start:groups.stop], floats), len(groups), self.group_size)

    def ready(self, groups: Sequence[int]) -> bool:
        """True when ``advantages(groups)`` would not wait on the judge."""
        return all(judging.done(groups) for judging in self.rounds.values())

    def advantages(self, groups: range) -> np.ndarray:
        """``[n, G]`` fp32 advantages of ``groups`` (per-group normalisation only)."""
        t0 = time.perf_counter()
        outputs = {name: judging.matrix(groups) for name, judging in self.rounds.items()}
        self.wait_s += time.perf_counter() - t0
        for name, parts in self._chunks.items():
            outputs[name] = self._rows(parts, groups)
        return np.asarray(self.mix.from_outputs(outputs).advantages, np.float32)

    def outputs(self) -> dict[str, np.ndarray]:
        """Every source's ``[N, ...]`` output (waits for the judge; its stats counted)."""
        t0 = time.perf_counter()
        outputs = {name: judging.result() for name, judging in self.rounds.items()}
        self.wait_s += time.perf_counter() - t0
        everything = range(len(self.prompts))
        for name, parts in self._chunks.items():
            outputs[name] = self._rows(parts, everything)
        return outputs

    @staticmethod
    def _rows(parts: dict[int, np.ndarray], groups: range) -> np.ndarray:
        """Rows ``groups`` of the chunks (stored by their first group; all added by now)."""
        return np.concatenate([parts[start] for start in sorted(parts)])[groups.start:groups.stop]


def stream_decoded(decode: Callable[[jax.Array], jax.Array], latents: jax.Array, stream: RewardStream,
                   chunks: Sequence[range], group_size: int) -> np.ndarray:
    """Decodes ``latents [B, L, C]`` chunk by chunk into ``stream``.

    Every chunk's decode is dispatched first, so the accelerator decodes chunk
    c + 1 while the host encodes and queues chunk c.

    Returns:
      The images ``[N, G, H, W, 3]`` on the host (uint8, or float when a source
      needs floats): for the image grids.
    """
    g = group_size
    pending = []
    for groups in chunks:
        images = decode(latents[groups.start * g:groups.stop * g])
        pending.append((groups, images, to_uint8(images) if stream.rounds else None))
    host = []
    for groups, images, quantised in pending:
        shape = (len(groups), g) + tuple(images.shape[1:])
        u8 = None if quantised is None else np.asarray(quantised).reshape(shape)
        floats = np.asarray(images).reshape(shape) if stream.needs_floats else None
        stream.add(groups, u8, floats)
        host.append(floats if floats is not None else u8)
    return np.concatenate(host)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one step overlaps: decode chunks and whether the first update trains
    micro-batch by micro-batch (``per_group``)."""

    chunks: list[range]
    per_group: bool
    reason: str = ""  # why not per_group


def plan(num_groups: int, micro_batches: int, adv_norm: str, gdpo: bool) -> Plan:
    """Micro-batches of whole groups when the advantages are per group and the
    groups split evenly; otherwise decode chunks only (``reason`` says why)."""
    chunks = group_chunks(num_groups, micro_batches)
    if adv_norm != "group" or gdpo:
        return Plan(chunks, False, f"train.adv_norm={adv_norm!r}, reward.gdpo={gdpo}: advantages "
                    "need the whole batch (per-group overlap needs adv_norm='group' and no gdpo)")
    if num_groups % micro_batches:
        return Plan(chunks, False, f"{num_groups} groups do not split evenly into "
                    f"train.micro_batches={micro_batches}")
    return Plan(chunks, True)


def overlapped_updates(
    split: grpo.SplitStep,
    train_step: Callable[..., Any],
    state: grpo.TrainState,
    batch: dict,
    advantages: Callable[[range], np.ndarray],
    chunks: Sequence[range],
    *,
    updates: int,
    group_size: int,
    ref_params: Any = None,
    frozen: Any = None,
    after_update: Callable[[grpo.TrainState], grpo.TrainState] | None = None,
    before_wait: Callable[[range, Any], None] | None = None,
) -> tuple[grpo.TrainState, list[dict[str, jax.Array]], np.ndarray]:
    """``grpo.rollout_updates`` with the first update fed micro-batch by micro-batch.

    Args:
      batch: the rollout without ``advantages`` (``rollout_batch`` keys, with
        ``timesteps``), ``B = N x G`` rows, group-major.
      advantages: ``groups -> [n, G]`` fp32 advantages of those groups (may wait).
      chunks: the first update's micro-batches as ranges of groups, all the same size.
      ref_params, frozen: the KL reference and LoRA's base (``grpo.make_train_step``).
      before_wait: ``(groups, carry)``, called before ``advantages(groups)`` with
        the gradients in flight (e.g. to wait for the accelerator first, so that
        the judge wait measured after it is accelerator idle time).

    Returns:
      ``(state, [metrics of each update], advantages [N, G])``: the same update
      as ``rollout_updates`` on the full batch, up to the fp32 summation order
      of the micro-batches.
    """
    if len({len(c) for c in chunks}) != 1:
        raise ValueError(f"micro-batches of whole groups must be equal in size, got {[len(c) for c in chunks]}")
    per = group_size // updates
    first = grpo.rollout_part({k: v for k, v in batch.items() if k != "advantages"}, 0, updates, group_size)
    carry = split.start(state)
    adv = []
    for groups in chunks:
        if before_wait is not None:
            before_wait(groups, carry)
        a = advantages(groups)  # [n, G]
        adv.append(a)
        mb = jax.tree.map(lambda x: x[groups.start * per:groups.stop * per], first)
        mb["advantages"] = jnp.asarray(a[:, :per].reshape(-1))
        carry = split.add(state, carry, mb, ref_params, frozen)
    state, metrics = split.finish(state, carry)
    if after_update is not None:
        state = after_update(state)
    adv_all = np.concatenate(adv)
    per_update = [metrics]
    if updates > 1:
        full = {**batch, "advantages": jnp.asarray(adv_all.reshape(-1))}
        for u in range(1, updates):
            state, m = train_step(state, grpo.rollout_part(full, u, updates, group_size), None, ref_params, frozen)
            if after_update is not None:
                state = after_update(state)
            per_update.append(m)
    return state, per_update, adv_all


def trainer_step(trainer, traj, prompts: list[str], cond, uncond, k_train: jax.Array,
                 window: int, window_start) -> tuple[Any, np.ndarray, list, np.ndarray, dict[str, float]]:
    """``Trainer.step``'s rewards and updates, overlapped (``train.overlap``).

    Returns:
      ``(RewardOutput of the batch, advantages [N, G], [metrics of each update],
      images [N, G, H, W, 3] float in [0, 1] on the host, timings)``, timings:
      ``reward_time_s`` (decode start to the last reward in) and ``judge_wait_s``.
    """
    cfg = trainer.config.train
    g = cfg.group_size
    steps = trainer.overlap_plan
    t0 = time.perf_counter()
    stream = RewardStream(trainer.reward, prompts, g)
    images = stream_decoded(lambda x: trainer.decode(trainer.vae_params, x),
                            sampling.reward_latents(traj, cfg.reward_image), stream, steps.chunks, g)
    # Advantages are filled in per micro-batch (or below, when all are in).
    placeholder = jnp.zeros((len(prompts) * g,), jnp.float32)
    batch = trainer.rollout_batch(traj, placeholder, cond, uncond, k_train, window, window_start)
    updates = trainer.grpo.updates_per_rollout
    if steps.per_group:
        def before_wait(groups, carry):
            if not stream.ready(groups):
                jax.block_until_ready(carry)

        state, per_update, _ = overlapped_updates(
            trainer.split_step, trainer.train_step, trainer.state, batch, stream.advantages, steps.chunks,
            updates=updates, group_size=g, ref_params=trainer.ref_params, frozen=trainer.frozen,
            after_update=trainer.ema_update, before_wait=before_wait,
        )
        out = trainer.reward.from_outputs(stream.outputs())
    else:
        out = trainer.reward.from_outputs(stream.outputs())
        batch["advantages"] = jnp.asarray(out.advantages, jnp.float32).reshape(-1)
        state, per_update = grpo.rollout_updates(
            trainer.train_step, trainer.state, batch, updates=updates, group_size=g,
            ref_params=trainer.ref_params, frozen=trainer.frozen, after_update=trainer.ema_update,
        )
    trainer.state = state
    reward_time = time.perf_counter() - t0
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    timings = {"reward_time_s": reward_time, "judge_wait_s": stream.wait_s}
    return out, np.asarray(out.advantages, np.float32), per_update, images, timings


__all__ = ["Plan", "RewardStream", "group_chunks", "overlapped_updates", "plan", "stream_decoded", "to_uint8",
           "trainer_step"]

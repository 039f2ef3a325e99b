"""Reward sources by name, and their mix into clipped group-relative advantages.

A config names its rewards and their weights in one dict, the ``reward_spec``::

    {"pairwise_model": 1.0}                  # Pref-GRPO with the in-graph PPRM
    {"vlm_judge": 0.4, "clip": 0.6}          # the reference's newer recipe
    {"pointwise_model": 1.0}                 # score-maximisation baseline

Each name is looked up in a dict of *factories* (:data:`REWARD_FACTORIES`, or
one passed in); a factory takes the keyword options of that source (from
``options[name]``) and returns a :class:`RewardSource`. A source is called as
``source(prompts [N], images [N, G, H, W, 3] in [0, 1])`` and returns either

* ``P [N, G, G]`` (kind ``"pairwise"``: ``pairwise_model``, ``vlm_judge``),
  turned into win rates ``w [N, G]``, or
* scores ``[N, G]`` (kind ``"pointwise"``: ``clip``, ``pointwise_model``, or any
  callable such as a toy-world verifier ``fn(prompts, images) -> [N, G]``).

Every source's reward is normalised on its own (``adv_norm``: within its
group, by default; ``ddof`` from the config), the advantages are summed with
their weights, optionally renormalised over the batch (``gdpo``), and the sum
is clipped to ``[-adv_clip_max, adv_clip_max]``. Training programs and the toy
world add their own sources with :func:`register_reward` (or by passing
``factories=``).

Diagnostics per source ``k`` (floats): ``k/reward_mean``, ``k/reward_std``
(over all images), ``k/group_std`` (mean within-group std: the denominator
whose smallness causes the "illusory advantage"), ``k/adv_spread`` (mean over
groups of max - min advantage), ``k/adv_abs_max``; pairwise sources add
``k/win_rate_mean`` (always 0.5 when ``P + P^T = 1``: a sanity check) and
``k/tie_frac`` (off-diagonal entries equal to 0.5); sources that were called add
``k/time_s``. Overall: ``advantage/mean``, ``advantage/std``,
``advantage/abs_max`` and ``advantage/clip_frac`` (before clipping).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prefgrpo_jax.rewards.advantages import (
    clip_advantages,
    combine_advantages,
    gdpo_normalize,
    normalized_advantages,
    win_rates,
)

__all__ = [
    "REWARD_FACTORIES",
    "RewardMix",
    "RewardOutput",
    "RewardSource",
    "advantages_from_outputs",
    "build_reward_mix",
    "known_rewards",
    "pairwise_source",
    "pointwise_source",
    "register_reward",
]

PAIRWISE, POINTWISE = "pairwise", "pointwise"


@dataclasses.dataclass(frozen=True)
class RewardSource:
    """A named reward: ``fn(prompts, images) -> P [N, G, G]`` or scores ``[N, G]``."""

    name: str
    kind: str
    fn: Callable[[Sequence[str], Any], Any]
    # Cumulative request counters (``requests``, ``failed``, ``retried``,
    # ``unparseable``) of sources that call a server; the trainer logs per-step deltas.
    counters: Callable[[], Mapping[str, float]] | None = None
    # Sources that judge a step group by group (``VLMJudge.start_round``):
    # ``start_round(N, G)`` -> a round taking each group as soon as it is decoded.
    start_round: Callable[[int, int], Any] | None = None

    def __post_init__(self):
        if self.kind not in (PAIRWISE, POINTWISE):
            raise ValueError(f"reward source {self.name!r}: kind must be 'pairwise' or "
                             f"'pointwise', got {self.kind!r}")

    def __call__(self, prompts: Sequence[str], images) -> np.ndarray:
        n, g = np.shape(images)[:2]
        return self.checked(self.fn(prompts, images), n, g)

    def checked(self, out, n: int, g: int) -> np.ndarray:
        """``out`` as float32 after checking its shape (for ``n`` groups of ``g``) and finiteness."""
        out = np.asarray(out, dtype=np.float32)
        want = (n, g, g) if self.kind == PAIRWISE else (n, g)
        if out.shape != want:
            raise ValueError(f"reward source {self.name!r} ({self.kind}) returned shape "
                             f"{out.shape}, expected {want} for {n} groups of {g} images")
        if not np.all(np.isfinite(out)):
            raise ValueError(f"reward source {self.name!r} returned NaN or inf")
        return out


def pairwise_source(name: str, fn: Callable[[Sequence[str], Any], Any]) -> RewardSource:
    """Wraps ``fn(prompts, images) -> P [N, G, G]`` (``P[n, i, j] = P(i beats j)``)."""
    return RewardSource(name, PAIRWISE, fn)


def pointwise_source(name: str, fn: Callable[[Sequence[str], Any], Any]) -> RewardSource:
    """Wraps ``fn(prompts, images) -> scores [N, G]`` (e.g. a verifier)."""
    return RewardSource(name, POINTWISE, fn)


# --------------------------------------------------------------------------- #
# The math: outputs of the sources -> advantages + diagnostics (pure jnp)
# --------------------------------------------------------------------------- #


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RewardOutput:
    """Result of a reward mix for one batch of groups (a pytree).

    advantages: ``[N, G]`` fp32, weighted sum of per-source advantages, clipped.
    rewards: source -> ``[N, G]`` reward (win rate or score).
    source_advantages: source -> ``[N, G]`` group-normalised advantage (unweighted).
    diagnostics: flat ``{"source/metric": value}``: Python floats from
      :meth:`RewardMix.__call__`, fp32 scalars from :func:`advantages_from_outputs`.
    """

    advantages: jax.Array
    rewards: dict[str, jax.Array]
    source_advantages: dict[str, jax.Array]
    diagnostics: dict[str, Any]


def advantages_from_outputs(
    outputs: Mapping[str, Any],
    kinds: Mapping[str, str],
    weights: Mapping[str, float],
    *,
    ddof: int = 1,
    adv_clip_max: float | None = None,
    eps: float = 1e-8,
    adv_norm: str = "group",
    gdpo: bool = False,
) -> RewardOutput:
    """Turns each source's P or scores into advantages and mixes them (jit-able).

    Args:
      outputs: source name -> ``P [N, G, G]`` (pairwise) or ``[N, G]`` (pointwise),
        for the global batch (batch-wide statistics are over all N groups).
      kinds: source name -> ``"pairwise"`` / ``"pointwise"``.
      weights: source name -> weight (same names as ``outputs``).
      ddof: of the group std (1: the reference / PyTorch; 0: population std).
      adv_clip_max: clip of the mixed advantage, None for no clipping.
      eps: added to the group std.
      adv_norm: per-source normalisation, see ``normalized_advantages``.
      gdpo: renormalise the weighted sum over the batch before the clip
        (``gdpo_normalize``).
    """
    if set(outputs) != set(weights) or set(outputs) != set(kinds):
        raise ValueError(f"outputs {sorted(outputs)}, kinds {sorted(kinds)} and weights "
                         f"{sorted(weights)} must name the same sources")
    rewards: dict[str, jax.Array] = {}
    advs: dict[str, jax.Array] = {}
    diag: dict[str, jax.Array] = {}
    for name in sorted(outputs):
        out = jnp.asarray(outputs[name], jnp.float32)
        if kinds[name] == PAIRWISE:
            if out.ndim != 3:
                raise ValueError(f"pairwise source {name!r} must give [N, G, G], got {out.shape}")
            r = win_rates(out)
            g = out.shape[-1]
            off = ~jnp.eye(g, dtype=bool)
            diag[f"{name}/win_rate_mean"] = jnp.mean(r)
            diag[f"{name}/tie_frac"] = jnp.sum((out == 0.5) & off) / (out.shape[0] * g * (g - 1))
        elif kinds[name] == POINTWISE:
            if out.ndim != 2:
                raise ValueError(f"pointwise source {name!r} must give [N, G], got {out.shape}")
            r = out
        else:
            raise ValueError(f"source {name!r}: unknown kind {kinds[name]!r}")
        a = normalized_advantages(r, adv_norm, ddof=ddof, eps=eps)
        rewards[name], advs[name] = r, a
        diag[f"{name}/reward_mean"] = jnp.mean(r)
        diag[f"{name}/reward_std"] = jnp.std(r)
        diag[f"{name}/group_std"] = jnp.mean(jnp.std(r, axis=1, ddof=ddof))
        diag[f"{name}/adv_spread"] = jnp.mean(jnp.max(a, axis=1) - jnp.min(a, axis=1))
        diag[f"{name}/adv_abs_max"] = jnp.max(jnp.abs(a))
    shapes = {k: v.shape for k, v in rewards.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"reward sources disagree on [N, G]: {shapes}")
    mixed = combine_advantages(advs, {k: float(weights[k]) for k in advs})
    if gdpo:
        mixed = gdpo_normalize(mixed, eps)
    if adv_clip_max is not None:
        diag["advantage/clip_frac"] = jnp.mean(jnp.abs(mixed) > adv_clip_max)
    else:
        diag["advantage/clip_frac"] = jnp.zeros(())
    mixed = clip_advantages(mixed, adv_clip_max)
    diag["advantage/mean"] = jnp.mean(mixed)
    diag["advantage/std"] = jnp.std(mixed)
    diag["advantage/abs_max"] = jnp.max(jnp.abs(mixed))
    return RewardOutput(mixed, rewards, advs, diag)


# --------------------------------------------------------------------------- #
# The mix of named sources
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class RewardMix:
    """Weighted reward sources; ``mix(prompts, images) -> RewardOutput``."""

    sources: dict[str, RewardSource]
    weights: dict[str, float]
    ddof: int = 1
    adv_clip_max: float | None = 5.0
    eps: float = 1e-8
    adv_norm: str = "group"
    gdpo: bool = False

    def __call__(self, prompts: Sequence[str], images) -> RewardOutput:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, one per group")
        shape = np.shape(images)
        if len(shape) != 5 or shape[-1] != 3:
            raise ValueError(f"images must be [N, G, H, W, 3], got {shape}")
        if len(prompts) != shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {shape[0]} groups of images")
        outputs, times = {}, {}
        for name, src in self.sources.items():
            t0 = time.perf_counter()
            outputs[name] = src(prompts, images)
            times[name] = time.perf_counter() - t0
        res = self.from_outputs(outputs)
        res.diagnostics = {k: float(v) for k, v in res.diagnostics.items()}
        res.diagnostics.update({f"{k}/time_s": t for k, t in times.items()})
        return res

    def from_outputs(self, outputs: Mapping[str, Any]) -> RewardOutput:
        """The math alone, for outputs computed elsewhere; jit-able (diagnostics
        stay fp32 scalars)."""
        return advantages_from_outputs(
            outputs, {k: s.kind for k, s in self.sources.items()}, self.weights,
            ddof=self.ddof, adv_clip_max=self.adv_clip_max, eps=self.eps,
            adv_norm=self.adv_norm, gdpo=self.gdpo)


# --------------------------------------------------------------------------- #
# Built-in factories
# --------------------------------------------------------------------------- #


def _model_source(kind: str):
    def factory(*, path: str | None = None, model: Any = None, tokenizer: Any = None,
                name: str = f"{kind}_model") -> RewardSource:
        """The in-graph reward model: ``path`` (saved by ``save_reward_model``) or
        ``model`` + ``tokenizer`` (``texts -> (ids, mask)``)."""
        from prefgrpo_jax.rewards.pairwise import load_reward_model, split_reward_model

        if (path is None) == (model is None):
            raise ValueError(f"{name}: give exactly one of path= (a saved reward model) "
                             "or model= (with tokenizer=)")
        if path is not None:
            model, saved_tok = load_reward_model(path)
            tokenizer = tokenizer or saved_tok
        if tokenizer is None:
            raise ValueError(f"{name}: no tokenizer (pass tokenizer= or save one with the model)")
        if model.kind != kind:
            raise ValueError(f"{name}: expected a {kind} reward model, got a {model.kind} one")
        fns, params = split_reward_model(model)
        scorer = jax.jit(fns.group_reward)

        def fn(prompts, images):
            ids, mask = tokenizer(list(prompts))
            return scorer(params, jnp.asarray(ids), jnp.asarray(mask),
                          jnp.asarray(images, jnp.float32))

        return RewardSource(name, kind, fn)

    return factory


def _vlm_judge_factory(*, judge: Any = None, name: str = "vlm_judge", **judge_kwargs
                       ) -> RewardSource:
    """An HTTP VLM judge: ``judge=`` a ``VLMJudge``, or its constructor's keywords
    (``base_url``, ``model``, ``debias``, ...)."""
    if judge is None:
        from prefgrpo_jax.rewards.judge import VLMJudge

        judge = VLMJudge(**judge_kwargs)
    elif judge_kwargs:
        raise ValueError(f"{name}: give judge= or VLMJudge keywords, not both")
    return RewardSource(name, PAIRWISE, lambda prompts, images: judge.preference_matrix(
        list(prompts), np.asarray(images)), counters=lambda: judge.stats.as_dict(),
        start_round=getattr(judge, "start_round", None))  # a stand-in judge may judge only whole batches


def _clip_factory(*, path: str | None = None, model: Any = None, tokenizer: Any = None,
                  name: str = "clip") -> RewardSource:
    """CLIP score (cosine of image and prompt features): ``path`` of a transformers
    ``CLIPModel`` directory (weights + tokenizer), or ``model`` + ``tokenizer``."""
    from prefgrpo_jax.models.clip import load_clip, preprocess_images
    from prefgrpo_jax.rewards.pairwise import HFTokenizer

    if (path is None) == (model is None):
        raise ValueError(f"{name}: give exactly one of path= (a CLIP directory) or model=")
    if path is not None:
        model = load_clip(path)
        if tokenizer is None:
            tokenizer = HFTokenizer.from_pretrained(
                path, max_length=model.cfg.text.max_position_embeddings)
    if tokenizer is None:
        raise ValueError(f"{name}: model= needs tokenizer= (texts -> (ids, mask))")
    from flax import nnx

    graphdef, params = nnx.split(model, nnx.Param)
    size = model.cfg.vision.image_size

    @jax.jit
    def score(params, ids, mask, images):
        m = nnx.merge(graphdef, params)
        n, g = images.shape[:2]
        img = m.get_image_features(preprocess_images(
            images.reshape((n * g,) + images.shape[2:]), size=size)).astype(jnp.float32)
        txt = m.get_text_features(ids, mask).astype(jnp.float32)
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        return jnp.einsum("ngd,nd->ng", img.reshape(n, g, -1), txt)

    def fn(prompts, images):
        ids, mask = tokenizer(list(prompts))
        return score(params, jnp.asarray(ids), jnp.asarray(mask),
                     jnp.asarray(images, jnp.float32))

    return RewardSource(name, POINTWISE, fn)


REWARD_FACTORIES: dict[str, Callable[..., RewardSource]] = {
    "pairwise_model": _model_source(PAIRWISE),
    "pointwise_model": _model_source(POINTWISE),
    "vlm_judge": _vlm_judge_factory,
    "clip": _clip_factory,
}


def register_reward(name: str, factory: Callable[..., RewardSource], *,
                    overwrite: bool = False,
                    factories: dict[str, Callable[..., RewardSource]] | None = None) -> None:
    """Adds ``name -> factory`` to ``factories`` (default: the global registry).

    ``factory(**options)`` must return a :class:`RewardSource`. Re-registering an
    existing name needs ``overwrite=True``.
    """
    reg = REWARD_FACTORIES if factories is None else factories
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"reward name must be a non-empty string without '/', got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory for {name!r} must be callable")
    if name in reg and not overwrite:
        raise ValueError(f"reward {name!r} is already registered (pass overwrite=True)")
    reg[name] = factory


def option_problems(name: str, options: Mapping[str, Any]) -> list[str]:
    """Option keywords of reward ``name`` that its factory cannot take (unknown or
    missing required ones), as config error lines; checked before any model loads."""
    import inspect

    try:
        inspect.signature(REWARD_FACTORIES[name]).bind(**_as_dict(options))
    except TypeError as err:
        return [f"config.reward.options.{name}={_as_dict(options)!r}: {err} (the keyword options of "
                f"reward {name!r})"]
    return []


def known_rewards(factories: Mapping[str, Any] | None = None) -> list[str]:
    return sorted(REWARD_FACTORIES if factories is None else factories)


def _as_dict(obj: Any) -> dict:
    if obj is None:
        return {}
    if hasattr(obj, "to_dict"):  # ml_collections.ConfigDict
        obj = obj.to_dict()
    return dict(obj.items())


def build_reward_mix(
    reward_spec: Mapping[str, float],
    options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    ddof: int = 1,
    adv_clip_max: float | None = 5.0,
    eps: float = 1e-8,
    adv_norm: str = "group",
    gdpo: bool = False,
    factories: Mapping[str, Callable[..., RewardSource]] | None = None,
) -> RewardMix:
    """Builds the weighted reward sources named by ``reward_spec``.

    Args:
      reward_spec: source name -> weight (finite, >= 0, at least one > 0; a
        weight of 0 computes the source for its diagnostics only).
      options: source name -> keyword options of its factory.
      ddof, adv_clip_max, eps, adv_norm, gdpo: see :func:`advantages_from_outputs`.
      factories: name -> factory; default the global :data:`REWARD_FACTORIES`.

    Raises:
      ValueError: an unknown name (the message lists the known ones), a bad
        weight, or options for a source not in the spec.
    """
    spec = _as_dict(reward_spec)
    opts = {k: _as_dict(v) for k, v in _as_dict(options).items()}
    reg = REWARD_FACTORIES if factories is None else factories
    if not spec:
        raise ValueError(f"reward_spec is empty; name at least one of {known_rewards(reg)}")
    unknown = sorted(k for k in spec if k not in reg)
    if unknown:
        raise ValueError(f"unknown reward source(s) {unknown}; known: {known_rewards(reg)}. "
                         "Register new ones with prefgrpo_jax.rewards.registry.register_reward.")
    stray = sorted(set(opts) - set(spec))
    if stray:
        raise ValueError(f"options given for {stray}, which reward_spec {sorted(spec)} "
                         "does not use")
    weights: dict[str, float] = {}
    for k, w in spec.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) \
                or w < 0:
            raise ValueError(f"weight of reward {k!r} must be a finite number >= 0, got {w!r}")
        weights[k] = float(w)
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"all reward weights are 0 in {spec}")
    sources = {}
    for k in spec:
        try:
            src = reg[k](**opts.get(k, {}))
        except TypeError as err:  # missing or unknown option keywords
            raise ValueError(f"reward {k!r}: its options (config.reward.options.{k}) do not fit: "
                             f"{err}") from None
        if not isinstance(src, RewardSource):
            raise TypeError(f"factory of reward {k!r} returned {type(src).__name__}, "
                            "not a RewardSource")
        sources[k] = src
    return RewardMix(sources, weights, ddof=ddof, adv_clip_max=adv_clip_max, eps=eps,
                     adv_norm=adv_norm, gdpo=gdpo)

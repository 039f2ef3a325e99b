"""Policies that stop a training run instead of letting it finish as garbage.

* :func:`tree_all_finite`: nothing is checkpointed or exported from a state
  holding NaN/Inf.
* :class:`SignalWatch`: a reward source whose advantages are flat for N
  consecutive steps (a judge that never answers in format, a reward that
  scores every image alike) trains nothing; the run stops naming the source.
* :func:`config_changes`: on resume, fields that change the experiment must
  match the checkpoint's config unless ``allow_config_change`` says otherwise.
* :func:`source_counters`: per-step deltas of a reward source's request
  counters (judge failures, retries, unparseable replies) for the metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

# Advantage spread (max - min within a group, averaged) at or below this is "no
# signal": group normalisation maps equal rewards to exactly 0, up to rounding.
FLAT_SPREAD = 1e-6


class NoRewardSignalError(RuntimeError):
    """A weighted reward source gave equal rewards to every image of every group for too long."""


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def tree_all_finite(tree: Any) -> bool:
    """True when every floating leaf of ``tree`` is free of NaN/Inf (works on sharded arrays)."""
    return bool(_all_finite(tree))


def source_counters(before: Mapping[str, float], after: Mapping[str, float], name: str) -> dict[str, float]:
    """``{f"{name}/judge_{k}": after[k] - before[k]}`` for the request counters of one step."""
    keys = ("requests", "failed", "retried", "unparseable", "late")
    return {f"{name}/judge_{k}": float(after[k] - before[k]) for k in keys if k in after}


class SignalWatch:
    """Counts, per weighted reward source, the consecutive steps with flat advantages.

    ``limit`` consecutive flat steps raise :class:`NoRewardSignalError`; 0 never does.
    """

    def __init__(self, weights: Mapping[str, float], limit: int):
        self.limit = int(limit)
        self.streaks = {name: 0 for name, w in weights.items() if w > 0}

    def update(self, metrics: Mapping[str, float]) -> None:
        """Takes one step's metrics (``reward/<source>/...`` diagnostics)."""
        for name in self.streaks:
            spread = metrics.get(f"reward/{name}/adv_spread")
            flat = spread is not None and np.isfinite(spread) and spread <= FLAT_SPREAD
            self.streaks[name] = self.streaks[name] + 1 if flat else 0
            if self.limit and self.streaks[name] >= self.limit:
                raise NoRewardSignalError(self._message(name, metrics))

    def _message(self, name: str, m: Mapping[str, float]) -> str:
        seen = [f"reward std {m.get(f'reward/{name}/reward_std', float('nan')):.3g}"]
        if f"reward/{name}/tie_frac" in m:
            seen.append(f"{100 * m[f'reward/{name}/tie_frac']:.0f}% of pairs tied")
        if f"{name}/judge_requests" in m:
            seen.append(
                f"of its {m[f'{name}/judge_requests']:.0f} judge requests in the last step "
                f"{m[f'{name}/judge_failed']:.0f} failed and {m[f'{name}/judge_unparseable']:.0f} "
                "had no parseable verdict (the log above quotes them)")
        return (
            f"reward source {name!r} gave every image of every group the same reward for "
            f"{self.limit} consecutive steps ({'; '.join(seen)}): the advantages are 0 and nothing "
            "is learned. Check that source (a judge answering off-format, a reward blind to the "
            "images), or raise config.train.max_steps_without_signal (0 disables this check)"
        )


# Fields whose change alters the experiment a checkpoint belongs to. A prefix
# covers its whole subtree. Everything else (log/image/checkpoint intervals,
# total_steps, keep_checkpoints, mesh, sharding, distributed, eval, sample)
# may change on resume.
EXPERIMENT_FIELDS = (
    "model.path", "model.dtype", "model.compute_dtype", "data.prompts", "train", "optim", "reward.spec",
    "reward.options",
)
# Inside those, fields that only change how the same computation is carried
# out (memory layout, stop policies) or where a reward server is reached.
HARMLESS_FIELDS = (
    "train.micro_batches", "train.timestep_chunk", "train.max_consecutive_nonfinite",
    "train.max_steps_without_signal",
)
HARMLESS_OPTIONS = ("base_url", "api_key_env", "max_concurrency", "timeout_s", "deadline_s", "retries", "backoff_s")


def _is_experiment_field(field: str) -> bool:
    if field in HARMLESS_FIELDS:
        return False
    if field.startswith("reward.options.") and field.rsplit(".", 1)[-1] in HARMLESS_OPTIONS:
        return False
    return any(field == p or field.startswith(p + ".") for p in EXPERIMENT_FIELDS)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; an empty dict stays a leaf."""
    if isinstance(d, Mapping) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """``(experiment changes, other changes)``: lines ``field: saved -> current``.

    Values are compared as the checkpoint stores them (JSON), so tuples equal lists.
    """
    import json

    def norm(v):
        return json.loads(json.dumps(v, default=str))

    a, b = _flatten(norm(saved)), _flatten(norm(current))
    experiment, other = [], []
    for field in sorted(set(a) | set(b)):
        if a.get(field, "<absent>") == b.get(field, "<absent>"):
            continue
        line = f"{field}: {a.get(field, '<absent>')!r} -> {b.get(field, '<absent>')!r}"
        (experiment if _is_experiment_field(field) else other).append(line)
    return experiment, other


def check_resume_config(saved: Mapping[str, Any], config: Any, where: str) -> None:
    """Refuses to resume ``where`` (a checkpoint) with experiment fields changed, unless
    ``config.allow_config_change``; logs every change that goes through.

    Raises:
      ConfigError listing each changed field as ``field: checkpoint's -> current``.
    """
    from prefgrpo_jax.config import ConfigError

    experiment, other = config_changes(saved, config.to_dict())
    if experiment and not config.allow_config_change:
        raise ConfigError(
            f"the config differs from the one {where} was trained with, in fields that change the "
            "experiment:\n  " + "\n  ".join(experiment) + "\nUse the checkpoint's values, a new "
            "--workdir, or --config.allow_config_change=True to continue with the new ones"
        )
    for line in experiment:
        log.warning("config changed on resume (allow_config_change=True): %s", line)
    for line in other:
        log.info("config changed on resume: %s", line)

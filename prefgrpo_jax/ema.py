"""Exponential moving average of the trained params.

``ema <- decay * ema + (1 - decay) * params`` after every ``every``-th optimizer
update (the reference's optional ``--use_ema``, decay 0.99, every update). The
average lives in the train state as ``state["ema"]`` (fp32, sharded like the
params), so it is checkpointed with it; ``--mode=sample``/``eval`` and the final
export use it when ``config.ema.use`` is set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def ema_step(ema: Any, params: Any, decay: float) -> Any:
    """One EMA update (fp32): ``decay * ema + (1 - decay) * params``."""
    return jax.tree.map(
        lambda e, p: (decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32)).astype(e.dtype),
        ema, params,
    )


def make_ema_update(decay: float, every: int) -> Callable[[dict], dict]:
    """``state -> state`` updating ``state["ema"]`` when ``state["step"] % every == 0``
    (``step`` counts optimizer updates, already incremented). Jitted, the EMA
    buffer donated."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
    if every < 1:
        raise ValueError(f"EMA every must be >= 1, got {every}")

    @jax.jit
    def update(ema: Any, params: Any, step: jax.Array) -> Any:
        return jax.lax.cond(step % every == 0, lambda: ema_step(ema, params, decay), lambda: ema)

    def after_update(state: dict) -> dict:
        return {**state, "ema": update(state["ema"], state["params"], state["step"])}

    return after_update


def enabled(config: Any) -> bool:
    """Whether the run keeps an EMA (``config.ema.decay > 0``)."""
    return float(config.ema.decay) > 0.0


def served_params(state: dict, config: Any) -> Any:
    """The params to sample, evaluate and export: the EMA when ``config.ema.use``."""
    if not config.ema.use:
        return state["params"]
    if "ema" not in state:
        raise ValueError("config.ema.use=True but this run keeps no EMA: set config.ema.decay > 0 "
                         "(e.g. 0.99) when training, or config.ema.use=False")
    return state["ema"]


__all__ = ["ema_step", "enabled", "make_ema_update", "served_params"]

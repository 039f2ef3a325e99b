"""Orbax checkpoints of the train state, data position and config.

One checkpoint holds ``state`` (params, optimizer state, step: a pytree of
sharded arrays, written by every process) and ``meta`` (JSON: step, seed, data
position, config, the reference-params handle). The RNG key is not stored: every
key is a pure function of (config.seed, step, process), so the restored step
fixes it. Restoring into the live train state's shardings makes resume exact.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointUnreadableError(RuntimeError):
    """Every checkpoint of a workdir failed to restore."""


class Checkpointer:
    """``CheckpointManager`` wrapper: keep N, save every K steps or on demand."""

    def __init__(self, directory: str | Path, *, keep: int, save_every: int):
        if keep < 1:
            raise ValueError(f"config.keep_checkpoints={keep}: must be >= 1")
        if save_every < 1:
            raise ValueError(f"config.checkpoint_every={save_every}: must be >= 1")
        self.directory = Path(directory).absolute()
        self.save_every = save_every
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "meta"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Saves at multiples of ``save_every`` (or when ``force``); blocks until written."""
        if not force and step % self.save_every:
            return False
        if step in self._manager.all_steps():
            return False
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(json.loads(json.dumps(meta, default=str))),
            ),
            force=True,
        )
        self._manager.wait_until_finished()
        if saved:
            log.info("saved checkpoint %d to %s", step, self.directory)
        return saved

    def restore(self, state_like: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores ``(state, meta)`` with ``state_like``'s structure and shardings."""
        step = self._manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["meta"])

    def restore_newest_readable(
        self, state_like: Any, *, set_aside: bool = False
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """``(step, state, meta)`` of the newest checkpoint that restores, or None if there is none.

        A checkpoint that fails to read (a truncated data file, a missing
        ``state/`` or manifest: a disk that filled or a copy cut short) is
        skipped with a warning naming it and the error; older ones are tried in
        turn. With ``set_aside`` (single-process training) the skipped ones move to
        ``<directory>_unreadable/`` so the resumed run can save those steps
        again. Raises CheckpointUnreadableError listing every failure if none reads.
        """
        failures, skipped = [], []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                state, meta = self.restore(state_like, step)
            except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many types
                reason = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
                failures.append(f"step {step} ({self.directory / str(step)}): {reason}")
                skipped.append(step)
                log.warning("checkpoint %d in %s is unreadable, trying an older one: %s",
                            step, self.directory, reason)
                continue
            if failures:
                log.warning("resuming from checkpoint %d; skipped unreadable %s", step, "; ".join(failures))
            if skipped and set_aside:
                aside = self.directory.with_name(self.directory.name + "_unreadable")
                aside.mkdir(exist_ok=True)
                for bad in skipped:
                    shutil.move(self.directory / str(bad), aside / f"{bad}.{time.time_ns()}")
                self._manager.reload()
                log.warning("moved the unreadable checkpoint(s) %s to %s (delete them once diagnosed)",
                            skipped, aside)
            return step, state, meta
        if failures:
            raise CheckpointUnreadableError(
                f"no checkpoint in {self.directory} could be read:\n  " + "\n  ".join(failures)
                + "\nIf the config changed since they were written, restore it; otherwise move "
                "the directory aside to start over"
            )
        return None

    def close(self) -> None:
        self._manager.close()


class PreemptionFlag:
    """Set by SIGTERM (preemption notice); the loop checkpoints and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "PreemptionFlag":
        def handler(signum, frame):
            del frame
            log.warning("signal %d received: checkpointing at the end of this step", signum)
            self.requested = True

        self._previous = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)


def any_process(flag: bool) -> bool:
    """True if ``flag`` is set on any process (all must checkpoint together)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    import numpy as np

    return bool(np.max(multihost_utils.process_allgather(np.asarray([int(flag)]))))

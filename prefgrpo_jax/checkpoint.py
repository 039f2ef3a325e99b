"""Orbax checkpoints of the train state (or its params), data position and config.

Two kinds, each in its own directory of the workdir:
  ``state`` (``checkpoints/``): params, optimizer state, step; exact resume.
  ``params`` (``params_checkpoints/``): the params alone, cheaper and so more
    frequent; what sample, eval and export need.
Each also holds ``meta`` (JSON: step, seed, data position, config). The RNG key
is not stored: every key is a pure function of (config.seed, step, process), so
the restored step fixes it. Restoring into the live train state's shardings
makes resume exact; ``restore_params`` reads the params subtree alone.

Saves are asynchronous (orbax copies the arrays to host, then writes in the
background): the loop waits only before the next save and at exit, so a pod
does not stall on a 133 GiB write every few steps.
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
KINDS = ("state", "params")
DIRECTORIES = {"state": "checkpoints", "params": "params_checkpoints"}
# What the stored tensors mean, written into every meta: 2 = FLUX's fused qkv /
# linear1 / linear2 kernels head-grouped (models/flux.py ``fused_layouts``). The
# checkpoints of earlier versions have no field and the same shapes in BFL's
# contiguous order: restoring them would load wrong weights without an error.
FORMAT = 2


class CheckpointFormatError(ValueError):
    """A checkpoint written in a tensor layout this version does not read."""


def check_format(meta: dict[str, Any], where: Path) -> None:
    found = meta.get("format", 1)
    if found != FORMAT:
        raise CheckpointFormatError(
            f"checkpoint {where} is in format {found}, this version reads format {FORMAT} (FLUX's fused "
            "qkv/linear1/linear2 kernels stored head-grouped for tensor parallelism): its weights would "
            "restore permuted. Re-train with this version, or restore it with the version that wrote it "
            "and export (--mode=train finishes with a diffusers export) to start from that export")


def _abstract(tree: Any) -> Any:
    """Live arrays or ``ShapeDtypeStruct``s -> ``ShapeDtypeStruct``s with shardings."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class CheckpointUnreadableError(RuntimeError):
    """Every checkpoint of a workdir failed to restore."""


class Checkpointer:
    """``CheckpointManager`` wrapper: keep N, save every K steps or on demand.

    Args:
      directory: where this kind's checkpoints live.
      keep: how many to keep.
      save_every: steps between saves (``save(force=True)`` saves regardless).
      kind: ``"state"`` (the train state: params, optimizer state, step) or
        ``"params"`` (the params alone).
    """

    def __init__(self, directory: str | Path, *, keep: int, save_every: int, kind: str = "state"):
        if keep < 1:
            raise ValueError(f"config.keep_checkpoints={keep}: must be >= 1")
        if save_every < 1:
            raise ValueError(f"config.checkpoint_every={save_every}: must be >= 1")
        if kind not in KINDS:
            raise ValueError(f"checkpoint kind {kind!r}: must be one of {KINDS}")
        self.directory = Path(directory).absolute()
        self.save_every = save_every
        self.kind = kind
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=(kind, "meta"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, tree: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Starts saving at multiples of ``save_every`` (or when ``force``); returns at once.

        ``tree`` is the train state (kind ``state``) or the params (kind
        ``params``). The arrays are copied to host before this returns, so the
        caller may donate them to the next step.
        """
        if not force and step % self.save_every:
            return False
        if step in self._manager.all_steps():
            return False
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(**{
                self.kind: ocp.args.StandardSave(tree),
                "meta": ocp.args.JsonSave(json.loads(json.dumps({**meta, "format": FORMAT}, default=str))),
            }),
            force=True,
        )
        if saved:
            log.info("saving %s checkpoint %d to %s (in the background)", self.kind, step, self.directory)
        return saved

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores ``(tree, meta)`` with ``like``'s structure, dtypes and shardings.

        ``like`` may be live arrays or ``ShapeDtypeStruct``s with shardings.
        """
        step = self._step(step)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(**{
                self.kind: ocp.args.StandardRestore(_abstract(like)), "meta": ocp.args.JsonRestore(),
            }),
        )
        meta = dict(restored["meta"])
        check_format(meta, self.directory / str(step))
        return restored[self.kind], meta

    def restore_params(self, like: Any, step: int | None = None, *, subtree: str = "params") -> Any:
        """The params alone (no optimizer state is read), cast to ``like``'s dtypes.

        ``subtree``: which params of a full-state checkpoint (``"params"`` or
        ``"ema"``); a params-only checkpoint holds one set.
        """
        step = self._step(step)
        target = _abstract(like)
        if self.kind == "state":
            target = {subtree: target}
        args = ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        )
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{self.kind: args, "meta": ocp.args.JsonRestore()}))
        check_format(dict(restored["meta"]), self.directory / str(step))
        restored = restored[self.kind]
        return restored[subtree] if self.kind == "state" else restored

    def reached_preemption(self, step: int) -> bool:
        """JAX's preemption sync point (TPU maintenance events arrive here, not as SIGTERM).

        All processes agree on the same step; False when no preemption service
        runs (single process without ``jax.distributed``).
        """
        return bool(self._manager.reached_preemption(step))

    def wait(self) -> None:
        """Blocks until the save in flight, if any, is on disk."""
        self._manager.wait_until_finished()

    def _step(self, step: int | None) -> int:
        step = self._manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return step

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
        found = self._newest_readable(lambda step: self.restore(state_like, step), set_aside=set_aside)
        return None if found is None else (found[0], *found[1])

    def restore_params_newest_readable(self, like: Any, *, subtree: str = "params") -> tuple[int, Any] | None:
        """``(step, params)`` of the newest checkpoint whose params restore (``restore_params``),
        skipping unreadable ones as ``restore_newest_readable`` does; never moves anything."""
        return self._newest_readable(lambda step: self.restore_params(like, step, subtree=subtree))

    def _newest_readable(self, restore: Any, *, set_aside: bool = False) -> tuple[int, Any] | None:
        failures, skipped = [], []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = restore(step)
            except CheckpointFormatError:
                raise  # readable, but in another layout: an older one would be too
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
            return step, restored
        if failures:
            raise CheckpointUnreadableError(
                f"no checkpoint in {self.directory} could be read:\n  " + "\n  ".join(failures)
                + "\nIf the config changed since they were written, restore it; otherwise move "
                "the directory aside to start over"
            )
        return None

    def close(self) -> None:
        """Waits for the save in flight, then releases the manager."""
        self._manager.wait_until_finished()
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

"""One training run per workdir: an advisory lock file naming its owner.

``workdir/.lock`` holds ``{"host", "pid", "since"}`` of the run that writes the
workdir. The exclusion itself is a ``flock`` on that file, which the kernel
drops when the owner dies however it dies (SIGKILL, OOM, power loss on NFS
after the lease): a lock whose owner is gone is therefore taken over, with a
warning naming the dead owner, and a live one is refused with an error naming
it. The file is emptied, never deleted, on release: deleting it would let a
waiting opener lock the orphaned inode while a third process locks a new file.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"


class WorkdirBusyError(RuntimeError):
    """Another live process holds the workdir's lock."""


class WorkdirLock:
    """Holds ``workdir/.lock`` from :meth:`acquire` until :meth:`release` or exit."""

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise WorkdirBusyError(
                f"workdir {self.path.parent} is in use by {_describe(owner)}: two runs writing one "
                "workdir corrupt its checkpoints and metrics. Wait for that run to end or stop it, "
                "or give this run another --workdir"
            ) from None
        previous = _read_owner(fd)
        if previous:
            log.warning("taking over the lock of %s in %s: that process is gone (it did not "
                        "exit cleanly)", _describe(previous), self.path.parent)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode() + b"\n", 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty file: the next owner finds no one to warn about
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_owner(fd: int) -> dict:
    raw = os.pread(fd, 4096, 0)
    if not raw.strip():
        return {}
    try:
        owner = json.loads(raw)
    except ValueError:
        return {"unreadable": raw[:80].decode("utf-8", "replace")}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict) -> str:
    if "pid" in owner:
        return f"pid {owner['pid']} on host {owner.get('host', '?')} (since {owner.get('since', '?')})"
    return "another process" + (f" (lock file: {owner['unreadable']!r})" if owner else "")


def prepare_workdir(workdir: str | Path) -> Path:
    """Creates ``workdir`` and proves it writable, before any model is loaded.

    Raises:
      PermissionError naming ``--workdir`` when it cannot be created or written.
    """
    path = Path(workdir).absolute()
    probe = path / f".write_test.{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"--workdir={str(workdir)!r} is not writable ({err.strerror or err}): checkpoints, metrics "
            "and images go there; give a directory this user can write"
        ) from None
    return path

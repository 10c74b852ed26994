"""One running copy of a node: the lock a second ``twistd sendarix`` finds taken.

A node's name is what its leases, its routing state and its events say it is.  Two
processes started with the same configuration (a unit started twice, a manual start
beside the service manager) would both take back "their" leases, rewrite the same
state files and deliver the same mail, and the second one would keep delivering
even though it could not listen on the port the first one holds.  So every process
``twistd sendarix`` starts first locks ``<var dir>/<name>.lock`` (``flock``,
exclusive, never waited for) and keeps it until it exits; the kernel lets go of
it however the process ends, so a crash leaves nothing to clean up.  A single
process and the supervisor of worker processes lock the node's name, each worker its
own (``<name>-wI``): a worker started again while its orphaned predecessor still
drains fails, and the supervisor tries again a little later.  The file holds the PID
of its holder, for the refusal's message (written again once the reactor runs, since
twistd without ``-n`` forks into the background after the service is made; the
forked process keeps the lock).

The lock covers one machine's var directory.  Nodes of a cluster on a shared Redis
spool need distinct names, as before.  An application that embeds the node's service
does not take it.
"""

from __future__ import annotations

import fcntl
import os

__all__ = ["NodeRunningError", "acquire", "hold_node_lock", "lock_path", "note_pid"]


class NodeRunningError(Exception):
    """Another process holds the lock of node ``name``."""

    def __init__(self, name: str, path: str, pid: int | None) -> None:
        self.name = name
        self.path = path
        self.pid = pid
        holder = f"pid {pid}" if pid is not None else "another process"
        super().__init__(f"node {name} is already running ({holder} holds {path})")


def lock_path(var_dir: str, name: str) -> str:
    """The lock file of node ``name`` in ``var_dir``."""
    return os.path.join(var_dir, f"{name}.lock")


#: The locks this process holds (path -> descriptor), kept open until it exits.
_held: dict[str, int] = {}


def hold_node_lock(var_dir: str, name: str) -> str:
    """Lock node ``name`` for the rest of this process's life; the lock file's path.

    Asked again in the same process (a service built twice), the lock it holds
    already is enough.  Raises :class:`NodeRunningError` when another process holds it.
    """
    path = os.path.abspath(lock_path(var_dir, name))
    if path in _held:
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _held[path] = acquire(path, name)
    return path


def acquire(path: str, name: str) -> int:
    """Take the lock at ``path`` on a descriptor of its own (close it to let go)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _holder(fd)
        os.close(fd)
        raise NodeRunningError(name, path, pid) from None
    except BaseException:
        os.close(fd)
        raise
    _write_pid(fd)
    return fd


def note_pid() -> None:
    """Write this process's PID into every lock it holds (after twistd forked)."""
    for fd in _held.values():
        _write_pid(fd)


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _holder(fd: int) -> int | None:
    """The PID the lock's holder wrote, if it can be read."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None

"""A change mark shared by every process that opens one SQLite database.

Eight bytes in a file beside the database (``spool.db`` -> ``spool.db-suppressions``),
mapped into memory by each process.  A writer puts fresh random bytes there after it
commits a change; a reader that remembered an answer together with the mark it saw
before asking knows, by comparing eight bytes in memory, whether anything has changed
since.  Fresh random bytes rather than a counter: two writers need no lock between
them, since neither reads the old value, and the mark never returns to a value a
reader may have remembered.

A process that cannot open or map the file (a read-only folder, a database in
memory) has no mark: its readers remember nothing, and its writers say so in the log,
since another process's remembered answers then go unwarned.
"""

from __future__ import annotations

import mmap
import os
import stat

from twisted.logger import Logger

from sendarix.model.randomness import unique_bits

__all__ = ["ChangeMark", "open_change_mark"]

log = Logger()

_SIZE = 8


class ChangeMark:
    """The shared mark; ``read()`` and ``change()`` only touch memory."""

    def __init__(self, path: str, mapped: mmap.mmap) -> None:
        self.path = path
        self._map = mapped

    def read(self) -> bytes:
        """The mark as it is now."""
        return self._map[:_SIZE]

    def change(self) -> None:
        """Tell every process that something changed (after the change committed)."""
        self._map[:_SIZE] = unique_bits(64).to_bytes(_SIZE, "big")

    def close(self) -> None:
        self._map.close()


def open_change_mark(database_path: str, name: str) -> ChangeMark | None:
    """Map the mark ``name`` of the database at ``database_path``, creating it with the
    database's permissions; None when that is not possible.  Blocks on the file
    system: call it on a database thread."""
    if database_path == ":memory:" or database_path.startswith("file:"):
        return None
    path = f"{database_path}-{name}"
    try:
        mode = stat.S_IMODE(os.stat(database_path).st_mode)
    except OSError:
        mode = 0o644
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, mode)
    except OSError as e:
        log.warn("change mark {path} unavailable ({why}): answers are not remembered",
                 path=path, why=e)
        return None
    try:
        info = os.fstat(fd)
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != mode:
            # The umask may have narrowed what os.open was given: whoever may write
            # the database must be able to change the mark too.
            os.fchmod(fd, mode)
        if info.st_size < _SIZE:
            # Several processes may do this at once; each writes zeros over zeros.
            os.ftruncate(fd, _SIZE)
        mapped = mmap.mmap(fd, _SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError) as e:
        log.warn("change mark {path} unavailable ({why}): answers are not remembered",
                 path=path, why=e)
        return None
    finally:
        os.close(fd)
    return ChangeMark(path, mapped)

"""The durable spool (ISpool): backends and the factory that picks one from a URL.

``sqlite:/abs/path/spool.db`` selects the embedded SQLite spool; ``redis://...`` the
shared Redis spool (several nodes).
"""

from __future__ import annotations

import os
from typing import Any

from sendarix.interfaces import ISpool
from sendarix.stores.errors import DuplicateQueueId, LeaseLost, SpoolError
from sendarix.stores.sqlite.database import SQLiteDatabase
from sendarix.stores.sqlite.spool import SQLiteSpool

__all__ = [
    "DuplicateQueueId",
    "LeaseLost",
    "SQLiteSpool",
    "SpoolError",
    "open_spool",
    "sqlite_path",
]

_REDIS_SCHEMES = ("redis:", "rediss:", "redis+sentinel:", "redis+unix:")


def sqlite_path(url: str) -> str:
    """The file path of a ``sqlite:`` URL (``sqlite:/p``, ``sqlite:///p`` or ``sqlite:p``)."""
    if not url.startswith("sqlite:"):
        raise ValueError(f"not a sqlite URL: {url!r}")
    rest = url[len("sqlite:") :]
    if rest.startswith("//"):
        # sqlite:///abs/path: an empty authority before the absolute path.
        rest = rest[2:]
        if not rest.startswith("/"):
            raise ValueError(f"a sqlite URL names no host: {url!r}")
    if not rest:
        raise ValueError(f"a sqlite URL needs a file path: {url!r}")
    return rest


def open_spool(url: str, reactor: Any, db: SQLiteDatabase | None = None) -> ISpool:
    """Make the (not yet started) spool that ``url`` names.

    For SQLite, ``db`` is the database object other stores share; the spool then
    leaves closing it to its owner.  Without ``db`` the spool opens and closes its own.
    """
    lowered = url.lower()
    if lowered.startswith("sqlite:"):
        path = sqlite_path(url)
        if db is None:
            return SQLiteSpool(SQLiteDatabase(path, reactor), owns_db=True)
        if os.path.realpath(db.path) != os.path.realpath(path):
            raise ValueError(f"spool URL {url!r} and the shared database {db.path!r} differ")
        return SQLiteSpool(db)
    if lowered.startswith(_REDIS_SCHEMES):
        raise NotImplementedError("redis spool arrives with the Redis issue")
    raise ValueError(f"unknown spool URL scheme: {url!r}")

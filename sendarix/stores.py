"""The node's stores, opened from configuration: spool, credentials, delivery log,
suppression lists, sending domains.

The relay and the ``sendarix`` command open the same stores the same way, so the
command works on a running relay's data (SQLite in WAL mode allows both).
"""

from __future__ import annotations

from typing import Any

from attrs import define
from twisted.internet.defer import Deferred, ensureDeferred

from sendarix.config import Config
from sendarix.credentials import SQLiteCredentialStore
from sendarix.domains import SQLiteDomainStore
from sendarix.eventlog import SQLiteEventLog
from sendarix.events import FanoutSink, JSONLogSink
from sendarix.interfaces import (
    ICredentialStore,
    IDomainStore,
    IEventLog,
    IEventSink,
    ISpool,
    ISuppressionStore,
)
from sendarix.spool import open_spool
from sendarix.sqlitedb import SQLiteDatabase
from sendarix.suppression import SQLiteSuppressionStore


@define
class Stores:
    """Everything persistent a node uses; ``open()`` before use, ``close()`` after."""

    config: Config
    db: SQLiteDatabase
    spool: ISpool
    credentials: ICredentialStore
    eventlog: IEventLog
    events: IEventSink
    suppressions: ISuppressionStore
    domains: IDomainStore

    @classmethod
    def from_config(cls, config: Config, reactor: Any, json_log: bool | None = None) -> Stores:
        """Build (not open) the stores ``config`` names."""
        path = config.spool.sqlite_path
        if path is None:
            raise NotImplementedError(
                "spool.url: the Redis spool is not available in this version; "
                "use sqlite:PATH"
            )
        db = SQLiteDatabase(path, reactor)
        spool = open_spool(config.spool.url, reactor, db=db)
        credentials = SQLiteCredentialStore(db, reactor)
        eventlog = SQLiteEventLog(db)
        use_json = config.events.json_log if json_log is None else json_log
        events: IEventSink = (
            FanoutSink([eventlog, JSONLogSink()]) if use_json else eventlog
        )
        suppressions = SQLiteSuppressionStore(db)
        domains = SQLiteDomainStore(db)
        return cls(config, db, spool, credentials, eventlog, events, suppressions, domains)

    def open(self) -> Deferred[None]:
        """Open the database and start the spool."""
        return ensureDeferred(self._open())

    async def _open(self) -> None:
        await self.db.open()
        await self.spool.start()

    def close(self) -> Deferred[None]:
        """Stop the spool and close the database (queued writes finish first)."""
        return ensureDeferred(self._close())

    async def _close(self) -> None:
        await self.spool.stop()
        await self.db.close()

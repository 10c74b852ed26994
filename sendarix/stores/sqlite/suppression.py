"""Per-tenant suppression lists in SQLite (docs/operator-guide.md, "Suppression lists").

A suppressed recipient is refused at RCPT for its tenant (``550 5.1.1 recipient
suppressed``).  Entries come from hard bounces, expiry, complaints, the operator
(``sendarix suppressions add``) and the HTTP API.  Addresses are stored lowercased:
the whole address, because senders and receivers treat local parts case-insensitively
in practice, and an entry that missed "Bob@" for "bob@" would be worse than useless.

A lookup goes to the reader thread, and the hop there and back is most of the time
a RCPT takes.  So each process remembers the recipients it found *not* suppressed,
with the database's change mark (:mod:`sendarix.stores.sqlite.changemark`) as it
was before it looked.  Every ``add``, in any process, changes the mark once it has
committed, and before its caller hears of it; a remembered answer counts only while
the mark is the same, so a recipient suppressed anywhere is refused from the next
RCPT on.  Removing an entry needs no mark: "not suppressed" stays true.  Applications,
CI systems and monitors that write to the same recipients over and over get their
RCPT answered without the hop.
"""

from __future__ import annotations

import builtins
import sqlite3
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from sendarix.interfaces import ISuppressionStore
from sendarix.model.suppression import Suppression
from sendarix.stores.paging import page_start
from sendarix.stores.sqlite.changemark import ChangeMark, open_change_mark
from sendarix.stores.sqlite.database import SQLiteDatabase

log = Logger()

#: Most recipients remembered as not suppressed (about 150 bytes each).
REMEMBERED = 65536
#: Longest a remembered answer is trusted, even with the mark unchanged: the bound
#: when some writer could not reach the mark (it logs a warning then).
TRUSTED_FOR = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS supp_entry (
    tenant     TEXT NOT NULL,
    address    TEXT NOT NULL,      -- lowercased
    reason     TEXT NOT NULL,
    source     TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (tenant, address)
) WITHOUT ROWID;
"""

_COLUMNS = "tenant, address, reason, source, created_at"


def _from_row(row: tuple[Any, ...]) -> Suppression:
    return Suppression(row[0], row[1], row[2], row[3], row[4])


@implementer(ISuppressionStore)
@define
class SQLiteSuppressionStore:
    """Suppression lists in the node's SQLite database (table ``supp_entry``).

    ``clock`` times how long a remembered "not suppressed" is trusted (see the
    module's docstring); without one, nothing is remembered.
    """

    _db: SQLiteDatabase
    clock: IReactorTime | None = None
    #: (tenant, address) -> (the mark before the lookup, when): found not suppressed.
    _not_suppressed: dict[tuple[str, str], tuple[bytes, float]] = field(
        factory=dict, init=False)
    _mark: ChangeMark | None = field(default=None, init=False)
    _mark_tried: bool = field(default=False, init=False)
    _warned: bool = field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self._db.add_schema(_SCHEMA)
        if self.clock is not None:
            # The first job once the database is open: lookups are remembered from
            # then on (until then the mark is None, and nothing is).
            self._db.run(lambda conn: self._change_mark()).addErrback(lambda failure: None)

    def _change_mark(self) -> ChangeMark | None:
        """(the database thread, which alone opens it) The mark, opened once."""
        if not self._mark_tried:
            self._mark_tried = True
            self._mark = open_change_mark(self._db.path, "suppressions")
        return self._mark

    def _changed(self, result: bool) -> bool:
        """(reactor, after an add committed) Make every process look again."""
        mark = self._mark
        if mark is not None:
            mark.change()
        elif not self._warned and self._db.path != ":memory:":
            self._warned = True
            log.warn("suppressions are added without the change mark: other processes"
                     " may accept a newly suppressed recipient for up to {seconds:.0f} s",
                     seconds=TRUSTED_FOR)
        return result

    def add(
        self, tenant: str, address: str, reason: str, source: str, now: float
    ) -> Deferred[bool]:
        """Suppress ``address`` for ``tenant``; True when new, False when it was there
        already (a non-empty reason replaces the old one; source and time stay the
        first ones, so re-adding without a reason loses nothing)."""
        try:
            entry = Suppression(tenant, address, reason, source, now)  # validates
        except ValueError:
            return fail()

        def work(conn: sqlite3.Connection) -> bool:
            # Both statements run in one job, so nothing slips in between them.
            existed = conn.execute(
                "UPDATE supp_entry SET reason = CASE WHEN ? = '' THEN reason ELSE ? END"
                " WHERE tenant = ? AND address = ?",
                (entry.reason, entry.reason, entry.tenant, entry.address),
            ).rowcount
            if existed:
                return False
            conn.execute(
                f"INSERT INTO supp_entry ({_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                (entry.tenant, entry.address, entry.reason, entry.source, entry.created_at),
            )
            return True

        def work_and_mark(conn: sqlite3.Connection) -> bool:
            self._change_mark()
            return work(conn)

        # The mark changes after the commit and before the caller hears of it.
        return self._db.run(work_and_mark).addCallback(self._changed)

    def is_suppressed(self, tenant: str, address: str) -> Deferred[Suppression | None]:
        """The entry for ``address`` in ``tenant``'s list, or None."""
        key = (tenant, address.strip().lower())
        clock, mark = self.clock, self._mark
        # The mark as it is before the lookup is queued: the reader's snapshot is
        # taken after that (a batch of reads shares one, begun once the batch is
        # taken from the queue), so an add missing from the snapshot changes the
        # mark after this, and the answer below is not trusted any more.
        # Without a clock (a store that only writes, say), nothing is remembered.
        before = mark.read() if mark is not None and clock is not None else None
        asked = clock.seconds() if clock is not None else 0.0
        if before is not None:
            seen = self._not_suppressed.get(key)
            if seen is not None and seen[0] == before and asked - seen[1] < TRUSTED_FOR:
                return succeed(None)

        def work(conn: sqlite3.Connection) -> Suppression | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM supp_entry WHERE tenant = ? AND address = ?", key
            ).fetchone()
            return _from_row(row) if row else None

        def answer(entry: Suppression | None) -> Suppression | None:
            if entry is None and before is not None:
                remembered = self._not_suppressed
                remembered.pop(key, None)
                if len(remembered) >= REMEMBERED:
                    del remembered[next(iter(remembered))]  # the oldest
                remembered[key] = (before, asked)
            return entry

        # Asked at RCPT while the client waits: the reader, not behind the commits.
        return self._db.read(work).addCallback(answer)

    def remove(self, tenant: str, address: str) -> Deferred[bool]:
        """Lift the suppression; True when there was one."""
        key = (tenant, address.strip().lower())

        def work(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute("DELETE FROM supp_entry WHERE tenant = ? AND address = ?", key)
            return cursor.rowcount > 0

        return self._db.run(work)

    def list(
        self,
        tenant: str | None = None,
        limit: int = 100,
        after: str | tuple[str, str] | None = None,
    ) -> Deferred[builtins.list[Suppression]]:
        """Up to ``limit`` entries in (tenant, address) order, all tenants' when
        ``tenant`` is None.  ``after`` pages on: the last address seen (with
        ``tenant``) or the last ``(tenant, address)`` pair."""
        try:
            start = page_start(tenant, after)
        except ValueError:
            return fail()
        where: builtins.list[str] = []
        params: builtins.list[Any] = []
        if tenant is not None:
            where.append("tenant = ?")
            params.append(tenant)
        if start is not None:
            where.append("(tenant, address) > (?, ?)")
            params += list(start)
        sql = f"SELECT {_COLUMNS} FROM supp_entry"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY tenant, address LIMIT ?"
        params.append(max(0, int(limit)))

        def work(conn: sqlite3.Connection) -> builtins.list[Suppression]:
            return [_from_row(row) for row in conn.execute(sql, params)]

        return self._db.run(work)

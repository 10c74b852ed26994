"""Tests for :obj:`sendarix.stores.sqlite.suppression`: the value, the SQLite store, and the
``sendarix suppressions`` commands (as subprocesses, like tests.control.cli.test_main)."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import sys
import threading
from typing import TYPE_CHECKING, Any

from twisted.internet import reactor as _reactor
from twisted.internet import task, threads
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from sendarix.config.loader import load_config
from sendarix.control.cli.main import main
from sendarix.interfaces import ISuppressionStore
from sendarix.model.suppression import Suppression, normalize_address
from sendarix.stores.backends import open_stores
from sendarix.stores.errors import StoreUnavailable
from sendarix.stores.redis.suppression import RedisSuppressionStore
from sendarix.stores.sqlite import suppression
from sendarix.stores.sqlite.changemark import open_change_mark
from sendarix.stores.sqlite.database import SQLiteDatabase
from sendarix.stores.sqlite.suppression import SQLiteSuppressionStore
from tests.control.cli.test_main import _run, _write_config
from tests.support.redisserver import redis_client

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

reactor: Any = _reactor
T0 = 1_800_000_000.0


class SuppressionValueTests(SynchronousTestCase):
    """Suppression and normalize_address."""

    def test_normalized(self) -> None:
        """The address is stripped and lowercased; to_dict has every field."""
        s = Suppression("acme", " Bob@Example.COM ", "hard bounce", "bounce", T0)
        self.assertEqual(s.address, "bob@example.com")
        self.assertEqual(
            s.to_dict(),
            {
                "tenant": "acme",
                "address": "bob@example.com",
                "reason": "hard bounce",
                "source": "bounce",
                "created_at": T0,
            },
        )

    def test_refused(self) -> None:
        """Not exactly one @, an empty part, or an unknown source is a ValueError."""
        for bad in ("bob", "@example.com", "bob@", "a@b@c", "a b@c", "<a@b>", ""):
            self.assertRaises(ValueError, normalize_address, bad)
        self.assertRaises(ValueError, Suppression, "t", "a@b", "", "whim", T0)


class SuppressionStoreContractMixin(_Base):
    """The ISuppressionStore contract: every backend passes these tests.  A backend's
    TestCase sets ``self.store`` (ready to use) in ``setUp``."""

    store: Any

    def test_interface(self) -> None:
        """The store provides ISuppressionStore."""
        self.assertTrue(verifyObject(ISuppressionStore, self.store))

    async def test_add_lookup_case_insensitive(self) -> None:
        """An entry is found whatever the case of the address asked about."""
        self.assertTrue(await self.store.add("acme", "Bob@Example.com", "r", "manual", T0))
        found = await self.store.is_suppressed("acme", "BOB@example.COM")
        self.assertEqual(found, Suppression("acme", "bob@example.com", "r", "manual", T0))
        self.assertIsNone(await self.store.is_suppressed("acme", "bobby@example.com"))

    async def test_tenants_isolated(self) -> None:
        """One tenant's entry does not suppress, and cannot be removed by, another."""
        await self.store.add("acme", "x@example.com", "", "bounce", T0)
        self.assertIsNone(await self.store.is_suppressed("beta", "x@example.com"))
        self.assertFalse(await self.store.remove("beta", "x@example.com"))
        self.assertIsNotNone(await self.store.is_suppressed("acme", "x@example.com"))

    async def test_add_twice(self) -> None:
        """A second add answers False and updates only the reason (when one is given)."""
        self.assertTrue(await self.store.add("acme", "x@example.com", "first", "bounce", T0))
        again = await self.store.add("acme", "X@example.com", "second", "api", T0 + 5)
        self.assertFalse(again)
        self.assertEqual(
            await self.store.is_suppressed("acme", "x@example.com"),
            Suppression("acme", "x@example.com", "second", "bounce", T0),
        )
        self.assertEqual(len(await self.store.list()), 1)
        # An empty reason keeps the one recorded.
        self.assertFalse(await self.store.add("acme", "x@example.com", "", "manual", T0 + 9))
        found = await self.store.is_suppressed("acme", "x@example.com")
        self.assertEqual(found and found.reason, "second")

    async def test_remove(self) -> None:
        """remove is True once, then False; the entry is gone."""
        await self.store.add("acme", "x@example.com", "", "complaint", T0)
        self.assertTrue(await self.store.remove("acme", "X@EXAMPLE.com"))
        self.assertFalse(await self.store.remove("acme", "x@example.com"))
        self.assertIsNone(await self.store.is_suppressed("acme", "x@example.com"))

    async def test_bad_input_fails_deferred(self) -> None:
        """A bad address or source fails the Deferred; nothing is stored."""
        with self.assertRaises(ValueError):
            await self.store.add("acme", "nobody", "", "manual", T0)
        with self.assertRaises(ValueError):
            await self.store.add("acme", "a@b", "", "whim", T0)
        with self.assertRaises(ValueError):
            await self.store.list(after="a@b")
        self.assertEqual(await self.store.list(), [])

    async def test_list_paging(self) -> None:
        """list orders by (tenant, address), filters by tenant and pages with after."""
        for tenant, address in [
            ("beta", "a@x.example"),
            ("acme", "c@x.example"),
            ("acme", "a@x.example"),
            ("acme", "b@x.example"),
        ]:
            await self.store.add(tenant, address, "", "manual", T0)

        def keys(entries: list[Suppression]) -> list[tuple[str, str]]:
            return [(e.tenant, e.address) for e in entries]

        everything = await self.store.list()
        self.assertEqual(
            keys(everything),
            [
                ("acme", "a@x.example"),
                ("acme", "b@x.example"),
                ("acme", "c@x.example"),
                ("beta", "a@x.example"),
            ],
        )
        first = await self.store.list(tenant="acme", limit=2)
        self.assertEqual([e.address for e in first], ["a@x.example", "b@x.example"])
        rest = await self.store.list(tenant="acme", limit=2, after=first[-1].address)
        self.assertEqual([e.address for e in rest], ["c@x.example"])
        across = await self.store.list(limit=2, after=("acme", "b@x.example"))
        self.assertEqual(keys(across), [("acme", "c@x.example"), ("beta", "a@x.example")])
        self.assertEqual(await self.store.list(tenant="gamma"), [])


class SQLiteSuppressionStoreTests(SuppressionStoreContractMixin, TestCase):
    """The store on a real SQLite file."""

    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits on it
        folder = os.path.abspath(self.mktemp())
        self.db = SQLiteDatabase(os.path.join(folder, "s.db"), reactor)
        self.store = SQLiteSuppressionStore(self.db)
        self.addCleanup(self.db.close)
        return self.db.open()


    async def test_lookup_does_not_wait_for_a_writer(self) -> None:
        """The RCPT check reads on its own connection: while another process holds
        the write lock (and this database's writes wait for it), it still answers."""
        await self.store.add("t", "held@example.com", "bounce", "api", T0)
        other = sqlite3.connect(self.db.path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")  # another worker in a long transaction
        write = self.store.add("t", "later@example.com", "bounce", "api", T0)
        found = await self.store.is_suppressed("t", "HELD@example.com")
        self.assertIsNotNone(found)
        self.assertFalse(write.called)  # the write still waits for the lock
        other.execute("COMMIT")
        self.assertTrue(await write)
        self.assertIsNotNone(await self.store.is_suppressed("t", "later@example.com"))

    async def test_lookup_after_close_is_refused(self) -> None:
        """A lookup after the database closed fails as an unavailable store."""
        await self.store.is_suppressed("t", "x@example.com")  # the reader runs
        await self.db.close()
        with self.assertRaises(StoreUnavailable):
            await self.store.is_suppressed("t", "x@example.com")


class SQLiteRememberingSuppressionStoreTests(SuppressionStoreContractMixin, TestCase):
    """The contract again, with the store remembering answers (as a node's does)."""

    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits on it
        folder = os.path.abspath(self.mktemp())
        self.db = SQLiteDatabase(os.path.join(folder, "s.db"), reactor)
        self.store = SQLiteSuppressionStore(self.db, reactor)
        self.addCleanup(self.db.close)
        return self.db.open()


class RememberedAnswersTests(TestCase):
    """A recipient found not suppressed is answered from memory until a suppression
    is added anywhere, by any process."""

    timeout = 60

    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits on it
        self.folder = os.path.abspath(self.mktemp())
        self.path = os.path.join(self.folder, "spool.db")
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.db, self.store = self.open_store(self.clock)
        return self.db.open().addCallback(lambda _: self.warm_up(self.store))

    @staticmethod
    def warm_up(store: SQLiteSuppressionStore) -> Deferred[Any]:
        """Wait for the store's first job on the database thread, which opens its
        change mark: lookups are remembered from then on."""
        return store.list(limit=1)

    def open_store(self, clock: Any) -> tuple[SQLiteDatabase, SQLiteSuppressionStore]:
        """Another store on the same file, with its own connections and its own map
        of the change mark: what another worker process has."""
        db = SQLiteDatabase(self.path, reactor)
        self.addCleanup(db.close)
        return db, SQLiteSuppressionStore(db, clock)

    async def test_answered_from_memory(self) -> None:
        """The second lookup of a recipient needs no database: it answers even after
        the database closed, where a recipient never looked up fails."""
        self.assertIsNone(await self.store.is_suppressed("t", "Ops@Example.com"))
        await self.db.close()
        self.assertIsNone(await self.store.is_suppressed("t", "ops@example.COM"))
        with self.assertRaises(StoreUnavailable):
            await self.store.is_suppressed("t", "new@example.com")
        with self.assertRaises(StoreUnavailable):
            await self.store.is_suppressed("other-tenant", "ops@example.com")

    async def test_an_add_elsewhere_is_seen_at_once(self) -> None:
        """Another worker adds the recipient: the next lookup here finds it."""
        other_db, other = self.open_store(self.clock)
        await other_db.open()
        await self.warm_up(other)
        self.assertIsNone(await self.store.is_suppressed("t", "ops@example.com"))
        self.assertIsNone(await self.store.is_suppressed("t", "ops@example.com"))
        self.assertTrue(await other.add("t", "ops@example.com", "bounce", "bounce", T0))
        found = await self.store.is_suppressed("t", "ops@example.com")
        self.assertEqual(found.address if found else None, "ops@example.com")

    async def test_an_add_by_the_command_is_seen_at_once(self) -> None:
        """``sendarix suppressions add``, another process, against the same file."""
        config = _write_config(
            self.folder, text=f'[spool]\nurl = "sqlite:{self.path}"\n')
        self.assertIsNone(await self.store.is_suppressed("acme", "ci@example.com"))
        out, err, code = await _run(
            ["suppressions", "add", "ci@example.com", "--tenant", "acme",
             "--config", config], self.folder,
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        self.assertIsNotNone(await self.store.is_suppressed("acme", "ci@example.com"))

    async def test_a_lookup_that_shares_an_older_snapshot(self) -> None:
        """Reads taken together share the snapshot that the first of them began. A
        lookup in such a batch misses an add committed after that snapshot; it must
        not be remembered against the mark that add left."""
        other_db, other = self.open_store(self.clock)
        await other_db.open()
        await self.warm_up(other)
        release, snapped, go = threading.Event(), threading.Event(), threading.Event()

        def held(conn: sqlite3.Connection) -> None:
            release.wait(10)  # the reader waits; the next two reads queue up together

        def snapshot_then_wait(conn: sqlite3.Connection) -> None:
            conn.execute("SELECT count(*) FROM supp_entry").fetchone()  # begins it
            snapped.set()
            go.wait(10)

        first = self.db.read(held)
        snapshot = self.db.read(snapshot_then_wait)
        lookup = self.store.is_suppressed("t", "race@example.com")
        release.set()
        # Whether the reader took the held read alone or all three together, the
        # lookup now shares the snapshot begun by the one that is waiting.
        self.assertTrue(await threads.deferToThread(snapped.wait, 10))
        self.assertTrue(await other.add("t", "race@example.com", "", "manual", T0))
        go.set()
        await first
        await snapshot
        self.assertIsNone(await lookup)  # asked before the add was through
        self.assertIsNotNone(await self.store.is_suppressed("t", "race@example.com"))

    async def test_a_remove_keeps_what_is_remembered(self) -> None:
        """Removing an entry changes no "not suppressed" answer (an add changes them
        all); an entry removed and added again is found again."""
        await self.store.add("t", "x@example.com", "", "manual", T0)
        self.assertTrue(await self.store.remove("t", "x@example.com"))
        self.assertIsNone(await self.store.is_suppressed("t", "x@example.com"))
        await self.store.add("t", "x@example.com", "", "manual", T0)
        self.assertIsNotNone(await self.store.is_suppressed("t", "x@example.com"))
        self.assertIsNone(await self.store.is_suppressed("t", "y@example.com"))
        self.assertTrue(await self.store.remove("t", "x@example.com"))
        await self.db.close()
        self.assertIsNone(await self.store.is_suppressed("t", "y@example.com"))

    async def test_trusted_for_a_while_only(self) -> None:
        """Even with no change, an answer is looked up again after TRUSTED_FOR."""
        self.assertIsNone(await self.store.is_suppressed("t", "a@example.com"))
        self.clock.advance(suppression.TRUSTED_FOR - 1)
        self.assertIsNone(await self.store.is_suppressed("t", "a@example.com"))
        self.clock.advance(1)
        await self.db.close()
        with self.assertRaises(StoreUnavailable):
            await self.store.is_suppressed("t", "a@example.com")

    async def test_bounded(self) -> None:
        """At most REMEMBERED recipients; the oldest is forgotten first."""
        self.patch(suppression, "REMEMBERED", 3)
        for name in "abcd":
            self.assertIsNone(await self.store.is_suppressed("t", f"{name}@example.com"))
        await self.db.close()
        for name in "bcd":
            self.assertIsNone(await self.store.is_suppressed("t", f"{name}@example.com"))
        with self.assertRaises(StoreUnavailable):
            await self.store.is_suppressed("t", "a@example.com")

    async def test_without_a_clock_nothing_is_remembered(self) -> None:
        """A store without a clock (it may still have its mark from an add) looks
        every recipient up."""
        db, store = self.open_store(None)
        await db.open()
        await store.add("t", "other@example.com", "", "manual", T0)
        self.assertIsNone(await store.is_suppressed("t", "a@example.com"))
        await db.close()
        with self.assertRaises(StoreUnavailable):
            await store.is_suppressed("t", "a@example.com")


class ChangeMarkTests(SynchronousTestCase):
    """The mark beside the database file."""

    def setUp(self) -> None:
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        self.path = os.path.join(self.folder, "spool.db")
        with open(self.path, "wb"):
            pass

    def test_shared(self) -> None:
        """Two maps of one mark (two processes) see each other's changes, and every
        change is a value not seen before."""
        one = open_change_mark(self.path, "suppressions")
        two = open_change_mark(self.path, "suppressions")
        assert one is not None and two is not None
        self.addCleanup(one.close)
        self.addCleanup(two.close)
        self.assertEqual(one.path, self.path + "-suppressions")
        seen = {one.read()}
        for writer in [one, two] * 50:
            writer.change()
            self.assertEqual(one.read(), two.read())
            seen.add(one.read())
        self.assertEqual(len(seen), 101)

    def test_permissions_follow_the_database(self) -> None:
        os.chmod(self.path, 0o660)
        mark = open_change_mark(self.path, "suppressions")
        assert mark is not None
        self.addCleanup(mark.close)
        self.assertEqual(os.stat(mark.path).st_mode & 0o777, 0o660)

    def test_unavailable(self) -> None:
        """No mark for a database in memory, or where the file cannot be made."""
        self.assertIsNone(open_change_mark(":memory:", "suppressions"))
        self.assertIsNone(open_change_mark(os.path.join(self.path, "x.db"), "suppressions"))


class RedisSuppressionStoreTests(SuppressionStoreContractMixin, TestCase):
    """The store on a private redis-server."""

    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits on it
        def ready(redis: Any) -> None:
            self.store = RedisSuppressionStore(redis)

        return redis_client(self).addCallback(ready)

    async def test_unusual_tenants_and_reasons(self) -> None:
        """Tenants that are prefixes of each other stay apart; reasons and times
        round-trip exactly, also after a reason update."""
        when = T0 + 0.123456789
        await self.store.add("ab", "x@example.com", "caf\u00e9 \"quoted\" / 550", "bounce", when)
        await self.store.add("a", "y@example.com", "", "manual", T0)
        self.assertEqual([e.address for e in await self.store.list(tenant="a")], ["y@example.com"])
        await self.store.add("ab", "x@example.com", "second \u2603", "api", T0)
        self.assertEqual(
            await self.store.is_suppressed("ab", "x@example.com"),
            Suppression("ab", "x@example.com", "second \u2603", "bounce", when),
        )


class SuppressionUsageTests(SynchronousTestCase):
    """Argument errors, caught before any store opens (in-process)."""

    def test_bad_arguments(self) -> None:
        """A bad address or a missing --tenant exits 1 with one line on stderr."""
        folder = os.path.abspath(self.mktemp())
        config = _write_config(folder)
        cases = [
            (["suppressions", "add", "no-at-sign", "--tenant", "acme"], "no-at-sign"),
            (["suppressions", "remove", "a@b@c", "--tenant", "acme"], "a@b@c"),
            (["suppressions", "add", "a@example.com"], "--tenant"),
        ]
        for argv, fragment in cases:
            err = io.StringIO()
            self.patch(sys, "stderr", err)
            self.patch(sys, "stdout", io.StringIO())
            self.assertEqual(main(["--config", config, *argv]), 1)
            lines = err.getvalue().splitlines()
            self.assertEqual(len(lines), 1, lines)
            self.assertIn(fragment, lines[0])
        self.assertFalse(os.path.exists(os.path.join(folder, "var")))


class SuppressionCommandTests(TestCase):
    """``sendarix suppressions add|list|remove`` as subprocesses."""

    timeout = 60

    async def test_add_list_remove(self) -> None:
        """add (twice), list --json, remove, remove again (exit 1, one line)."""
        folder = os.path.abspath(self.mktemp())
        config = _write_config(folder)

        out, err, code = await _run(
            ["suppressions", "add", "Bob@Example.com", "--tenant", "acme",
             "--reason", "asked us", "--config", config], folder,
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        self.assertIn(b"bob@example.com", out)

        # Seed a second entry (another tenant) through the store in this process.
        stores = open_stores(load_config(config), reactor, json_log=False)
        await stores.open()
        try:
            await stores.suppressions.add("beta", "x@example.net", "", "bounce", T0)
        finally:
            await stores.close()

        out, err, code = await _run(
            ["suppressions", "list", "--tenant", "acme", "--json", "--config", config], folder
        )
        self.assertEqual(code, 0, err)
        listed = json.loads(out)
        self.assertEqual(len(listed), 1)
        entry = listed[0]
        self.assertEqual(
            (entry["tenant"], entry["address"], entry["reason"], entry["source"]),
            ("acme", "bob@example.com", "asked us", "manual"),
        )

        out, err, code = await _run(
            ["suppressions", "remove", "BOB@example.com", "--tenant", "acme",
             "--config", config], folder,
        )  # fmt: skip
        self.assertEqual(code, 0, err)

        out, err, code = await _run(
            ["suppressions", "remove", "bob@example.com", "--tenant", "acme",
             "--config", config], folder,
        )  # fmt: skip
        self.assertEqual((code, out), (1, b""))
        self.assertEqual(len(err.decode().splitlines()), 1, err)
        self.assertIn("not suppressed", err.decode())

        stores = open_stores(load_config(config), reactor, json_log=False)
        await stores.open()
        try:
            left = await stores.suppressions.list()
        finally:
            await stores.close()
        self.assertEqual([(e.tenant, e.address) for e in left], [("beta", "x@example.net")])

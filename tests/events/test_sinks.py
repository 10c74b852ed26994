"""Tests for :obj:`sendarix.events.sinks` (the Event schema, sinks) and the SQLite event log."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

import attrs
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor as _reactor
from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    eventAsJSON,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from sendarix.events.sinks import FanoutSink, JSONLogSink
from sendarix.interfaces import IEventLog, IEventSink, ILaterEventSink
from sendarix.model.base32 import encode
from sendarix.model.event import (
    EVENT_TYPES,
    Event,
    EventPage,
    EventQuery,
    format_timestamp,
    new_event_id,
    parse_timestamp,
)
from sendarix.model.message import Reply, TLSInfo
from sendarix.stores.paging import decode_cursor, encode_cursor
from sendarix.stores.redis.eventlog import RedisEventLog
from sendarix.stores.sqlite.database import DatabaseClosed, SQLiteDatabase
from sendarix.stores.sqlite.eventlog import SQLiteEventLog
from tests.support.redisserver import redis_client, start_redis

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

# The global reactor, typed loosely: it provides every reactor interface we pass it as.
reactor: Any = _reactor

RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

SCHEMA_KEYS = {
    "id",
    "type",
    "timestamp",
    "queue_id",
    "message_id",
    "tenant",
    "sender",
    "recipient",
    "recipients",
    "attempt",
    "response",
    "mx",
    "mx_ip",
    "provider",
    "source_ip",
    "tls",
    "bounce_category",
    "tags",
    "node",
}


def full_event() -> Event:
    """An event with every field set."""
    return Event(
        id="01J0000000000000000000000A",
        type="bounced",
        timestamp=1795960800.123,
        queue_id="Q123",
        message_id="<abc@example.com>",
        tenant="acme",
        sender="app@acme.example",
        recipient="User@Example.org",
        attempt=2,
        response=Reply(550, "5.1.1", "no such user"),
        mx="mx1.example.org",
        mx_ip="192.0.2.25",
        provider="example",
        source_ip="198.51.100.7",
        tls=TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384"),
        bounce_category="bad_mailbox",
        tags=["welcome", "eu"],
        node="node-1",
    )


class EventTests(SynchronousTestCase):
    """The Event value and its JSON form."""

    def test_to_json_fields(self) -> None:
        """Every schema key is present, with nested response and tls objects."""
        d = full_event().to_json()
        self.assertEqual(set(d), SCHEMA_KEYS)
        self.assertEqual(d["timestamp"], "2026-11-29T14:00:00.123Z")
        self.assertEqual(d["response"], {"code": 550, "enhanced": "5.1.1", "text": "no such user"})
        self.assertEqual(d["tls"], {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"})
        self.assertEqual(d["tags"], ["welcome", "eu"])
        self.assertEqual(d["attempt"], 2)
        json.dumps(d)  # JSON-able as it is

    def test_unknown_is_null(self) -> None:
        """A minimal event still has every key, null (or empty lists) when unknown."""
        d = Event(id="x", type="accepted", timestamp=0).to_json()
        self.assertEqual(set(d), SCHEMA_KEYS)
        self.assertEqual(d["timestamp"], "1970-01-01T00:00:00.000Z")
        for key in SCHEMA_KEYS - {"id", "type", "timestamp", "tags", "recipients"}:
            self.assertIsNone(d[key], key)
        self.assertEqual((d["tags"], d["recipients"]), ([], []))

    def test_shared_json(self) -> None:
        """The shared form is the JSON form, made once; it is not part of the event's
        value (equality, hash, repr, evolve), and to_json still gives a fresh copy."""
        e = full_event()
        twin = full_event()
        shared = e.shared_json()
        self.assertEqual(shared, e.to_json())
        self.assertIs(e.shared_json(), shared)
        self.assertIsNot(e.to_json(), shared)
        self.assertEqual(e, twin)
        self.assertEqual(hash(e), hash(twin))
        self.assertEqual(repr(e), repr(twin))
        moved = attrs.evolve(e, node="node-2")
        self.assertEqual(moved.shared_json()["node"], "node-2")
        self.assertEqual(shared["node"], "node-1")

    def test_stored_json(self) -> None:
        """The stored text is the JSON form, compact, and reads back as the event."""
        e = full_event()
        text = e.stored_json()
        self.assertEqual(text, json.dumps(e.to_json(), separators=(",", ":")))
        self.assertNotIn(" ", text.replace("no such user", ""))
        self.assertEqual(Event.from_json(json.loads(text)), e)

    def test_round_trip(self) -> None:
        """from_json inverts to_json."""
        e = full_event()
        self.assertEqual(Event.from_json(json.loads(json.dumps(e.to_json()))), e)
        a = Event.make("accepted", 5.5, recipients=["a@x", "b@x"], queue_id="Q")
        self.assertEqual(Event.from_json(a.to_json()), a)

    def test_type_checked(self) -> None:
        """Only the documented event types are allowed."""
        self.assertEqual(
            set(EVENT_TYPES),
            {
                "accepted",
                "delivered",
                "deferred",
                "bounced",
                "expired",
                "suppressed",
                "rejected",
                "cancelled",
                "complained",
            },
        )
        self.assertRaises(ValueError, Event, id="x", type="opened", timestamp=0)
        self.assertRaises(ValueError, EventQuery, type="opened")
        self.assertRaises(ValueError, EventQuery, limit=0)

    @given(st.floats(min_value=0, max_value=4102444800, allow_nan=False))
    def test_timestamps(self, ts: float) -> None:
        """Timestamps format as RFC 3339 UTC with milliseconds and parse back to the ms."""
        text = format_timestamp(ts)
        self.assertRegex(text, RFC3339_MS)
        self.assertLessEqual(abs(parse_timestamp(text) - ts), 0.0005 + 1e-6)

    @given(st.lists(st.floats(min_value=0, max_value=4102444800, allow_nan=False),
                    min_size=2, max_size=8))
    def test_timestamps_in_any_order(self, stamps: list[float]) -> None:
        """The text of each stamp is its own, whatever second was formatted before
        (the last second's text is kept for the many events of one second)."""
        for ts in stamps + [stamps[0] + 0.0004, stamps[0] - 0.5]:
            ts = max(0.0, ts)
            seconds, ms = divmod(round(ts * 1000), 1000)
            expected = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self.assertEqual(format_timestamp(ts), f"{expected}.{ms:03d}Z")

    def test_parse_offsets(self) -> None:
        """Timestamps with other offsets and precisions, or as numbers, parse too."""
        self.assertEqual(parse_timestamp("2026-11-29T15:00:00.5+01:00"), 1795960800.5)
        self.assertEqual(parse_timestamp("2026-11-29T14:00:00Z"), 1795960800.0)
        self.assertEqual(parse_timestamp(12), 12.0)

    @given(st.integers(min_value=0, max_value=(1 << 80) - 1))
    def test_id_digits(self, value: int) -> None:
        """An id's random part reads back as the number it was made from."""
        digits = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
        text = new_event_id(0)[:10] + encode(value, 16)
        back = 0
        for ch in text[10:]:
            back = back * 32 + digits.index(ch)
        self.assertEqual((len(text), back), (26, value))

    def test_ids_sortable_unique(self) -> None:
        """Ids are unique and sort by creation time."""
        ids = [new_event_id() for _ in range(2000)]
        self.assertEqual(len(set(ids)), 2000)
        self.assertEqual(sorted(ids), ids)
        self.assertLess(new_event_id(1000.0), new_event_id(2000.0))
        self.assertEqual(len(ids[0]), 26)


class JSONLogSinkTests(SynchronousTestCase):
    """JSONLogSink."""

    def test_captured_by_observer(self) -> None:
        """Each event becomes one log event carrying the JSON form."""
        seen: list[dict[str, Any]] = []
        observer = cast(ILogObserver, seen.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        sink = JSONLogSink()
        self.assertTrue(verifyObject(IEventSink, sink))
        event = full_event()
        sink.emit(event)
        ours = [e for e in seen if "sendarix_event" in e]
        self.assertEqual(len(ours), 1)
        logged = ours[0]
        self.assertEqual(logged["sendarix_event"], event.to_json())
        self.assertEqual(logged["log_level"], LogLevel.info)
        self.assertEqual(logged["log_namespace"], "sendarix.events")
        self.assertEqual(
            formatEvent(logged), "event bounced queue_id=Q123 recipient=User@Example.org"
        )
        # twist's JSON output keeps it intact.
        self.assertEqual(json.loads(eventAsJSON(logged))["sendarix_event"], event.to_json())

    def test_braces_are_text(self) -> None:
        """An address with braces is written as it is, not read as a field."""
        seen: list[dict[str, Any]] = []
        event = attrs.evolve(full_event(), recipient="{odd}}@example.org")
        JSONLogSink(Logger(observer=cast(ILogObserver, seen.append))).emit(event)
        self.assertEqual(formatEvent(seen[0]),
                         "event bounced queue_id=Q123 recipient={odd}}@example.org")

    def test_same_line_as_logger_info(self) -> None:
        """The log event is made by hand (it is the busiest): the text output shows
        it exactly as an event made by ``Logger.info`` with the same text."""
        seen: list[dict[str, Any]] = []
        logger = Logger(namespace="sendarix.events",
                        observer=cast(ILogObserver, seen.append))
        event = attrs.evolve(full_event(), recipient="{odd}}@example.org")
        JSONLogSink(logger).emit(event)
        logger.info("event bounced queue_id=Q123 recipient={{odd}}}}@example.org")
        ours, theirs = seen
        theirs["log_time"] = ours["log_time"]
        self.assertEqual(formatEventAsClassicLogText(ours), formatEventAsClassicLogText(theirs))
        self.assertIn("[sendarix.events#info] event bounced", formatEventAsClassicLogText(ours))

    def test_given_logger(self) -> None:
        """A given Logger is used."""
        seen: list[dict[str, Any]] = []
        JSONLogSink(Logger(observer=cast(ILogObserver, seen.append))).emit(full_event())
        self.assertEqual(seen[0]["sendarix_event"]["id"], full_event().id)


@implementer(IEventSink)
class _ListSink:
    """Keeps what it is given."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> Deferred[None]:
        self.events.append(event)
        return succeed(None)


@implementer(IEventSink)
class _BrokenSink:
    """Always fails."""

    def emit(self, event: Event) -> None:
        raise ZeroDivisionError("broken sink")


class FanoutSinkTests(SynchronousTestCase):
    """FanoutSink."""

    def test_failure_logged_not_raised(self) -> None:
        """A failing sink does not stop the others, and the failure is logged."""
        first, last = _ListSink(), _ListSink()
        fan = FanoutSink([first, _BrokenSink(), last])
        self.assertTrue(verifyObject(IEventSink, fan))
        event = full_event()
        self.assertIsNone(self.successResultOf(fan.emit(event)))
        self.assertEqual(first.events, [event])
        self.assertEqual(last.events, [event])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class EmitLaterTests(SynchronousTestCase):
    """FanoutSink.emit_later: an event held for the reactor's next pass, never
    overtaken by one emitted after it."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.sink = _ListSink()
        self.fan = FanoutSink([self.sink], clock=self.clock)

    def test_provides_the_interface(self) -> None:
        self.assertTrue(verifyObject(ILaterEventSink, self.fan))

    def test_held_until_the_next_pass(self) -> None:
        """Nothing reaches the sinks until the clock's timed call runs; then the
        event does, and its Deferred fires."""
        accepted = Event.make("accepted", 1.0, queue_id="Q")
        done = self.fan.emit_later(accepted)
        self.assertNoResult(done)
        self.assertEqual(self.sink.events, [])
        self.clock.advance(0)
        self.assertEqual(self.sink.events, [accepted])
        self.assertIsNone(self.successResultOf(done))

    def test_an_event_emitted_after_goes_after(self) -> None:
        """An event emitted while others are held sends them first, in order, and
        the held timed call is dropped (nothing is emitted twice)."""
        first = Event.make("accepted", 1.0, queue_id="A")
        second = Event.make("accepted", 1.0, queue_id="B")
        outcome = Event.make("bounced", 1.1, queue_id="A")
        held = [self.fan.emit_later(first), self.fan.emit_later(second)]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.successResultOf(self.fan.emit(outcome))
        self.assertEqual(self.sink.events, [first, second, outcome])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        for done in held:
            self.assertIsNone(self.successResultOf(done))
        self.clock.advance(0)
        self.assertEqual(self.sink.events, [first, second, outcome])

    def test_without_a_clock_at_once(self) -> None:
        """A fan-out without a clock (an embedding application's) emits at once."""
        fan = FanoutSink([self.sink])
        event = Event.make("accepted", 1.0, queue_id="Q")
        self.successResultOf(fan.emit_later(event))
        self.assertEqual(self.sink.events, [event])


class EventLogContractMixin(_Base):
    """The IEventLog contract: every delivery log backend passes these tests.

    A backend's TestCase mixes this in and implements ``open_log`` (a started log)
    and ``stored_rows`` (how many events and index entries the store still holds).
    """

    async def open_log(self) -> Any:
        raise NotImplementedError

    async def stored_rows(self) -> list[int]:
        raise NotImplementedError

    async def emit_all(self, log: Any, events: list[Event]) -> None:
        await gatherResults([log.emit(e) for e in events])

    async def test_interface(self) -> None:
        """The log provides IEventLog."""
        log = await self.open_log()
        self.assertTrue(verifyObject(IEventLog, log))

    async def test_search_each_field(self) -> None:
        """Each query field selects exactly the matching events."""
        log = await self.open_log()
        a = full_event()
        b = Event(
            id="b",
            type="delivered",
            timestamp=2000.0,
            queue_id="Q9",
            message_id="other@x",
            tenant="beta",
            sender="Ops@Beta.example",
            recipient="someone@beta.example",
            tags=["eu"],
        )
        c = Event(id="c", type="deferred", timestamp=3000.0, tenant="beta")
        await self.emit_all(log, [a, b, c])

        async def ids(**kw: Any) -> list[str]:
            page = await log.search(EventQuery(**kw))
            return [e.id for e in page.events]

        self.assertEqual(await ids(), ["c", "b", a.id])
        self.assertEqual(await ids(recipient="user@example.ORG"), [a.id])
        self.assertEqual(await ids(recipient="user@example"), [])  # whole address only
        self.assertEqual(await ids(sender="ops@beta.example"), ["b"])
        self.assertEqual(await ids(queue_id="Q123"), [a.id])
        self.assertEqual(await ids(message_id="abc@example.com"), [a.id])
        self.assertEqual(await ids(message_id="<other@x>"), ["b"])
        self.assertEqual(await ids(type="deferred"), ["c"])
        self.assertEqual(await ids(tenant="beta"), ["c", "b"])
        self.assertEqual(await ids(tag="eu"), ["b", a.id])
        self.assertEqual(await ids(tag="welcome"), [a.id])
        self.assertEqual(await ids(tag="eu", recipient="someone@beta.example"), ["b"])
        self.assertEqual(await ids(tag="welcome", recipient="someone@beta.example"), [])
        self.assertEqual(await ids(since=2000.0), ["c", "b", a.id])
        self.assertEqual(await ids(since=2000.0, until=1795960800.0), ["c", "b"])
        self.assertEqual(await ids(until=2000.0), [])
        self.assertEqual(await ids(tenant="beta", type="delivered"), ["b"])
        page = await log.search(EventQuery(queue_id="Q123"))
        self.assertEqual(page.events, (a,))
        self.assertIsNone(page.next_cursor)

    async def test_pagination(self) -> None:
        """120 events in pages of 50: 50, 50, 20, newest first, no repeats or gaps."""
        log = await self.open_log()
        events = [Event.make("delivered", 1000.0 + i, tenant="t") for i in range(120)]
        for e in events:  # one at a time, so seq order is emission order
            await log.emit(e)
        # Events emitted after the first page is read don't disturb later pages.
        page1 = await log.search(EventQuery(tenant="t"))
        await log.emit(Event.make("delivered", 9999.0, tenant="t"))
        assert page1.next_cursor is not None
        page2 = await log.search(EventQuery(tenant="t", cursor=page1.next_cursor))
        assert page2.next_cursor is not None
        page3 = await log.search(EventQuery(tenant="t", cursor=page2.next_cursor))
        self.assertEqual([len(p.events) for p in (page1, page2, page3)], [50, 50, 20])
        self.assertIsNone(page3.next_cursor)
        got = [e.id for p in (page1, page2, page3) for e in p.events]
        self.assertEqual(got, [e.id for e in reversed(events)])

    async def test_bad_cursor(self) -> None:
        """A cursor that is not ours fails the search with ValueError."""
        log = await self.open_log()
        for cursor in ("!!", "bm9wZQ", "djE6eA", "djI6NQ", ""):
            with self.assertRaises(ValueError):
                await log.search(EventQuery(cursor=cursor))
        self.assertEqual(decode_cursor(encode_cursor(12345)), 12345)

    async def test_limit_capped(self) -> None:
        """No page holds more than 1000 events."""
        log = await self.open_log()
        await self.emit_all(log, [Event.make("accepted", float(i)) for i in range(1001)])
        page = await log.search(EventQuery(limit=5000))
        self.assertEqual(len(page.events), 1000)
        self.assertIsNotNone(page.next_cursor)

    async def test_accepted_with_recipients(self) -> None:
        """An accepted event listing several recipients is found by each of them."""
        log = await self.open_log()
        accepted = Event.make(
            "accepted", 10.0, queue_id="Q1", recipients=["a@x.example", "B@y.example"]
        )
        delivered = Event.make("delivered", 11.0, queue_id="Q1", recipient="b@y.example")
        await self.emit_all(log, [accepted, delivered])
        for rcpt, expected in (
            ("a@x.example", [accepted]),
            ("b@Y.example", [delivered, accepted]),
            ("c@x.example", []),
        ):
            page = await log.search(EventQuery(recipient=rcpt))
            self.assertEqual(list(page.events), expected, rcpt)

    async def test_duplicate_ignored(self) -> None:
        """Emitting the same event twice stores it once."""
        log = await self.open_log()
        e = full_event()
        await log.emit(e)
        await log.emit(e)
        page = await log.search(EventQuery(recipient=e.recipient))
        self.assertEqual(page.events, (e,))

    async def test_search_sees_earlier_emits(self) -> None:
        """A search queued after an emit that nobody awaited still finds that event
        (both go through the database's background queue, in order)."""
        log = await self.open_log()
        event = Event.make("accepted", 1.0, queue_id="Q1", recipient="a@x")
        log.emit(event)  # fire and forget, as Intake does
        page = await log.search(EventQuery(queue_id="Q1"))
        self.assertEqual(page.events, (event,))

    async def test_trim(self) -> None:
        """trim deletes events older than the cut-off, with their search entries."""
        log = await self.open_log()
        log.trim_batch = 7  # several batches
        old = [
            Event.make("accepted", float(i), recipients=["r@x", "s@x"], tags=["t"])
            for i in range(20)
        ]
        new = [Event.make("delivered", 100.0 + i, recipient="r@x", tags=["t"]) for i in range(3)]
        await self.emit_all(log, old + new)
        self.assertEqual(await log.trim(100.0), 20)
        self.assertEqual(await log.trim(100.0), 0)
        page = await log.search(EventQuery())
        self.assertEqual(list(page.events), list(reversed(new)))
        self.assertEqual(len((await log.search(EventQuery(recipient="s@x"))).events), 0)
        self.assertEqual(len((await log.search(EventQuery(tag="t"))).events), 3)
        self.assertEqual(await self.stored_rows(), [3, 3, 3])

    def test_page_json(self) -> None:
        """An EventPage renders as the GET /v1/events body."""
        page = EventPage((full_event(),), "abc")
        self.assertEqual(page.to_json(), {"events": [full_event().to_json()], "next_cursor": "abc"})


class SQLiteEventLogTests(EventLogContractMixin, TestCase):
    """SQLiteEventLog on a real SQLite file."""

    async def open_log(self) -> SQLiteEventLog:
        db = SQLiteDatabase(os.path.join(self.mktemp(), "sendarix.db"), reactor)
        self.addCleanup(db.close)
        self.db = db
        log = SQLiteEventLog(db)
        await db.open()
        return log

    async def stored_rows(self) -> list[int]:
        return cast(
            list[int],
            await self.db.run(
                lambda conn: [
                    conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                    for table in ("event_log", "event_recipient", "event_tag")
                ]
            ),
        )


    def hold_database(self) -> threading.Event:
        """Keep the database thread busy until the returned event is set, so that
        what is queued meanwhile is batched deterministically."""
        held = threading.Event()
        self.db.run(lambda conn: held.wait(10))
        return held

    async def test_emits_share_one_job(self) -> None:
        """Events emitted while the log's write waits in the queue ride along with it:
        a hundred emits make one job, and all are stored."""
        log = await self.open_log()
        commits: list[str] = []
        await self.db.run(lambda conn: conn.set_trace_callback(
            lambda sql: commits.append(sql) if sql == "RELEASE events" else None))
        events = [Event.make("accepted", 1000.0 + i, recipient=f"r{i}@x") for i in range(100)]
        held = self.hold_database()
        emitted = gatherResults([log.emit(e) for e in events])
        held.set()
        await emitted
        await self.db.run(lambda conn: conn.set_trace_callback(None))
        self.assertEqual(len(commits), 1)
        page = await log.search(EventQuery(type="accepted", limit=1000))
        self.assertEqual(sorted(e.id for e in page.events), sorted(e.id for e in events))

    async def test_bad_event_fails_alone(self) -> None:
        """An event the database refuses fails its own emit; the events written in
        the same job are stored."""
        log = await self.open_log()
        await self.db.run(lambda conn: conn.execute(
            "CREATE TEMP TRIGGER refuse BEFORE INSERT ON event_log WHEN NEW.queue_id = 'BAD'"
            " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"))
        good = [Event.make("accepted", 1.0, queue_id="Q1", recipient="a@x"),
                Event.make("accepted", 2.0, queue_id="Q2", recipient="b@x")]
        bad = Event.make("accepted", 1.5, queue_id="BAD", recipient="c@x")
        held = self.hold_database()
        results = [log.emit(good[0]), log.emit(bad), log.emit(good[1])]
        held.set()
        await results[0]
        await results[2]
        with self.assertRaises(sqlite3.IntegrityError):
            await results[1]
        page = await log.search(EventQuery(type="accepted"))
        self.assertEqual({e.queue_id for e in page.events}, {"Q1", "Q2"})

    async def test_emit_after_close_fails(self) -> None:
        """After the database is closed, emit fails (nothing waits forever)."""
        log = await self.open_log()
        await self.db.close()
        with self.assertRaises(DatabaseClosed):
            await log.emit(full_event())


class RedisEventLogTests(EventLogContractMixin, TestCase):
    """RedisEventLog on a private redis-server."""

    async def open_log(self) -> RedisEventLog:
        self.redis = await redis_client(self)
        log = RedisEventLog(self.redis)
        # As the stores do: the log finishes its writes before the connection closes
        # (a write cut off by the disconnect would otherwise be retried after the test).
        self.addCleanup(log.close)
        return log

    async def stored_rows(self) -> list[int]:
        counts = [int(await self.redis.execute_command("ZCARD", "sendarix:ev:all"))]
        for pattern in ("sendarix:ev:x:r:*", "sendarix:ev:x:g:*"):
            total = 0
            for key in await self.redis.execute_command("KEYS", pattern):
                total += int(await self.redis.execute_command("ZCARD", key))
            counts.append(total)
        return counts

    async def test_long_scan_pages_on(self) -> None:
        """A search that reads scan_limit index entries without filling its page
        returns what it found with a cursor, and the next page goes on from there."""
        log = await self.open_log()
        log.scan_batch = 4
        log.scan_limit = 8
        match = Event.make("bounced", 1.0, tenant="t")
        others = [Event.make("delivered", 2.0 + i, tenant="t") for i in range(12)]
        for e in [match, *others]:
            await log.emit(e)
        first = await log.search(EventQuery(tenant="t", type="bounced"))
        self.assertEqual(first.events, ())
        assert first.next_cursor is not None
        second = await log.search(
            EventQuery(tenant="t", type="bounced", cursor=first.next_cursor)
        )
        self.assertEqual(second.events, (match,))
        self.assertIsNone(second.next_cursor)

    async def test_outage_buffers_then_writes(self) -> None:
        """While Redis is down an emitted event waits in memory; it is written once
        Redis is back, and its Deferred fires then."""
        log = await self.open_log()
        log.writer.retry_delay = 0.1
        self.redis_stop()  # type: ignore[attr-defined]
        event = Event.make("delivered", 5.0, tenant="t")
        emitted = log.emit(event)
        await task.deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(emitted.called)
        port, stop = start_redis(self.redis_dir, port=self.redis_port)  # type: ignore[attr-defined]
        self.redis_stop = stop
        await emitted
        self.assertEqual((await log.search(EventQuery(tenant="t"))).events, (event,))

    async def test_close_drops_events_during_outage(self) -> None:
        """Closing while Redis is down drops the waiting events (their Deferreds
        fire) instead of retrying for ever."""
        log = await self.open_log()
        self.redis_stop()  # type: ignore[attr-defined]
        emitted = log.emit(Event.make("delivered", 5.0, tenant="t"))
        await task.deferLater(reactor, 0.1, lambda: None)
        await log.close()
        self.assertTrue(emitted.called)

    async def test_order_kept_through_the_pool(self) -> None:
        """Events emitted at once over a pool of connections are numbered in the
        order they were emitted."""
        log = await self.open_log()
        events = [Event.make("delivered", 100.0, tenant="t") for _ in range(300)]
        await self.emit_all(log, events)
        page = await log.search(EventQuery(limit=1000))
        self.assertEqual([e.id for e in page.events], [e.id for e in reversed(events)])

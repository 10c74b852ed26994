"""The webhook directory: configured endpoints and those added at run time, kept
current on the node's clock; and the sealing of stored secrets."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sendarix.config.secret import NodeSecret
from sendarix.events.webhooks.directory import WebhookDirectory
from sendarix.events.webhooks.endpoints import (
    KEY_PURPOSE,
    SealError,
    WebhookEndpoint,
    endpoint_from_stored,
    seal,
    unseal,
)
from sendarix.events.webhooks.signature import generate_secret, parse_secret
from sendarix.model.event import Event
from sendarix.model.webhook import STANDARD_RETRY_SCHEDULE, StoredWebhook, new_endpoint_name
from sendarix.stores.sqlite.database import SQLiteDatabase
from sendarix.stores.sqlite.webhooks import SQLiteWebhookEndpointStore

reactor: Any = _reactor
KEY = NodeSecret(b"a node secret of some length").derive(KEY_PURPOSE)
OTHER_KEY = NodeSecret(b"another node secret, not it").derive(KEY_PURPOSE)
T0 = 1_800_000_000.0


def stored(tenant: str = "acme", events: tuple[str, ...] = ("delivered",),
           key: bytes = KEY, name: str | None = None, secret: str | None = None,
           url: str = "https://hooks.example/x") -> StoredWebhook:
    name = name or new_endpoint_name()
    return StoredWebhook(name, tenant, url, events, STANDARD_RETRY_SCHEDULE, T0,
                         seal(key, name, [secret or generate_secret()]))


class SealTests(SynchronousTestCase):
    def test_round_trip_and_wrong_key_or_name(self) -> None:
        """Secrets open with the key and name they were sealed for, and only so; the
        sealed text does not contain them."""
        a, b = generate_secret(), generate_secret()
        sealed = seal(KEY, "wh_x", [a, b])
        self.assertNotIn(a.removeprefix("whsec_")[:12], sealed)
        self.assertEqual(unseal(KEY, "wh_x", sealed), [a, b])
        self.assertNotEqual(seal(KEY, "wh_x", [a, b]), sealed)  # a fresh nonce each time
        for key, name, text in ((OTHER_KEY, "wh_x", sealed), (KEY, "wh_y", sealed),
                                (KEY, "wh_x", sealed[:-4] + "AAAA"), (KEY, "wh_x", "!!")):
            with self.assertRaises(SealError):
                unseal(key, name, text)

    def test_endpoint_from_stored(self) -> None:
        secret = generate_secret()
        value = stored(secret=secret)
        endpoint = endpoint_from_stored(value, KEY)
        self.assertEqual(endpoint.keys, (parse_secret(secret),))
        self.assertEqual((endpoint.name, endpoint.tenant, endpoint.url),
                         (value.name, "acme", value.url))
        self.assertEqual(endpoint_from_stored(value, None).keys, ())


class DirectoryApplyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.configured = WebhookEndpoint("cfg", "acme", "https://c.example/", ["accepted"],
                                          (parse_secret(generate_secret()),))
        self.directory = WebhookDirectory([self.configured], task.Clock(), key=KEY)
        self.changes: list[tuple[set[str], set[str]]] = []
        self.directory.listeners.append(lambda a, r: self.changes.append((a, r)))

    def test_merges_and_tells_what_changed(self) -> None:
        a, b = stored("acme"), stored("globex", ("bounced", "delivered"))
        self.directory.apply([a, b])
        self.assertEqual(self.directory.names(), sorted(["cfg", a.name, b.name]))
        self.assertEqual(self.changes, [({a.name, b.name}, set())])
        delivered = Event.make("delivered", T0, tenant="acme")
        self.assertEqual(self.directory.match(delivered), [a.name])
        self.assertEqual(self.directory.match(Event.make("accepted", T0, tenant="acme")),
                         ["cfg"])
        self.assertEqual(self.directory.match(Event.make("bounced", T0, tenant="globex")),
                         [b.name])
        same = self.directory.get(a.name)
        self.directory.apply([a, b])
        self.assertEqual(len(self.changes), 1)  # nothing changed: nobody is told
        self.assertIs(self.directory.get(a.name), same)  # and nothing is opened again
        self.directory.apply([b])
        self.assertEqual(self.changes[-1], (set(), {a.name}))
        self.assertIsNone(self.directory.get(a.name))
        self.assertEqual(self.directory.match(delivered), [])

    def test_configured_name_wins(self) -> None:
        self.directory.apply([stored(name="cfg", url="https://elsewhere.example/")])
        self.assertEqual(self.directory.get("cfg"), self.configured)
        self.assertEqual(self.changes, [])

    def test_unopenable_secret_left_out(self) -> None:
        """A stored endpoint sealed under another node secret, or any stored endpoint
        when the node has no secret, is not used (never sent unsigned)."""
        foreign, good = stored(key=OTHER_KEY), stored()
        self.directory.apply([foreign, good])
        self.assertEqual(self.directory.names(), sorted(["cfg", good.name]))
        keyless = WebhookDirectory([], task.Clock(), key=None)
        keyless.apply([good])
        self.assertEqual(keyless.names(), [])


class DirectoryRefreshTests(TestCase):
    """The refresh on the node's clock (a task.Clock here) over a real SQLite store."""

    async def setUp(self) -> None:  # type: ignore[override]
        path = os.path.join(os.path.abspath(self.mktemp()), "s.db")
        self.db = SQLiteDatabase(path, reactor)
        self.store = SQLiteWebhookEndpointStore(self.db)
        self.addCleanup(self.db.close)
        await self.db.open()
        self.clock = task.Clock()
        self.directory = WebhookDirectory([], self.clock, self.store, KEY, interval=2.0)
        self.addCleanup(self.directory.stop)

    async def tick(self) -> None:
        """One interval passes on the clock; the read it starts finishes."""
        self.clock.advance(2.0)
        reading = self.directory.reading
        self.assertIsNotNone(reading, "no read started")
        await reading

    async def test_additions_and_removals_followed(self) -> None:
        value = stored()
        await self.store.add(value)
        self.directory.start()
        self.assertEqual(self.directory.names(), [])  # the first read is one interval on
        self.clock.advance(1.9)
        self.assertIsNone(self.directory.reading)
        await self.tick()
        self.assertEqual(self.directory.names(), [value.name])
        other = stored("globex")
        await self.store.add(other)
        await self.store.remove(value.name)
        self.assertEqual(self.directory.names(), [value.name])  # until the next read
        await self.tick()
        self.assertEqual(self.directory.names(), [other.name])
        await self.directory.stop()
        await self.store.remove(other.name)
        self.clock.advance(10.0)
        self.assertIsNone(self.directory.reading)  # stopped: no more reads
        self.assertEqual(self.directory.names(), [other.name])

    async def test_refresh_now(self) -> None:
        """``refresh`` reads at once (the node does it before serving)."""
        value = stored()
        await self.store.add(value)
        await self.directory.refresh()
        self.assertEqual(self.directory.names(), [value.name])

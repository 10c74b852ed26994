"""Slow and idle clients do not starve a new one: with many sessions open (idle after
the greeting, or sending a byte every few seconds), a new client still submits a
message within a second, and the per-address limit still holds.

The counts are bounded for the normal suite (both ends of every connection live in
this process); ``SENDARIX_IDLE_SESSIONS`` and ``SENDARIX_SLOW_SESSIONS`` raise them
(10,000 and 1,000 for the long run, which needs twice as many file descriptors).
"""

from __future__ import annotations

import os
import smtplib
import socket
import time
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from tests.support.relay import in_thread, start_relay

IDLE = int(os.environ.get("SENDARIX_IDLE_SESSIONS", "1500"))
SLOW = int(os.environ.get("SENDARIX_SLOW_SESSIONS", "300"))
PER_ADDRESS = 50

RELAY = {"name": "relay", "endpoint": "tcp:0:interface=127.0.0.1", "tls": "none",
         "auth": "none", "trusted_networks": ["127.0.0.0/8"],
         "max_connections": IDLE + SLOW + 100, "max_connections_per_ip": PER_ADDRESS}


def _source(i: int) -> str:
    """Spread the sessions over many loopback addresses (the per-address limit)."""
    n = i // PER_ADDRESS
    return f"127.0.{10 + n // 250}.{1 + n % 250}"


class SlowClientTests(TestCase):
    timeout = 300

    def setUp(self) -> Any:
        async def go() -> None:
            self.relay = await start_relay(self, [RELAY])

        return ensureDeferred(go())

    def open_sessions(self, count: int, offset: int) -> list[socket.socket]:
        """``count`` sessions that read the greeting and then say nothing."""
        port = self.relay.ports["relay"]
        out = []
        for i in range(offset, offset + count):
            s = socket.create_connection(("127.0.0.1", port), timeout=30,
                                         source_address=(_source(i), 0))
            out.append(s)
        for s in out:
            s.recv(1024)  # the 220 greeting
        return out

    def submit_once(self) -> float:
        """Seconds a fresh client (from 127.0.0.1) takes to have a message queued."""
        start = time.monotonic()
        with smtplib.SMTP("127.0.0.1", self.relay.ports["relay"], timeout=10) as s:
            s.sendmail("a@example.com", ["b@example.org"], b"Subject: fast\r\n\r\nhi\r\n")
        return time.monotonic() - start

    async def test_new_client_not_starved(self) -> None:
        idle = await in_thread(self.open_sessions, IDLE, 0)
        slow = await in_thread(self.open_sessions, SLOW, IDLE)
        self.addCleanup(lambda: [s.close() for s in idle + slow])

        # The slow ones trickle a command, one byte at a time, for a while.
        def trickle() -> None:
            for s in slow:
                s.send(b"N")

        waits = []
        for _ in range(3):
            await in_thread(trickle)
            waits.append(await in_thread(self.submit_once))
            await task.deferLater(reactor, 0.5, lambda: None)
        # The bound the issue sets, on the best of three tries (the machine is shared:
        # one slow try says little, three say the sessions starve new clients).
        self.assertLess(min(waits), 1.0, f"a new client waited {waits} s")

        # The per-address limit holds: one more from a full address is refused.
        def one_too_many() -> bytes:
            with socket.create_connection(("127.0.0.1", self.relay.ports["relay"]),
                                          timeout=10, source_address=(_source(0), 0)) as s:
                return s.recv(1024)

        refused = await in_thread(one_too_many)
        self.assertTrue(refused.startswith(b"421"), refused)
        stats = await self.relay.stores.spool.stats()
        self.assertEqual(stats.messages, 3)

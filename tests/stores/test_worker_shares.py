"""Limits counted per process (the embedded SQLite backend) when N worker processes
run: each takes 1/N of every connection cap, rate, warmup cap and AUTH failure
budget, so that together they never exceed what was configured."""

from __future__ import annotations

import datetime

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase

from sendarix.config.loader import parse_config
from sendarix.config.settings import EgressSourceConfig, WarmupConfig
from sendarix.egress.sources import TieredSelector
from sendarix.ingress.ratelimit import RateLimiter
from sendarix.routing.throttle import MemoryThrottle
from sendarix.stores.sqlite.backend import SQLiteBackend

DAY0 = datetime.date(2026, 1, 1)


def admitted(allow: object, count: int) -> int:
    return sum(1 for _ in range(count) if allow())


class ShareTests(SynchronousTestCase):
    def test_connection_cap(self) -> None:
        whole, half = MemoryThrottle(), MemoryThrottle(share=0.5)
        self.assertEqual(admitted(lambda: whole.acquire_connection("s", 5, 0.0), 9), 5)
        self.assertEqual(admitted(lambda: half.acquire_connection("s", 5, 0.0), 9), 2)
        # Never less than one connection.
        self.assertEqual(admitted(lambda: half.acquire_connection("t", 1, 0.0), 3), 1)

    def test_site_rate(self) -> None:
        """Over 10 s at 60/min: the whole admits about 10, each half about 5."""
        for share, expected in ((1.0, 11), (0.5, 6)):
            throttle = MemoryThrottle(share=share)
            now, sent = 0.0, 0
            while now <= 10.0:
                if throttle.admit("s", 60.0, 60.0, now) == 0.0:
                    sent += 1
                now += 0.01
            self.assertEqual(sent, expected, share)

    def test_submission_rate(self) -> None:
        """A burst of the rate itself: 10 at once, or 5 in each of two workers."""
        whole, half = RateLimiter(), RateLimiter(share=0.5)
        self.assertEqual(admitted(lambda: whole.allow("cred", 10, 60.0, 0.0), 20), 10)
        self.assertEqual(admitted(lambda: half.allow("cred", 10, 60.0, 0.0), 20), 5)

    def test_warmup_cap(self) -> None:
        source = EgressSourceConfig(name="a", address="192.0.2.1",
                                    warmup=WarmupConfig(start=DAY0, daily=(50,)))
        self.assertEqual(TieredSelector((source,)).remaining(source, "gmail", DAY0), 50)
        self.assertEqual(
            TieredSelector((source,), share=0.5).remaining(source, "gmail", DAY0), 25
        )

    def test_sqlite_backend_of_a_worker(self) -> None:
        """The backend of one of N workers gives its limiters 1/N; of a single
        process, the whole."""
        for workers, share, failures in ((None, 1.0, 6), (1, 1.0, 6), (2, 0.5, 3), (3, 1 / 3, 2)):
            node = {} if workers is None else {"workers": workers}
            config = parse_config({"node": node, "spool": {"url": "sqlite:/tmp/x.db"}}, "/")
            backend = SQLiteBackend.from_config(config, reactor)
            self.assertEqual(backend.share, share)
            throttle = backend.throttle("n1")
            assert isinstance(throttle, MemoryThrottle)
            self.assertEqual(throttle.share, share)
            self.assertEqual(backend.auth_limiter(6, 60.0, 300.0).max_failures, failures)

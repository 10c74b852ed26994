"""The backend is chosen once, from ``[spool] url``; each backend builds every store
and every shared limit of its kind, behind :class:`IBackend`."""

from __future__ import annotations

import gc
import os
import sqlite3
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from sendarix.config.loader import parse_config
from sendarix.ingress.authlimit import AuthLimiter
from sendarix.interfaces import (
    IAuthLimiter,
    IBackend,
    IEgressSelector,
    IFailoverStrategy,
    IThrottle,
)
from sendarix.routing.throttle import MemoryThrottle
from sendarix.stores.backends import open_stores, stored_keys_before_start
from sendarix.stores.errors import StoreUnavailable
from sendarix.stores.redis.backend import RedisBackend
from sendarix.stores.redis.limits import SharedAuthLimiter
from sendarix.stores.sqlite.backend import SQLiteBackend
from tests.support.redisserver import start_redis

reactor: Any = _reactor

POOL = {"relays": {"endpoints": [{"host": "127.0.0.1", "port": 2525}]}}
SOURCES = [{"name": "a", "address": "127.0.0.1"}]


class BackendChoiceTests(TestCase):
    """``open_stores`` picks the backend from the URL; everything else asks it."""

    def check_builds(self, backend: Any) -> None:
        self.assertTrue(verifyObject(IBackend, backend))
        self.assertTrue(verifyObject(IThrottle, backend.throttle("n1")))
        self.assertTrue(verifyObject(IAuthLimiter, backend.auth_limiter(5, 60.0, 300.0)))
        config = parse_config({"pool": POOL, "egress": {"source": SOURCES}}, "/")
        self.assertTrue(verifyObject(IEgressSelector,
                                     backend.egress_selector(config.egress_sources)))
        self.assertTrue(verifyObject(IFailoverStrategy,
                                     backend.endpoint_strategy(config.pools["relays"])))

    async def test_sqlite(self) -> None:
        """A sqlite: URL: one file, limits and routing state in this process."""
        path = os.path.join(os.path.abspath(self.mktemp()), "spool.db")
        os.makedirs(os.path.dirname(path))
        stores = open_stores(parse_config({"spool": {"url": f"sqlite:{path}"}}, "/"), reactor)
        backend = stores.backend
        self.assertIsInstance(backend, SQLiteBackend)
        self.check_builds(backend)
        self.assertIsInstance(backend.throttle("n1"), MemoryThrottle)
        self.assertIsInstance(backend.auth_limiter(5, 60.0, 300.0), AuthLimiter)
        self.assertNotIsInstance(backend.auth_limiter(5, 60.0, 300.0), SharedAuthLimiter)
        self.assertFalse(backend.shares_state)
        await stores.open()
        try:
            self.assertEqual((await stores.spool.stats()).messages, 0)
        finally:
            await stores.close()
        self.assertEqual(stored_keys_before_start(stores.config), (0, None))

    async def test_sqlite_unopenable(self) -> None:
        """A database that cannot be opened is a StoreUnavailable naming the file."""
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)  # a folder where the database file should be
        stores = open_stores(parse_config({"spool": {"url": f"sqlite:{path}"}}, "/"), reactor)
        with self.assertRaises(StoreUnavailable) as caught:
            await stores.open()
        self.assertIn(path, str(caught.exception))
        await stores.close()  # nothing opened: nothing to close, and it does not hang
        # Nothing is left unhandled once the stores are gone (no error logged later).
        del stores, caught
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(sqlite3.OperationalError), [])

    async def test_redis(self) -> None:
        """A redis:// URL: every store and every shared limit in that Redis."""
        port, stop = start_redis(os.path.abspath(self.mktemp()))
        self.addCleanup(stop)
        config = parse_config({"spool": {"url": f"redis://127.0.0.1:{port}/0",
                                         "allow_volatile": True}}, "/")
        stores = open_stores(config, reactor)
        backend = stores.backend
        self.assertIsInstance(backend, RedisBackend)
        self.assertTrue(backend.shares_state)
        self.assertIsNone(stored_keys_before_start(config))
        await stores.open(wait=10)
        try:
            self.check_builds(backend)
            self.assertIsInstance(backend.auth_limiter(5, 60.0, 300.0), SharedAuthLimiter)
        finally:
            await stores.close()

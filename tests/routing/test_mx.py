"""Tests for sendarix.routing.mx against a real DNS server on 127.0.0.1."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from sendarix.interfaces import IRouter
from sendarix.routing.mx import (
    DNSResolver,
    Hop,
    LookupStatus,
    MXRouter,
    Route,
)
from tests.support.dnsserver import start_dns

RECORDS: dict[str, dict[str, Any]] = {
    "example.org": {"MX": [(20, "mx2.example.org"), (10, "mx1.example.org")], "TTL": 100},
    "mx1.example.org": {"A": ["127.0.0.2"], "AAAA": ["::2"], "TTL": 100},
    "mx2.example.org": {"A": ["127.0.0.3"], "TTL": 100},
    "tie.example": {"MX": [(10, "a.tie.example"), (10, "b.tie.example")]},
    "a.tie.example": {"A": ["127.0.1.1"]},
    "b.tie.example": {"A": ["127.0.1.2"]},
    "implicit.example": {"A": ["127.0.2.1"], "AAAA": ["::3"]},
    "nomail.example": {"MX": [(0, ".")]},
    "broken.example": {"SERVFAIL": True},
    "noaddr.example": {"MX": [(10, "empty.noaddr.example")]},
    "empty.noaddr.example": {"TXT": ["nothing here"]},
}


class MXRouterTests(TestCase):
    """MXRouter and DNSResolver against the twisted.names test server."""

    def setUp(self) -> None:
        self.port, stop = start_dns(RECORDS)
        self.stop_dns = stop
        self.addCleanup(stop)
        self.clock = task.Clock()
        self.resolver = self._resolver()

    def _resolver(self) -> DNSResolver:
        return DNSResolver(
            nameservers=(("127.0.0.1", self.port),),
            timeout=0.5,
            cache_ttl_max=3600.0,
            clock=self.clock,
            threadpool_reactor=reactor,  # type: ignore[arg-type]
        )

    def router(self, seed: int = 0) -> MXRouter:
        return MXRouter(self.resolver, port=2525, rng=random.Random(seed))

    async def _route(self, domain: str, seed: int = 0) -> Route:
        return await self.router(seed).route(domain)

    def test_interface(self) -> None:
        """MXRouter provides IRouter."""
        self.assertTrue(verifyObject(IRouter, self.router()))

    async def test_preference_order(self) -> None:
        """Lower preference first; IPv4 before IPv6 for each host; the port applies."""
        route = await self._route("Example.ORG.")
        self.assertIsNone(route.error)
        self.assertEqual(route.domain, "example.org")
        self.assertEqual(
            route.hops,
            (
                Hop("mx1.example.org", "127.0.0.2", 2525, 10),
                Hop("mx1.example.org", "::2", 2525, 10),
                Hop("mx2.example.org", "127.0.0.3", 2525, 20),
            ),
        )

    async def test_equal_preference_shuffled(self) -> None:
        """Hosts of equal preference come in both orders across seeds, always both."""
        orders = set()
        for seed in range(20):
            route = await self._route("tie.example", seed)
            orders.add(tuple(h.host for h in route.hops))
        self.assertEqual(
            orders,
            {("a.tie.example", "b.tie.example"), ("b.tie.example", "a.tie.example")},
        )

    async def test_implicit_mx(self) -> None:
        """Without MX records the domain's own A/AAAA addresses are the route."""
        route = await self._route("implicit.example")
        self.assertIsNone(route.error)
        self.assertEqual(
            route.hops,
            (
                Hop("implicit.example", "127.0.2.1", 2525, 0),
                Hop("implicit.example", "::3", 2525, 0),
            ),
        )

    async def test_null_mx(self) -> None:
        """A null MX (RFC 7505) is a permanent failure, 5.1.10."""
        route = await self._route("nomail.example")
        self.assertEqual(route.hops, ())
        assert route.error is not None
        self.assertTrue(route.error.permanent)
        self.assertEqual(route.error.enhanced, "5.1.10")

    async def test_nxdomain(self) -> None:
        """A domain that does not exist is a permanent failure, 5.1.2."""
        route = await self._route("missing.example")
        assert route.error is not None
        self.assertTrue(route.error.permanent)
        self.assertEqual(route.error.enhanced, "5.1.2")

    async def test_servfail(self) -> None:
        """SERVFAIL is a temporary failure, 4.4.3."""
        route = await self._route("broken.example")
        assert route.error is not None
        self.assertFalse(route.error.permanent)
        self.assertEqual(route.error.enhanced, "4.4.3")

    async def test_no_usable_address(self) -> None:
        """An MX host without addresses leaves no hop: temporary 4.4.4."""
        route = await self._route("noaddr.example")
        assert route.error is not None
        self.assertFalse(route.error.permanent)
        self.assertEqual(route.error.enhanced, "4.4.4")

    async def test_address_literal(self) -> None:
        """Address literals route straight to the address, without DNS."""
        await self.stop_dns()
        route = await self._route("[192.0.2.7]")
        self.assertEqual(route, Route("[192.0.2.7]", (Hop("192.0.2.7", "192.0.2.7", 2525, 0),),
                                      None))
        route6 = await self._route("[IPv6:2001:db8::1]")
        self.assertEqual(route6.hops[0].address, "2001:db8::1")
        bad = await self._route("[999.1.1.1]")
        assert bad.error is not None
        self.assertTrue(bad.error.permanent)

    async def test_cache_honours_ttl(self) -> None:
        """A repeat lookup within the TTL is served from the cache; once the TTL has
        passed, the (now stopped) server is asked again and the failure is temporary."""
        first = await self._route("example.org")
        self.assertIsNone(first.error)
        await self.stop_dns()
        self.clock.advance(99)
        second = await self._route("example.org")
        self.assertEqual(second, first)
        self.clock.advance(2)
        third = await self._route("example.org")
        assert third.error is not None
        self.assertFalse(third.error.permanent)
        self.assertEqual(third.error.enhanced, "4.4.3")

    async def test_cache_ttl_max(self) -> None:
        """cache_ttl_max caps the TTL of cached answers."""
        self.resolver = DNSResolver(
            nameservers=(("127.0.0.1", self.port),), timeout=0.5, cache_ttl_max=10.0,
            clock=self.clock, threadpool_reactor=reactor,  # type: ignore[arg-type]
        )
        answer = await self.resolver.mx("example.org")
        self.assertEqual(answer.status, LookupStatus.OK)
        await self.stop_dns()
        self.clock.advance(9)
        self.assertEqual(await self.resolver.mx("example.org"), answer)
        self.clock.advance(2)
        again = await self.resolver.mx("example.org")
        self.assertEqual(again.status, LookupStatus.FAILURE)

    async def test_resolver_statuses(self) -> None:
        """The resolver tells NXDOMAIN, no answer and failure apart."""
        self.assertEqual((await self.resolver.mx("missing.example")).status,
                         LookupStatus.NXDOMAIN)
        self.assertEqual((await self.resolver.mx("implicit.example")).status,
                         LookupStatus.NO_ANSWER)
        self.assertEqual((await self.resolver.addresses("broken.example")).status,
                         LookupStatus.FAILURE)
        addresses = await self.resolver.addresses("mx1.example.org")
        self.assertEqual(addresses.addresses, ("127.0.0.2", "::2"))

    async def test_lookup_off_reactor(self) -> None:
        """A slow lookup runs in a thread: the reactor keeps turning meanwhile."""
        await self.stop_dns()
        pending = self.router().route("example.org")
        await deferLater(reactor, 0.05, lambda: None)  # type: ignore[arg-type]
        self.assertFalse(pending.called)
        route = await pending
        assert route.error is not None
        self.assertEqual(route.error.enhanced, "4.4.3")

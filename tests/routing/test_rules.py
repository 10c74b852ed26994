"""Tests for sendarix.routing.rules: [[route]] matching and router chains."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from sendarix.config.loader import parse_config
from sendarix.config.settings import RouteConfig
from sendarix.interfaces import IRouter
from sendarix.routing.mx import Hop, Route, RouteError
from sendarix.routing.pool import OrderedFallback
from sendarix.routing.rules import (
    DEFAULT_ROUTE,
    SIMULATOR_ROUTE,
    SIMULATOR_RULE,
    RouteFacts,
    RouterChain,
    RuleRouter,
    RuleTable,
    matches,
)


def table(*routes: dict[str, Any], **sections: Any) -> RuleTable:
    """A RuleTable from ``[[route]]`` tables, validated like the configuration."""
    data: dict[str, Any] = {"route": list(routes), **sections}
    return RuleTable(parse_config(data, ".").routes)


FACTS = RouteFacts.of("Example.ORG", "App@Shop.example", "acme", ("news", "eu"), "bulk")


class RuleMatchTests(SynchronousTestCase):
    """Each match key, their combination, and first-match-wins."""

    def test_facts_normalised(self) -> None:
        """Domains are lowercased; the sender domain is taken from the address."""
        self.assertEqual(FACTS.recipient_domain, "example.org")
        self.assertEqual(FACTS.sender_domain, "shop.example")
        self.assertEqual(RouteFacts.of("x.test", "", "t").sender_domain, "")

    def test_each_key(self) -> None:
        """Every key matches its own fact and fails on another value."""
        cases = {
            "recipient_domain": ("example.org", "other.org"),
            "sender_domain": ("shop.example", "example.org"),
            "tenant": ("acme", "globex"),
            "tag": ("eu", "us"),
            "stream": ("bulk", "transactional"),
        }
        for key, (good, bad) in cases.items():
            self.assertTrue(matches(RouteConfig(match={key: (good,)}), FACTS), key)
            self.assertFalse(matches(RouteConfig(match={key: (bad,)}), FACTS), key)
            self.assertTrue(matches(RouteConfig(match={key: (bad, good)}), FACTS), key)

    def test_all_keys_must_hold(self) -> None:
        """A rule with several keys matches only when every one holds."""
        rule = RouteConfig(match={"tenant": ("acme",), "stream": ("transactional",)})
        self.assertFalse(matches(rule, FACTS))
        rule = RouteConfig(match={"tenant": ("acme",), "stream": ("bulk",)})
        self.assertTrue(matches(rule, FACTS))

    def test_no_stream_never_matches_stream(self) -> None:
        """A message without a stream does not match a stream rule."""
        facts = RouteFacts.of("example.org", "a@b.example", "acme")
        self.assertFalse(matches(RouteConfig(match={"stream": ("bulk",)}), facts))

    def test_first_match_wins(self) -> None:
        """Rules are tried in order; the first that matches routes the mail."""
        rules = table(
            {"match": {"tenant": "globex"}, "via": "simulator"},
            {"match": {"tag": ["news"]}, "via": "pool:relays"},
            {"match": {}, "via": "mx"},
            pool={"relays": {"endpoints": ["127.0.0.2:25"]}},
        )
        index, rule = rules.select(FACTS)
        self.assertEqual((index, rule.via), (1, "pool:relays"))

    def test_default_route(self) -> None:
        """No matching rule: the default MX route."""
        rules = table({"match": {"tenant": "globex"}, "via": "simulator"})
        self.assertEqual(rules.select(FACTS), (-1, DEFAULT_ROUTE))
        self.assertEqual(DEFAULT_ROUTE.via, "mx")
        self.assertIsNone(DEFAULT_ROUTE.egress_pool)

    @given(
        st.lists(st.sampled_from(["a", "b", "c"]), min_size=0, max_size=4),
        st.sampled_from(["a", "b", "c"]),
    )
    def test_first_matching_index(self, tenants: list[str], tenant: str) -> None:
        """Over any list of tenant rules, the index chosen is the first rule naming
        the tenant, or -1."""
        rules = RuleTable(tuple(RouteConfig(match={"tenant": (t,)}) for t in tenants))
        index, _ = rules.select(RouteFacts.of("x.test", "", tenant))
        expected = tenants.index(tenant) if tenant in tenants else -1
        self.assertEqual(index, expected)


@implementer(IRouter)
class _FixedRouter:
    """Answers every domain with one fixed Route (a test double of the interface,
    not of any router of ours)."""

    def __init__(self, route: Route) -> None:
        self.answer = route
        self.asked: list[str] = []

    def route(self, domain: str) -> Any:
        self.asked.append(domain)
        return succeed(self.answer)


HOP = Hop("mx.example.org", "192.0.2.1", 25, 10)
OK = Route("example.org", (HOP,), None)
TEMP = Route("example.org", (), RouteError(False, "dns", "4.4.3"))
PERM = Route("example.org", (), RouteError(True, "nxdomain", "5.1.2"))


class RouterChainTests(SynchronousTestCase):
    """RouterChain asks its routers in order."""

    def test_interface(self) -> None:
        """RouterChain provides IRouter."""
        verifyObject(IRouter, RouterChain([_FixedRouter(OK)]))

    def test_first_with_hops_wins(self) -> None:
        """A router with hops answers; later routers are not asked."""
        first, second, third = _FixedRouter(TEMP), _FixedRouter(OK), _FixedRouter(OK)
        route = self.successResultOf(RouterChain([first, second, third]).route("example.org"))
        self.assertEqual(route, OK)
        self.assertEqual(third.asked, [])

    def test_errors(self) -> None:
        """When none has hops, a permanent error wins over temporary ones, else the
        last error is the answer."""
        chain = RouterChain([_FixedRouter(TEMP), _FixedRouter(PERM), _FixedRouter(TEMP)])
        self.assertEqual(self.successResultOf(chain.route("example.org")), PERM)
        chain = RouterChain([_FixedRouter(TEMP)])
        self.assertEqual(self.successResultOf(chain.route("example.org")), TEMP)

    def test_empty(self) -> None:
        """A chain needs a router."""
        self.assertRaises(ValueError, RouterChain, [])


class RuleRouterTests(SynchronousTestCase):
    """RuleRouter pairs the chosen rule with the router of its via."""

    def test_choose(self) -> None:
        """A pool rule gets the pool's router, a simulator rule the simulator's; no
        match: mx."""
        mx, pool, simulator = _FixedRouter(OK), _FixedRouter(OK), _FixedRouter(OK)
        strategy = OrderedFallback()
        rules = table(
            {"match": {"stream": "bulk"}, "via": "simulator"},
            {"match": {"tenant": "acme"}, "via": "pool:relays", "egress_pool": "warm"},
            pool={"relays": {"endpoints": ["127.0.0.2:25"]}},
            egress={"source": [{"name": "w", "address": "127.0.0.10", "pool": "warm"}]},
        )
        router = RuleRouter(rules, {"mx": (mx, strategy), "pool:relays": (pool, strategy),
                                    "simulator": (simulator, strategy)})
        sim = router.choose(FACTS)
        self.assertEqual((sim.index, sim.router, sim.strategy), (0, simulator, strategy))
        acme = router.choose(RouteFacts.of("example.org", "", "acme"))
        self.assertEqual((acme.index, acme.rule.egress_pool), (1, "warm"))
        self.assertIs(acme.router, pool)
        other = router.choose(RouteFacts.of("example.org", "", "globex"))
        self.assertEqual(other.index, -1)
        self.assertIs(other.router, mx)

    def test_missing_router(self) -> None:
        """Every via the rules name needs a router."""
        rules = table(
            {"via": "pool:relays"}, pool={"relays": {"endpoints": ["127.0.0.2:25"]}}
        )
        e = self.assertRaises(
            ValueError, RuleRouter, rules, {"mx": (_FixedRouter(OK), OrderedFallback())}
        )
        self.assertIn("pool:relays", str(e))
        self.assertIn("simulator", str(e))

    def test_sandbox_and_simulator_domain(self) -> None:
        """Sandbox mail and mail to the simulator domain take the simulator route,
        whatever rule would match them."""
        mx, simulator = _FixedRouter(OK), _FixedRouter(OK)
        strategy = OrderedFallback()
        rules = table({"match": {"tenant": "acme"}, "via": "mx"})
        router = RuleRouter(rules, {"mx": (mx, strategy), "simulator": (simulator, strategy)},
                            simulator_domain="Sim.Example.")
        for facts in (RouteFacts.of("example.org", "", "acme", sandbox=True),
                      RouteFacts.of("sim.example", "", "acme")):
            choice = router.choose(facts)
            self.assertEqual(choice.index, SIMULATOR_RULE)
            self.assertEqual(choice.rule, SIMULATOR_ROUTE)
            self.assertIs(choice.router, simulator)
            self.assertEqual(router.choice(choice.index), choice)
        self.assertEqual(router.choose(RouteFacts.of("example.org", "", "acme")).index, 0)

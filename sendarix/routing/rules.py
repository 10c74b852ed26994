"""Routing rules (``[[route]]``) and router composition (pure selection, no I/O).

:class:`RuleTable` picks the first ``[[route]]`` rule whose every match key holds for a
delivery (recipient domain, sender domain, tenant, tag, stream; a key listing several
values matches any of them; an empty match matches everything).  When no rule matches,
the implicit default route applies: ``via = "mx"`` with no egress pool of its own.

:class:`RuleRouter` composes the routers a rule can name: it holds one
(:class:`~sendarix.interfaces.IRouter`, :class:`~sendarix.interfaces.IFailoverStrategy`)
pair per ``via`` (``mx``, ``pool:NAME``, ``simulator``) and answers, for a delivery's
facts, the rule and the pair that handle it.  Mail of sandbox credentials and mail to
the simulator domain take the simulator route whatever the rules say.

:class:`RouterChain` composes any list of :class:`~sendarix.interfaces.IRouter`s the way
``twisted.names.resolve.ResolverChain`` composes resolvers: each is asked in turn and
the first route with hops wins; when none has any, the first permanent error (else the
last error) is the answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from zope.interface import implementer

from sendarix.config.settings import RouteConfig
from sendarix.interfaces import IFailoverStrategy, IRouter
from sendarix.routing.mx import Route

__all__ = [
    "DEFAULT_ROUTE",
    "SIMULATOR_ROUTE",
    "SIMULATOR_RULE",
    "RouteChoice",
    "RouteFacts",
    "RouterChain",
    "RuleRouter",
    "RuleTable",
    "matches",
]

#: The route of a delivery no rule matched.
DEFAULT_ROUTE = RouteConfig()
#: The route of sandbox mail and of mail to the simulator domain...
SIMULATOR_ROUTE = RouteConfig(via="simulator")
#: ...and its index where a rule's index is expected.
SIMULATOR_RULE = -2


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".") if "@" in address else ""


@frozen
class RouteFacts:
    """What routing rules may look at for one delivery."""

    recipient_domain: str
    sender_domain: str = ""
    tenant: str = "default"
    tags: tuple[str, ...] = ()
    stream: str | None = None
    #: From a sandbox credential: delivered to the simulator only.
    sandbox: bool = False

    @classmethod
    def of(
        cls,
        recipient_domain: str,
        sender: str,
        tenant: str,
        tags: Iterable[str] = (),
        stream: str | None = None,
        sandbox: bool = False,
    ) -> RouteFacts:
        """Facts from a recipient domain and a sender address (lowercased)."""
        return cls(
            recipient_domain.lower().rstrip("."),
            _domain_of(sender),
            tenant,
            tuple(tags),
            stream,
            sandbox,
        )


def matches(rule: RouteConfig, facts: RouteFacts) -> bool:
    """True when every match key of ``rule`` holds for ``facts``."""
    for key, values in rule.match.items():
        if key == "recipient_domain":
            ok = facts.recipient_domain in values
        elif key == "sender_domain":
            ok = facts.sender_domain in values
        elif key == "tenant":
            ok = facts.tenant in values
        elif key == "tag":
            ok = any(tag in values for tag in facts.tags)
        elif key == "stream":
            ok = facts.stream is not None and facts.stream in values
        else:  # the configuration rejects unknown keys; never match on one
            ok = False
        if not ok:
            return False
    return True


@frozen
class RuleTable:
    """The ordered ``[[route]]`` rules: first match wins."""

    rules: tuple[RouteConfig, ...] = ()

    def select(self, facts: RouteFacts) -> tuple[int, RouteConfig]:
        """The index and rule that route ``facts``; ``(-1, DEFAULT_ROUTE)`` when none
        matches."""
        for i, rule in enumerate(self.rules):
            if matches(rule, facts):
                return i, rule
        return -1, DEFAULT_ROUTE


@frozen
class RouteChoice:
    """How one delivery is routed: the rule (its index, -1 for the default route,
    :data:`SIMULATOR_RULE` for the simulator's), and the router and failover strategy
    of its ``via``."""

    index: int
    rule: RouteConfig
    router: IRouter
    strategy: IFailoverStrategy


class RuleRouter:
    """``[[route]]`` rules over the routers they name.

    :param routers: ``via`` → (router, failover strategy); must cover every ``via`` of
        the rules, the default route's and ``simulator``.
    :param simulator_domain: the domain whose mail always goes to the simulator.
    """

    def __init__(
        self,
        rules: RuleTable,
        routers: Mapping[str, tuple[IRouter, IFailoverStrategy]],
        simulator_domain: str | None = None,
    ) -> None:
        needed = {r.via for r in rules.rules} | {DEFAULT_ROUTE.via, SIMULATOR_ROUTE.via}
        missing = needed - set(routers)
        if missing:
            raise ValueError(f"no router for {', '.join(sorted(missing))}")
        self.rules = rules
        self.routers = dict(routers)
        self.simulator_domain = (
            simulator_domain.lower().rstrip(".") if simulator_domain else None
        )

    def rule(self, index: int) -> RouteConfig:
        """The rule at ``index`` (-1: the default route, :data:`SIMULATOR_RULE`: the
        simulator's)."""
        if index == SIMULATOR_RULE:
            return SIMULATOR_ROUTE
        return self.rules.rules[index] if index >= 0 else DEFAULT_ROUTE

    def choose(self, facts: RouteFacts) -> RouteChoice:
        """The rule that routes ``facts`` and its router and strategy."""
        if facts.sandbox or facts.recipient_domain == self.simulator_domain:
            return self.choice(SIMULATOR_RULE)
        index, _ = self.rules.select(facts)
        return self.choice(index)

    def choice(self, index: int) -> RouteChoice:
        """The :obj:`RouteChoice` of the rule at ``index``."""
        rule = self.rule(index)
        router, strategy = self.routers[rule.via]
        return RouteChoice(index, rule, router, strategy)


@implementer(IRouter)
@define
class RouterChain:
    """Asks each router in turn; the first route with hops wins."""

    routers: tuple[IRouter, ...] = field(converter=tuple)

    def __attrs_post_init__(self) -> None:
        if not self.routers:
            raise ValueError("a router chain needs at least one router")

    def route(self, domain: str) -> Deferred[Route]:
        """See :obj:`IRouter.route`."""
        return Deferred.fromCoroutine(self._route(domain))

    async def _route(self, domain: str) -> Route:
        errors: list[Route] = []
        for router in self.routers:
            route = await router.route(domain)
            if route.error is None and route.hops:
                return route
            errors.append(route)
        permanent = [r for r in errors if r.error is not None and r.error.permanent]
        return permanent[0] if permanent else errors[-1]

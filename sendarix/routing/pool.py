"""Smarthost endpoint pools: ``via = "pool:NAME"`` routes (docs/routing.md).

:class:`PoolRouter` (an :class:`~sendarix.interfaces.IRouter`) turns a ``[pool.NAME]``
into hops, one per endpoint address, each carrying the endpoint's TLS policy and AUTH
credentials.  :class:`EndpointPool` (an :class:`~sendarix.interfaces.IFailoverStrategy`)
decides the order to try them in: lower ``priority`` first, and among equal priorities
a random order weighted by ``weight``; an endpoint that failed rests.

Endpoint health is a circuit breaker per endpoint (:class:`CircuitBreaker`, pure):

- **closed**: the endpoint is used.
- **open**: a connection error, a connect timeout or a 421 opened it; the endpoint is
  left out until ``cooldown`` seconds have passed, and the delivery moves on to the next
  endpoint at once.
- **half-open**: the cooldown is over; the endpoint is tried again (a probe) in its
  normal place.  A session closes the breaker; another failure opens it for a new
  cooldown.

:class:`OrderedFallback` is the strategy of MX routes: the hops in the router's order,
with no memory (the per-destination window handles dead MX sites).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import os
import random
from collections.abc import Sequence

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from sendarix.config.errors import ConfigError
from sendarix.config.settings import EndpointConfig, PoolConfig
from sendarix.interfaces import IFailoverStrategy, IRouter
from sendarix.routing.mx import DNSResolver, Hop, LookupStatus, Route, RouteError

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "EndpointPool",
    "OrderedFallback",
    "PoolRouter",
    "endpoint_key",
]


class BreakerState(enum.Enum):
    """The health of one endpoint."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@define
class CircuitBreaker:
    """One endpoint's health (pure: time is passed in)."""

    cooldown: float
    opened_until: float | None = field(default=None, init=False)
    failures: int = field(default=0, init=False)

    def state(self, now: float) -> BreakerState:
        """CLOSED, OPEN (resting until ``opened_until``) or HALF_OPEN (may be probed)."""
        if self.opened_until is None:
            return BreakerState.CLOSED
        if now < self.opened_until:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def available(self, now: float) -> bool:
        """True unless the endpoint is resting."""
        return self.state(now) is not BreakerState.OPEN

    def failure(self, now: float) -> None:
        """The endpoint held no session: rest for ``cooldown`` from ``now``."""
        self.failures += 1
        self.opened_until = now + self.cooldown

    def success(self) -> None:
        """The endpoint held a session: healthy again."""
        self.failures = 0
        self.opened_until = None


def endpoint_key(pool: str, endpoint: EndpointConfig) -> str:
    """The health key of an endpoint: ``pool/host:port``."""
    return f"{pool}/{endpoint.host}:{endpoint.port}"


def _weighted_order(items: list[Hop], weights: list[int], rng: random.Random) -> list[Hop]:
    """A random order where heavier items tend to come first (weighted sampling
    without replacement)."""
    items, weights = list(items), list(weights)
    out: list[Hop] = []
    while len(items) > 1:
        i = rng.choices(range(len(items)), weights=weights)[0]
        out.append(items.pop(i))
        weights.pop(i)
    # The last one has no choice left: no draw (a one-endpoint pool draws nothing).
    return out + items


@implementer(IFailoverStrategy)
@define
class OrderedFallback:
    """The hops in the router's order (MX preference); nothing is remembered."""

    def order(self, hops: Sequence[Hop], now: float) -> tuple[Hop, ...]:
        """All hops, as given."""
        return tuple(hops)

    def failed(self, hop: Hop, now: float) -> None:
        """Nothing to remember."""

    def succeeded(self, hop: Hop, now: float) -> None:
        """Nothing to remember."""

    def states(self, now: float) -> dict[str, str]:
        """No endpoint health is kept."""
        return {}


@implementer(IFailoverStrategy)
@define
class EndpointPool:
    """Priority and weight order with a circuit breaker per endpoint."""

    pool: PoolConfig
    rng: random.Random = field(factory=random.Random)
    breakers: dict[str, CircuitBreaker] = field(factory=dict, init=False)
    _weights: dict[str, int] = field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        for ep in self.pool.endpoints:
            key = endpoint_key(self.pool.name, ep)
            self.breakers[key] = CircuitBreaker(self.pool.cooldown)
            self._weights[key] = ep.weight

    def endpoint_of(self, hop: Hop) -> str:
        """The name ``hop``'s health is kept under (``pool/host:port``)."""
        return hop.endpoint or f"{self.pool.name}/{hop.host}:{hop.port}"

    def opened_until(self, hop: Hop) -> float | None:
        """Until when ``hop``'s breaker rests (None: closed)."""
        return self._breaker(hop).opened_until

    def merge_open(self, endpoint: str, until: float, now: float) -> None:
        """Another node opened ``endpoint``'s breaker until ``until``: rest it here
        too, unless ours already rests longer.  Unknown endpoints are ignored."""
        breaker = self.breakers.get(endpoint)
        if breaker is None or until <= now:
            return
        if breaker.opened_until is None or breaker.opened_until < until:
            breaker.opened_until = until

    def _breaker(self, hop: Hop) -> CircuitBreaker:
        key = self.endpoint_of(hop)
        breaker = self.breakers.get(key)
        if breaker is None:
            breaker = self.breakers[key] = CircuitBreaker(self.pool.cooldown)
        return breaker

    def order(self, hops: Sequence[Hop], now: float) -> tuple[Hop, ...]:
        """Available hops: lower priority first, weighted random among equals."""
        usable = [h for h in hops if self._breaker(h).available(now)]
        out: list[Hop] = []
        for priority in sorted({h.preference for h in usable}):
            same = [h for h in usable if h.preference == priority]
            weights = [self._weights.get(h.endpoint or "", 1) for h in same]
            out.extend(_weighted_order(same, weights, self.rng))
        return tuple(out)

    def failed(self, hop: Hop, now: float) -> None:
        """Open ``hop``'s breaker for the pool's cooldown."""
        self._breaker(hop).failure(now)

    def succeeded(self, hop: Hop, now: float) -> None:
        """Close ``hop``'s breaker."""
        self._breaker(hop).success()

    def states(self, now: float) -> dict[str, str]:
        """Each endpoint's breaker state (for logs and stats)."""
        return {key: b.state(now).value for key, b in sorted(self.breakers.items())}


@functools.lru_cache(maxsize=1024)
def _is_ip(host: str) -> bool:
    # Asked on every delivery, about the few hosts the pools name: parse each once.
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@implementer(IRouter)
class PoolRouter:
    """Routes every domain to the endpoints of one ``[pool.NAME]``.

    Passwords are read from the environment variables named by ``password_env`` when
    the router is built; a missing variable is a configuration error.
    """

    def __init__(
        self,
        pool: PoolConfig,
        resolver: DNSResolver | None = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        self.pool = pool
        self.resolver = resolver
        env = os.environ if environ is None else environ
        self._credentials: dict[str, tuple[str | None, str | None]] = {}
        for i, ep in enumerate(pool.endpoints):
            username = ep.username or pool.username
            password_env = ep.password_env or pool.password_env
            password = None
            if password_env is not None:
                password = env.get(password_env)
                if password is None:
                    raise ConfigError(
                        f"pool.{pool.name}.endpoints[{i}].password_env"
                        if ep.password_env else f"pool.{pool.name}.password_env",
                        f"environment variable {password_env} is not set",
                    )
            self._credentials[endpoint_key(pool.name, ep)] = (username, password)
        # A pool whose endpoints are all addresses has the same hops for every
        # message: made once, not per delivery (this is on every message's way out).
        self._fixed_hops: tuple[Hop, ...] | None = None
        if all(_is_ip(ep.host) for ep in pool.endpoints):
            self._fixed_hops = tuple(self._hop(ep, ep.host) for ep in pool.endpoints)

    def _hop(self, ep: EndpointConfig, address: str) -> Hop:
        key = endpoint_key(self.pool.name, ep)
        username, password = self._credentials[key]
        return Hop(
            ep.host, address, ep.port, ep.priority,
            endpoint=key, tls=ep.tls or self.pool.tls,
            username=username, password=password,
        )

    def route(self, domain: str) -> Deferred[Route]:
        """See :obj:`IRouter.route`: every endpoint of the pool, in configured order."""
        if self._fixed_hops:
            return succeed(Route(domain, self._fixed_hops, None))
        return Deferred.fromCoroutine(self._route(domain))

    async def _route(self, domain: str) -> Route:
        hops: list[Hop] = []
        problems: list[str] = []
        for ep in self.pool.endpoints:
            if _is_ip(ep.host):
                addresses: tuple[str, ...] = (ep.host,)
            elif self.resolver is None:
                problems.append(f"{ep.host}: no resolver")
                continue
            else:
                answer = await self.resolver.addresses(ep.host)
                if answer.status is not LookupStatus.OK:
                    problems.append(answer.detail or f"{ep.host}: no address")
                    continue
                addresses = answer.addresses
            hops.extend(self._hop(ep, address) for address in addresses)
        if hops:
            return Route(domain, tuple(hops), None)
        reason = f"pool {self.pool.name}: no endpoint address ({'; '.join(problems)})"
        return Route(domain, (), RouteError(False, reason, "4.4.3"))

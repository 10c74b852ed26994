"""The default route: MX lookup (RFC 5321 section 5.1) with dnspython, off the reactor.

:obj:`DNSResolver` runs every blocking dnspython query in the reactor's thread pool and keeps
its own TTL-honouring cache on an injected clock.  :obj:`MXRouter` turns its answers into a
:obj:`Route`: the hops to try in order, or a :obj:`RouteError` that says whether to bounce or to
defer.
"""

from __future__ import annotations

import enum
import ipaddress
import random
from typing import Any

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
from attrs import frozen
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from sendarix.interfaces import IRouter
from sendarix.model.session import Hop

log = Logger()

NULL_MX = "."
"""The exchange of a null MX record (RFC 7505): "this domain accepts no mail"."""


class LookupStatus(enum.Enum):
    """How one DNS question ended."""

    OK = "ok"
    NXDOMAIN = "nxdomain"
    NO_ANSWER = "no-answer"
    FAILURE = "failure"


@frozen
class MXRecord:
    """One MX record; ``host`` is lower case without the final dot, or "." (null MX)."""

    preference: int
    host: str


@frozen
class MXAnswer:
    """The result of an MX question; ``records`` is empty unless ``status`` is OK."""

    status: LookupStatus
    records: tuple[MXRecord, ...] = ()
    detail: str = ""


@frozen
class AddressAnswer:
    """The result of the A and AAAA questions for a host: IPv4 addresses first."""

    status: LookupStatus
    addresses: tuple[str, ...] = ()
    detail: str = ""


@frozen
class _Result:
    """One rdtype's answer as the worker thread saw it."""

    status: LookupStatus
    records: tuple[Any, ...]
    ttl: float
    detail: str = ""


def _normalise(name: str) -> str:
    return name.strip().rstrip(".").lower()



def dnspython_resolver(
    nameservers: tuple[tuple[str, int], ...], timeout: float
) -> dns.resolver.Resolver:
    """A blocking dnspython resolver asking ``nameservers`` (host, port) pairs, or the
    system's (/etc/resolv.conf, read once) when there are none; ``timeout`` bounds
    each lookup.  Call it only from a thread, never on the reactor."""
    if nameservers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [host for host, _ in nameservers]
        resolver.nameserver_ports = {host: port for host, port in nameservers}
    else:
        resolver = dns.resolver.Resolver()
    resolver.timeout = timeout
    resolver.lifetime = timeout
    return resolver


class DNSResolver:
    """Asynchronous, caching A/AAAA/MX lookups on top of dnspython's blocking resolver.

    :param nameservers: ``(ip, port)`` pairs; empty means the system configuration.
    :param timeout: seconds for one whole question (all servers and retries).
    :param cache_ttl_max: upper bound on how long any answer is reused (0: no cache).
    :param clock: the time source for cache expiry.
    :param threadpool_reactor: a reactor whose thread pool runs the blocking queries.
    """

    negative_ttl = 60.0
    """How long NXDOMAIN and empty answers are reused."""

    failure_ttl = 5.0
    """How long a SERVFAIL or timeout is reused, so a burst to one broken domain makes
    one slow query instead of hundreds."""

    max_entries = 10000

    def __init__(
        self,
        nameservers: tuple[tuple[str, int], ...],
        timeout: float,
        cache_ttl_max: float,
        clock: IReactorTime,
        threadpool_reactor: IReactorThreads,
    ) -> None:
        resolver = dnspython_resolver(nameservers, timeout)
        resolver.cache = None  # ours is on the injected clock
        self._resolver = resolver
        self.timeout = timeout
        self.cache_ttl_max = cache_ttl_max
        self.clock = clock
        self._reactor = threadpool_reactor
        self._cache: dict[tuple[str, str], tuple[float, _Result]] = {}
        self._pending: dict[tuple[str, str], list[Deferred[_Result]]] = {}

    def mx(self, domain: str) -> Deferred[MXAnswer]:
        """The MX records of ``domain``, as an :obj:`MXAnswer`; never fails."""

        def done(result: _Result) -> MXAnswer:
            return MXAnswer(result.status, result.records, result.detail)

        return self._lookup(_normalise(domain), "MX").addCallback(done)

    def addresses(self, host: str) -> Deferred[AddressAnswer]:
        """The A then AAAA addresses of ``host``, as an :obj:`AddressAnswer`; never fails."""
        name = _normalise(host)
        d = gatherResults([self._lookup(name, "A"), self._lookup(name, "AAAA")])

        def combine(results: list[_Result]) -> AddressAnswer:
            found = tuple(a for r in results for a in r.records)
            statuses = {r.status for r in results}
            detail = "; ".join(r.detail for r in results if r.detail)
            if found:
                return AddressAnswer(LookupStatus.OK, found)
            if LookupStatus.FAILURE in statuses:
                return AddressAnswer(LookupStatus.FAILURE, (), detail)
            if LookupStatus.NXDOMAIN in statuses:
                return AddressAnswer(LookupStatus.NXDOMAIN, (), detail)
            return AddressAnswer(LookupStatus.NO_ANSWER, (), detail)

        return d.addCallback(combine)

    def _lookup(self, name: str, rdtype: str) -> Deferred[_Result]:
        key = (name, rdtype)
        now = self.clock.seconds()
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > now:
                return succeed(cached[1])
            del self._cache[key]
        waiter: Deferred[_Result] = Deferred()
        waiters = self._pending.get(key)
        if waiters is not None:
            # The same question is already in a thread: share its answer.
            waiters.append(waiter)
            return waiter
        self._pending[key] = [waiter]
        d = deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), self._query, name, rdtype
        )
        d.addErrback(
            lambda f: _Result(LookupStatus.FAILURE, (), 0.0, f.getErrorMessage())
        )
        d.addCallback(self._answered, key)
        return waiter

    def _answered(self, result: _Result, key: tuple[str, str]) -> None:
        self._store(key, result)
        for waiter in self._pending.pop(key, []):
            if not waiter.called:  # a caller may have cancelled
                waiter.callback(result)

    def _store(self, key: tuple[str, str], result: _Result) -> None:
        if result.status is LookupStatus.OK:
            ttl = result.ttl
        elif result.status is LookupStatus.FAILURE:
            ttl = self.failure_ttl
        else:
            ttl = self.negative_ttl
        ttl = min(ttl, self.cache_ttl_max)
        if ttl <= 0:
            return
        now = self.clock.seconds()
        if len(self._cache) >= self.max_entries:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            while len(self._cache) >= self.max_entries:
                del self._cache[next(iter(self._cache))]  # oldest insertion
        self._cache[key] = (now + ttl, result)

    def _query(self, name: str, rdtype: str) -> _Result:
        """Ask dnspython; runs in a worker thread, never on the reactor."""
        try:
            answer = self._resolver.resolve(
                name, rdtype, search=False, lifetime=self.timeout
            )
        except dns.resolver.NXDOMAIN:
            return _Result(LookupStatus.NXDOMAIN, (), 0.0, f"{name}: no such domain")
        except dns.resolver.NoAnswer:
            return _Result(LookupStatus.NO_ANSWER, (), 0.0, f"{name}: no {rdtype} records")
        except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel) as e:
            return _Result(LookupStatus.NXDOMAIN, (), 0.0, f"{name}: invalid name ({e})")
        except dns.exception.Timeout:
            return _Result(LookupStatus.FAILURE, (), 0.0, f"{name}: {rdtype} lookup timed out")
        except dns.exception.DNSException as e:
            return _Result(LookupStatus.FAILURE, (), 0.0, f"{name}: {rdtype} lookup: {e}")
        ttl = float(answer.chaining_result.minimum_ttl)
        records: tuple[Any, ...]
        if rdtype == "MX":
            records = tuple(
                MXRecord(
                    rr.preference,
                    NULL_MX
                    if rr.exchange == dns.name.root
                    else rr.exchange.to_text(omit_final_dot=True).lower(),
                )
                for rr in answer
            )
        else:
            records = tuple(rr.address for rr in answer)
        return _Result(LookupStatus.OK, records, ttl)


@frozen
class RouteError:
    """Why there is no route; ``permanent`` means bounce, otherwise defer."""

    permanent: bool
    reason: str
    enhanced: str


@frozen
class Route:
    """Where mail for ``domain`` goes: ``hops`` in order, or an ``error``."""

    domain: str
    hops: tuple[Hop, ...]
    error: RouteError | None


def _literal(domain: str) -> str | None:
    """The IP address of an address literal (RFC 5321 4.1.3), or None if it is invalid."""
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
        want: int | None = 6
    else:
        want = 4
    try:
        ip = ipaddress.ip_address(inner)
    except ValueError:
        return None
    return str(ip) if ip.version == want else None


def _usable(address: str) -> bool:
    try:
        return not ipaddress.ip_address(address).is_unspecified
    except ValueError:
        return False


@implementer(IRouter)
class MXRouter:
    """The default route: MX records in preference order, ties shuffled, else the
    domain's own A/AAAA (implicit MX); address literals route to themselves.

    :param resolver: the :obj:`DNSResolver` to ask.
    :param port: the SMTP port of every hop (``[delivery] mx_port``).
    :param rng: shuffles MX hosts of equal preference (seed it in tests).
    :param clock: runs the overall deadline; the resolver's clock by default.
    :param deadline: seconds after which a route still waiting for DNS (for instance
        behind a saturated thread pool) is given up as a temporary failure.
    :param max_hosts: MX hosts considered at most, against absurdly long MX sets.
    """

    def __init__(
        self,
        resolver: DNSResolver,
        port: int = 25,
        rng: random.Random | None = None,
        clock: IReactorTime | None = None,
        deadline: float = 60.0,
        max_hosts: int = 10,
    ) -> None:
        self.resolver = resolver
        self.port = port
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock if clock is not None else resolver.clock
        self.deadline = deadline
        self.max_hosts = max_hosts

    def route(self, domain: str) -> Deferred[Route]:
        """See :obj:`IRouter.route`."""
        name = _normalise(domain)
        d = Deferred.fromCoroutine(self._route(name))
        d.addTimeout(self.deadline, self._clock)

        def failed(reason: Any) -> Route:
            # Anything unexpected must defer the mail, never bounce it.
            log.failure("routing {domain} failed", reason, domain=name)
            return self._error(name, False, f"routing failed: {reason.getErrorMessage()}",
                               "4.4.3")

        return d.addErrback(failed)

    def _error(self, domain: str, permanent: bool, reason: str, enhanced: str) -> Route:
        return Route(domain, (), RouteError(permanent, reason, enhanced))

    async def _route(self, domain: str) -> Route:
        if domain.startswith("[") and domain.endswith("]"):
            address = _literal(domain)
            if address is None:
                return self._error(domain, True, f"invalid address literal {domain}", "5.1.2")
            return Route(domain, (Hop(address, address, self.port, 0),), None)
        if not domain:
            return self._error(domain, True, "empty domain", "5.1.2")

        mx = await self.resolver.mx(domain)
        if mx.status is LookupStatus.NXDOMAIN:
            return self._error(domain, True, mx.detail or f"{domain}: no such domain", "5.1.2")
        if mx.status is LookupStatus.FAILURE:
            return self._error(domain, False, mx.detail or "DNS failure", "4.4.3")
        if mx.status is LookupStatus.NO_ANSWER:
            candidates = [MXRecord(0, domain)]  # implicit MX, RFC 5321 5.1
        else:
            real = [r for r in mx.records if r.host != NULL_MX]
            if not real:
                return self._error(
                    domain, True, f"{domain} accepts no mail (null MX)", "5.1.10"
                )
            candidates = self._ordered(real)[: self.max_hosts]

        answers = await gatherResults([self.resolver.addresses(r.host) for r in candidates])
        hops: list[Hop] = []
        seen: set[str] = set()
        for record, answer in zip(candidates, answers):
            for address in answer.addresses:
                if address in seen or not _usable(address):
                    continue
                seen.add(address)
                hops.append(Hop(record.host, address, self.port, record.preference))
        if hops:
            return Route(domain, tuple(hops), None)
        failures = [a.detail for a in answers if a.status is LookupStatus.FAILURE]
        if failures:
            return self._error(domain, False, "; ".join(failures), "4.4.3")
        return self._error(domain, False, f"{domain}: no usable address for any MX", "4.4.4")

    def _ordered(self, records: list[MXRecord]) -> list[MXRecord]:
        """Preference order; equal preferences in random order (RFC 5321 5.1)."""
        groups: dict[int, list[MXRecord]] = {}
        for r in records:
            groups.setdefault(r.preference, []).append(r)
        out: list[MXRecord] = []
        for preference in sorted(groups):
            group = sorted(set(groups[preference]), key=lambda r: r.host)
            self._rng.shuffle(group)
            out.extend(group)
        return out


"""Where webhooks may not go: the address check (pure) and the connection guard that
applies it to the address actually connected to.

A webhook URL is the tenant's, so the relay must not become a way into its own
network: a destination address that is loopback, private, link-local, shared
(carrier-grade NAT) or otherwise not on the public internet is refused unless
``[webhooks] allow_private = true``.  Cloud metadata services, unspecified, multicast
and reserved addresses are refused even then.  IPv4 addresses inside IPv6 ones
(v4-mapped, v4-compatible, NAT64, 6to4) are checked as the IPv4 address they carry.

:class:`GuardedEndpointFactory` is the HTTP client's endpoint factory: it resolves the
host name itself, checks every address, and connects to an allowed address by number,
so what was checked is what is connected to (a name cannot resolve to a public address
for the check and to a private one for the connection).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from attrs import define, field
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Refused whatever ``allow_private`` says: (network, reason).
_NEVER: tuple[tuple[str, str], ...] = (
    ("169.254.169.254/32", "a cloud metadata address"),
    ("169.254.170.2/32", "a cloud metadata address"),
    ("100.100.100.200/32", "a cloud metadata address"),
    ("fd00:ec2::254/128", "a cloud metadata address"),
    ("0.0.0.0/8", "an unspecified address"),
    ("::/128", "an unspecified address"),
    ("224.0.0.0/4", "a multicast address"),
    ("ff00::/8", "a multicast address"),
    ("240.0.0.0/4", "a reserved address"),
)
#: Refused unless ``allow_private``: (network, reason).
_PRIVATE: tuple[tuple[str, str], ...] = (
    ("127.0.0.0/8", "a loopback address"),
    ("::1/128", "a loopback address"),
    ("10.0.0.0/8", "a private address"),
    ("172.16.0.0/12", "a private address"),
    ("192.168.0.0/16", "a private address"),
    ("fc00::/7", "a private address"),
    ("fec0::/10", "a private address"),
    ("169.254.0.0/16", "a link-local address"),
    ("fe80::/10", "a link-local address"),
    ("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
    ("192.0.0.0/24", "a special-purpose address"),
    ("198.18.0.0/15", "a benchmarking address"),
    ("192.0.2.0/24", "a documentation address"),
    ("198.51.100.0/24", "a documentation address"),
    ("203.0.113.0/24", "a documentation address"),
    ("2001:db8::/32", "a documentation address"),
)

_NEVER_NETS = tuple((ipaddress.ip_network(n), r) for n, r in _NEVER)
_PRIVATE_NETS = tuple((ipaddress.ip_network(n), r) for n, r in _PRIVATE)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.ip_network("::/96")


class AddressRefused(Exception):  # noqa: N818
    """No address of a webhook's host may be connected to."""


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or (address in _V4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal(address: str | IPAddress, allow_private: bool = False) -> str | None:
    """Why a webhook must not be sent to ``address`` (a reason such as ``"a private
    address"``), or None when it may.  A text that is no IP address is refused."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0] if isinstance(address, str) else address)
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            reason = refusal(inner, allow_private)
            return None if reason is None else f"{reason} (inside {ip})"
    for net, reason in _NEVER_NETS:
        if ip.version == net.version and ip in net:
            return reason
    if not allow_private:
        for net, reason in _PRIVATE_NETS:
            if ip.version == net.version and ip in net:
                return reason
    return None


# -- the guard ---------------------------------------------------------------------


@implementer(IResolutionReceiver)
class _Collector:
    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.done: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolution: IHostResolution) -> None:  # noqa: N802
        pass

    def addressResolved(self, address: Any) -> None:  # noqa: N802
        if isinstance(address, IPv4Address | IPv6Address):
            self.addresses.append(address.host)

    def resolutionComplete(self) -> None:  # noqa: N802
        self.done.callback(self.addresses)


def _literal(host: str) -> str | None:
    text = host.removeprefix("[").removesuffix("]")
    try:
        return str(ipaddress.ip_address(text.split("%", 1)[0]))
    except ValueError:
        return None


@implementer(IStreamClientEndpoint)
@define
class GuardedEndpoint:
    """Resolves ``host`` and connects to its allowed addresses (by number) in turn until
    one answers, or fails with :class:`AddressRefused` without opening any connection
    when none is allowed."""

    reactor: Any
    resolver: IHostnameResolver
    host: str
    port: int
    allow_private: bool
    timeout: float
    tls: Any = None  # an IOpenSSLClientConnectionCreator for https

    def connect(self, factory: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        literal = _literal(self.host)
        if literal is not None:
            addresses = [literal]
        else:
            collector = _Collector()
            self.resolver.resolveHostName(
                collector, self.host, self.port, addressTypes=[IPv4Address, IPv6Address]
            )
            addresses = await collector.done
            if not addresses:
                raise DNSLookupError(self.host)
        refused = []
        allowed = []
        for address in addresses:
            reason = refusal(address, self.allow_private)
            if reason is None:
                allowed.append(address)
            else:
                refused.append(f"{address} is {reason}")
        if not allowed:
            raise AddressRefused(f"{self.host}: " + "; ".join(refused))
        # Each allowed address in turn, until one connects.
        for address in allowed[:-1]:
            try:
                return await self._endpoint(address).connect(factory)
            except ConnectError:
                continue
        return await self._endpoint(allowed[-1]).connect(factory)

    def _endpoint(self, address: str) -> Any:
        endpoint: Any
        if ":" in address:
            endpoint = TCP6ClientEndpoint(self.reactor, address, self.port, self.timeout)
        else:
            endpoint = TCP4ClientEndpoint(self.reactor, address, self.port, self.timeout)
        if self.tls is not None:
            endpoint = wrapClientTLS(self.tls, endpoint)
        return endpoint


@implementer(IAgentEndpointFactory)
@define
class GuardedEndpointFactory:
    """The endpoints of a twisted.web ``Agent`` that may only reach allowed addresses
    (``Agent.usingEndpointFactory``).  ``https`` URLs are verified against the system's
    trust roots (or ``tls_policy``) for the URL's host name."""

    reactor: Any
    allow_private: bool = False
    connect_timeout: float = 10.0
    resolver: IHostnameResolver | None = None
    tls_policy: IPolicyForHTTPS = field(factory=BrowserLikePolicyForHTTPS)

    def endpointForURI(self, uri: URI) -> GuardedEndpoint:  # noqa: N802
        host = uri.host.decode("ascii")
        tls = None
        if uri.scheme == b"https":
            tls = self.tls_policy.creatorForNetloc(uri.host, uri.port)
        resolver = self.resolver if self.resolver is not None else self.reactor.nameResolver
        return GuardedEndpoint(
            self.reactor, resolver, host, uri.port, self.allow_private, self.connect_timeout, tls
        )

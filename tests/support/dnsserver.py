"""An in-process authoritative DNS server for tests, built on twisted.names.

``start_dns(records)`` serves a dict of names on 127.0.0.1 (UDP and TCP on one free
port)::

    {"example.org": {"MX": [(10, "mx1.example.org")], "TTL": 300},
     "mx1.example.org": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
     "nomail.example": {"MX": [(0, ".")]},          # null MX (RFC 7505)
     "broken.example": {"SERVFAIL": True},
     "s1._domainkey.example.org": {"TXT": ["v=DKIM1; k=ed25519; p=..."]}}

A TXT value is a string (split into 255-byte character-strings when longer) or a
list of strings (published as those character-strings).  ``records`` may be changed
while the server runs (tests publish a record, then look again).

A name not in the dict is NXDOMAIN; a known name without the asked type has an empty
answer (dnspython's NoAnswer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.error import CannotListenError
from twisted.names import common, dns, server
from twisted.python.failure import Failure

DEFAULT_TTL = 300


class _ServerFailureError(Exception):
    """Raised for names marked SERVFAIL."""


class _DictResolver(common.ResolverBase):
    """Answers from a dict of name -> {"MX"|"A"|"AAAA"|"TTL"|"SERVFAIL": ...}."""

    def __init__(self, records: dict[str, dict[str, Any]]) -> None:
        common.ResolverBase.__init__(self)
        self.records = records

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred[Any]:
        key = name.decode("ascii").lower().rstrip(".")
        entry = {k.lower().rstrip("."): v for k, v in self.records.items()}.get(key)
        if entry is None:
            return defer.fail(dns.AuthoritativeDomainError(key))
        if entry.get("SERVFAIL"):
            return defer.fail(_ServerFailureError(key))
        ttl = entry.get("TTL", DEFAULT_TTL)
        answers = []
        if type == dns.MX:
            for preference, host in entry.get("MX", []):
                exchange = b"" if host == "." else host.encode("ascii")
                payload: Any = dns.Record_MX(preference, exchange, ttl=ttl)
                answers.append(self._rr(name, dns.MX, payload, ttl))
        elif type == dns.A:
            for address in entry.get("A", []):
                answers.append(self._rr(name, dns.A, dns.Record_A(address, ttl=ttl), ttl))
        elif type == dns.AAAA:
            for address in entry.get("AAAA", []):
                answers.append(self._rr(name, dns.AAAA, dns.Record_AAAA(address, ttl=ttl), ttl))
        elif type == dns.TXT:
            for text in entry.get("TXT", []):
                if isinstance(text, str):
                    data = text.encode("utf-8")
                    strings = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
                else:
                    strings = [t.encode("utf-8") for t in text]
                answers.append(self._rr(name, dns.TXT, dns.Record_TXT(*strings, ttl=ttl), ttl))
        return defer.succeed((answers, [], []))

    @staticmethod
    def _rr(name: bytes, type: int, payload: Any, ttl: int) -> dns.RRHeader:
        return dns.RRHeader(name, type, dns.IN, ttl, payload, auth=True)


class _Factory(server.DNSServerFactory):
    """Answers SERVFAIL for marked names without logging an error (the stock factory
    logs every non-NXDOMAIN failure, which trial would count as a test error)."""

    def gotResolverError(self, failure: Failure, protocol: Any, message: Any,
                         address: Any) -> None:
        if failure.check(_ServerFailureError):
            response = self._responseFromMessage(message=message, rCode=dns.ESERVER)
            self.sendReply(protocol, response, address)
            return
        server.DNSServerFactory.gotResolverError(self, failure, protocol, message, address)


def start_dns(
    records: dict[str, dict[str, Any]],
) -> tuple[int, Callable[[], defer.Deferred[Any]]]:
    """Serve ``records``; return the port and an idempotent ``stop()`` -> Deferred."""
    factory = _Factory(authorities=[_DictResolver(records)])
    for _ in range(20):
        # A fresh protocol each try: a datagram protocol binds to one transport only.
        protocol = dns.DNSDatagramProtocol(factory)
        udp = reactor.listenUDP(0, protocol, interface="127.0.0.1")  # type: ignore[attr-defined]
        port = udp.getHost().port
        try:
            tcp = reactor.listenTCP(port, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        except CannotListenError:
            udp.stopListening()  # that TCP port is taken: try another UDP port
            continue
        break
    else:
        raise RuntimeError("no free port for UDP and TCP together")
    stopped: list[defer.Deferred[Any]] = []

    def stop() -> defer.Deferred[Any]:
        if not stopped:
            stopped.append(
                defer.gatherResults(
                    [defer.maybeDeferred(udp.stopListening),
                     defer.maybeDeferred(tcp.stopListening)]
                )
            )
        result: defer.Deferred[Any] = defer.Deferred()

        def done(outcome: object) -> object:
            result.callback(None)
            return outcome

        stopped[0].addBoth(done)
        return result

    return port, stop

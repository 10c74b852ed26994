"""Webhook test helpers: a receiver on a loopback port that records what it is sent and
answers as the test scripts it, and a host-name resolver answered from a table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHostnameResolver, IResolutionReceiver
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer


@implementer(IHostnameResolver)
class StaticResolver:
    """Answers every name from a table (no network); records the names asked for."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    def resolveHostName(  # noqa: N802
        self,
        resolutionReceiver: IResolutionReceiver,  # noqa: N803
        hostName: str,  # noqa: N803
        portNumber: int = 0,  # noqa: N803
        addressTypes: Any = None,  # noqa: N803
        transportSemantics: str = "TCP",  # noqa: N803
    ) -> IResolutionReceiver:
        self.asked.append(hostName)
        resolutionReceiver.resolutionBegan(None)  # type: ignore[arg-type]
        for address in self.table.get(hostName, []):
            kind = IPv6Address if ":" in address else IPv4Address
            resolutionReceiver.addressResolved(kind("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolutionReceiver


@define
class Received:
    """One POST as the receiver saw it."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float


#: What the receiver answers: (status, extra headers), or None to never answer.
Answer = tuple[int, dict[str, str]] | None


@define
class Receiver:
    """A webhook receiver: ``answer(received)`` decides each answer (200 by default)."""

    clock: Any
    answer: Callable[[Received], Answer] = lambda r: (200, {})
    #: Where it listens, once the test has it listening.
    url: str = ""
    received: list[Received] = field(factory=list)
    hanging: list[Request] = field(factory=list)
    _waiters: list[tuple[int, Deferred[None]]] = field(factory=list)

    def site(self) -> Site:
        receiver = self

        class _Hook(Resource):
            isLeaf = True

            def render_POST(self, request: Request) -> Any:  # noqa: N802
                assert request.content is not None
                headers = {
                    k.decode().lower(): v[0].decode()
                    for k, v in request.requestHeaders.getAllRawHeaders()
                }
                got = Received(
                    request.path.decode(), headers, request.content.read(), receiver.clock.seconds()
                )
                receiver.received.append(got)
                receiver._wake()
                answer = receiver.answer(got)
                if answer is None:
                    receiver.hanging.append(request)
                    return NOT_DONE_YET
                status, extra = answer
                request.setResponseCode(status)
                for name, value in extra.items():
                    request.setHeader(name, value)
                return b"ok"

        return Site(_Hook())

    def wait_for(self, count: int) -> Deferred[None]:
        """Fires once ``count`` POSTs have arrived."""
        d: Deferred[None] = Deferred()
        self._waiters.append((count, d))
        self._wake()
        return d

    def _wake(self) -> None:
        for entry in list(self._waiters):
            if len(self.received) >= entry[0]:
                self._waiters.remove(entry)
                entry[1].callback(None)

    def finish_hanging(self) -> None:
        """Close the connections of requests never answered (at the test's end)."""
        for request in self.hanging:
            if request.channel is not None and request.channel.transport is not None:
                request.channel.transport.abortConnection()
        self.hanging.clear()

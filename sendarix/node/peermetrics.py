"""One ``/metrics`` for a node of several worker processes.

The workers share the API port, so a scrape reaches one of them at random; each
counts only what it handled.  So every worker also serves its own exposition on a
UNIX socket, ``DIR/wI.sock`` in a directory the supervisor made for them (mode 0700:
only the node's user reaches it; never on TCP), and the worker answering a scrape
reads the others' there, at once and for at most ``timeout`` seconds each, and
merges them with its own (:func:`sendarix.events.metricsmerge.merge_expositions`).
A worker that does not answer in time (restarting, stuck) is left out: the scrape
says so (``sendarix_workers_scraped``) and the log names it, but never fails.

The exchange is a minimal protocol, not HTTP: the reader sends nothing, the worker
writes its exposition as one length-prefixed string (``Int32StringReceiver``) and
closes.  Both ends are this program, on one machine, for one reading; HTTP would add
a parser, headers and a connection pool for nothing, and the length prefix tells a
whole exposition from one cut short by a worker dying as it writes (the end of a
close-delimited body would not).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from attrs import define
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from sendarix.events.metrics import GAUGE_RULES
from sendarix.events.metricsmerge import GaugeRule, merge_expositions, parse_exposition

if TYPE_CHECKING:
    from sendarix.node.service import NodeService

log = Logger()

__all__ = [
    "PEER_TIMEOUT", "ExpositionServer", "NodeMetrics", "WorkerPeers", "fetch_exposition",
    "serve_worker_metrics",
]

#: Seconds a scrape waits for each other worker's exposition.
PEER_TIMEOUT = 2.0

#: The largest exposition read from a worker (far above any real one).
MAX_EXPOSITION = 64 * 1024 * 1024


@define(frozen=True)
class WorkerPeers:
    """Where the workers of one node serve their expositions: worker ``index`` of
    ``count``, node ``node`` (the name without ``-wI``), sockets in ``directory``."""

    directory: str
    index: int
    count: int
    node: str

    def path(self, index: int) -> str:
        """The socket of worker ``index``."""
        return os.path.join(self.directory, f"w{index}.sock")


class _Sender(Int32StringReceiver):
    """Writes the registry's exposition to whoever connects, then closes."""

    transport: Any
    factory: Any

    def connectionMade(self) -> None:  # noqa: N802 - Twisted's name
        self.sendString(generate_latest(self.factory.registry))
        self.transport.loseConnection()

    def stringReceived(self, string: bytes) -> None:  # noqa: N802
        """The reader has nothing to say; anything it sends is ignored."""


class _Reader(Int32StringReceiver):
    """Reads one exposition; ``done`` fires with it, or fails when the connection
    ends first (or is aborted by a cancel)."""

    MAX_LENGTH = MAX_EXPOSITION
    transport: Any

    def __init__(self) -> None:
        self.done: Deferred[bytes] = Deferred(lambda _: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def stringReceived(self, string: bytes) -> None:  # noqa: N802
        if not self.done.called:
            self.done.callback(string)
        self.transport.loseConnection()

    def lengthLimitExceeded(self, length: int) -> None:  # noqa: N802
        if not self.done.called:
            self.done.errback(ValueError(f"an exposition of {length} bytes is too long"))
        self._abort()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        if not self.done.called:
            self.done.errback(reason)


def fetch_exposition(reactor: Any, path: str, timeout: float = PEER_TIMEOUT) -> Deferred[bytes]:
    """The exposition served on the UNIX socket ``path``; fails after ``timeout``
    seconds (TimeoutError), or when nothing listens there."""

    async def fetch() -> bytes:
        reader = _Reader()
        # Connecting to a local socket succeeds or fails at once; the timeout below
        # bounds the whole exchange.
        endpoint = endpoints.UNIXClientEndpoint(reactor, path, timeout=max(1, int(timeout)))
        await endpoints.connectProtocol(endpoint, reader)
        return await reader.done

    return Deferred.fromCoroutine(fetch()).addTimeout(timeout, reactor)


class ExpositionServer(Service):
    """Serves ``registry``'s exposition on the UNIX socket ``path`` (mode 0600)."""

    name = "worker-metrics"

    def __init__(self, reactor: Any, path: str, registry: CollectorRegistry) -> None:
        self.reactor = reactor
        self.path = path
        self.registry = registry
        self._port: Deferred[IListeningPort] | None = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        # A worker that died left its socket behind; the one started in its place
        # takes the name over.
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except OSError:
            pass
        factory = Factory.forProtocol(_Sender)
        factory.registry = self.registry  # type: ignore[attr-defined]
        factory.noisy = False
        endpoint = endpoints.UNIXServerEndpoint(self.reactor, self.path, mode=0o600)
        self._port = endpoint.listen(factory)
        self._port.addErrback(
            lambda f: log.failure("worker metrics not served on {path}", f, path=self.path)
        )

    async def _stop(self) -> None:
        port = await self._port if self._port is not None else None
        if port is not None:
            await maybeDeferred(port.stopListening)

    def stopService(self) -> Deferred[None]:  # noqa: N802
        super().stopService()
        return Deferred.fromCoroutine(self._stop())


@define(eq=False)
class NodeMetrics:
    """Renders the node's metrics: this worker's registry and its peers'."""

    reactor: Any
    registry: CollectorRegistry
    peers: WorkerPeers
    rules: Mapping[str, GaugeRule] = GAUGE_RULES
    #: True where the stores share limits and routing state (see GaugeRule.PARTS).
    shared_state: bool = False
    timeout: float = PEER_TIMEOUT

    def render(self) -> Deferred[bytes]:
        """The node's exposition; never fails (a worker not read is left out)."""
        return Deferred.fromCoroutine(self._render())

    async def _render(self) -> bytes:
        own = generate_latest(self.registry)
        others = [i for i in range(1, self.peers.count + 1) if i != self.peers.index]
        results = await DeferredList(
            [fetch_exposition(self.reactor, self.peers.path(i), self.timeout) for i in others],
            consumeErrors=True,
        )
        readings: dict[int, list[Metric] | None] = {}
        for index, (ok, result) in zip(others, results, strict=True):
            readings[index] = self._parsed(index, ok, result)
        try:
            readings[self.peers.index] = parse_exposition(own.decode())
            ordered = [readings.get(i) for i in range(1, self.peers.count + 1)]
            return merge_expositions(ordered, self.peers.node, self.rules, self.shared_state)
        except Exception:
            # Never fail a scrape: this worker's own figures are better than none.
            log.failure("the workers' metrics could not be merged; serving this worker's")
            return own

    def _parsed(self, index: int, ok: bool, result: Any) -> list[Metric] | None:
        why: str
        if ok:
            try:
                return parse_exposition(result.decode())
            except (ValueError, UnicodeDecodeError) as e:
                why = str(e)
        else:
            why = result.getErrorMessage() or result.type.__name__
        log.warn("metrics: worker {index} did not answer ({why}); its figures are left "
                 "out of this scrape", index=index, why=why)
        return None


def serve_worker_metrics(node: NodeService, peers: WorkerPeers, reactor: Any) -> None:
    """Make worker ``peers.index`` of ``node`` serve its exposition to the others and
    answer ``/metrics`` for the whole node."""
    ExpositionServer(reactor, peers.path(peers.index), node.metrics.registry).setServiceParent(
        node
    )
    if node.metrics_resource is not None:
        node.metrics_resource.gather = NodeMetrics(
            reactor, node.metrics.registry, peers,
            shared_state=bool(node.stores.backend.shares_state),
        ).render

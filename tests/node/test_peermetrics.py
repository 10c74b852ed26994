"""The workers' metrics over their UNIX sockets: each serves its own exposition, the
one a scrape reaches reads the others' and merges them, and one that does not answer
is left out without failing the scrape."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile

import treq
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

from sendarix.control.api.operations import MetricsResource
from sendarix.events.metrics import Metrics
from sendarix.node.peermetrics import (
    ExpositionServer,
    NodeMetrics,
    WorkerPeers,
    fetch_exposition,
)


def registry(accepted: int) -> CollectorRegistry:
    r = CollectorRegistry()
    Counter("sendarix_messages_accepted", "Accepted", ["tenant"], registry=r).labels(
        "default").inc(accepted)
    return r


def values(text: bytes) -> dict[str, float]:
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


class PeerMetricsTests(TestCase):
    def setUp(self) -> None:
        # The test's own folder may be too deep for a socket path (108 bytes).
        self.dir = tempfile.mkdtemp(prefix="sendarix-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.peers = WorkerPeers(self.dir, 1, 3, "box")

    async def serve(self, index: int, accepted: int) -> ExpositionServer:
        server = ExpositionServer(reactor, self.peers.path(index), registry(accepted))
        server.startService()
        self.addCleanup(server.stopService)
        return server

    async def test_serves_its_exposition(self) -> None:
        """A plain socket reads one length-prefixed exposition, then the end."""
        await self.serve(2, 5)
        self.assertEqual(os.stat(self.peers.path(2)).st_mode & 0o777, 0o600)
        data = await deferToThread(read_socket, self.peers.path(2))
        (length,) = struct.unpack("!I", data[:4])
        self.assertEqual(length, len(data) - 4)
        self.assertEqual(values(data[4:])["sendarix_messages_accepted_total"], 5.0)
        fetched = await fetch_exposition(reactor, self.peers.path(2))
        self.assertEqual(fetched, data[4:])

    async def test_a_stale_socket_is_taken_over(self) -> None:
        """A worker started in place of a dead one listens on its socket again."""
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.peers.path(2))
        stale.close()  # the file stays, as a killed worker leaves it
        await self.serve(2, 1)
        self.assertEqual(values(await fetch_exposition(reactor, self.peers.path(2)))[
            "sendarix_messages_accepted_total"], 1.0)

    async def test_nobody_there(self) -> None:
        with self.assertRaises(Exception):  # noqa: B017 - refused or not found
            await fetch_exposition(reactor, self.peers.path(3), timeout=1.0)

    async def test_a_silent_peer_times_out(self) -> None:
        """A peer that accepts and never writes costs the timeout, no more."""
        port = reactor.listenUNIX(self.peers.path(3), Factory.forProtocol(Protocol))
        self.addCleanup(port.stopListening)
        start = reactor.seconds()
        with self.assertRaises(TimeoutError):
            await fetch_exposition(reactor, self.peers.path(3), timeout=0.3)
        self.assertLess(reactor.seconds() - start, 2.0)

    async def test_the_node_from_its_workers(self) -> None:
        """Worker 1 of 3 adds its own figures to worker 2's; worker 3 does not answer
        and the scrape says it holds two of three."""
        await self.serve(2, 5)
        port = reactor.listenUNIX(self.peers.path(3), Factory.forProtocol(Protocol))
        self.addCleanup(port.stopListening)
        merged = await NodeMetrics(reactor, registry(2), self.peers, timeout=0.3).render()
        got = values(merged)
        self.assertEqual(got["sendarix_messages_accepted_total"], 7.0)
        self.assertEqual(got["sendarix_workers"], 3.0)
        self.assertEqual(got["sendarix_workers_scraped"], 2.0)

    def serve_held(
        self, resource: MetricsResource
    ) -> tuple[IListeningPort, list[Deferred[bytes]]]:
        """Serve ``resource`` on a loopback port, its gathering held: each scrape's
        Deferred is appended to the list, for the test to fire."""
        gathered: list[Deferred[bytes]] = []

        def gather() -> Deferred[bytes]:
            gathered.append(Deferred())
            return gathered[-1]

        resource.gather = gather
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port, gathered

    async def test_the_resource_serves_the_gathered_exposition(self) -> None:
        metrics = Metrics(node="box-w1")
        resource = MetricsResource(metrics)
        port, gathered = self.serve_held(resource)
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = treq.get(f"http://127.0.0.1:{port.getHost().port}/", pool=pool)
        while not gathered:
            await pause(0.01)
        gathered[0].callback(b"sendarix_workers 2.0\n")
        answer = await response
        self.assertEqual(answer.code, 200)
        self.assertEqual(await answer.content(), b"sendarix_workers 2.0\n")

    async def test_a_scraper_that_hangs_up_is_not_answered(self) -> None:
        """A scraper that hangs up before the node's figures are gathered: the
        gathered exposition is dropped quietly, not written to a closed request."""
        resource = MetricsResource(Metrics(node="box-w1"))
        port, gathered = self.serve_held(resource)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        client.sendall(b"GET / HTTP/1.1\r\nHost: box\r\n\r\n")
        while not gathered:
            await pause(0.01)
        client.close()
        await pause(0.2)  # the server sees the connection end
        gathered[0].callback(b"sendarix_workers 2.0\n")
        # Nothing failed in the answer (a finish after the hang-up would raise).
        self.assertIsNone(self.successResultOf(gathered[0]))


def read_socket(path: str) -> bytes:
    """Everything a UNIX socket sends, read with blocking calls (in a thread)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def pause(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)

"""The supervisor's listening sockets, inherited by the workers: the descriptors named
in the environment, adopting one, the single wake-up per connection, and refusing a
port that is taken before any worker starts."""

from __future__ import annotations

import json
import os
import select
import socket
import sys
from io import StringIO
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sendarix.node.sharedports import (
    INHERITED_ENV,
    ExclusivePort,
    inheritance,
    inherited_listeners,
    listen_shared,
    open_listening_socket,
    shareable,
)
from sendarix.node.workers import SUPERVISOR_ENV, ParentWatch, WorkerPool, supervisor_pid
from tests.support.relayproc import free_port

#: epoll's flag for a waiter woken alone (include/uapi/linux/eventpoll.h).
EPOLLEXCLUSIVE = 1 << 28


class NamingTests(SynchronousTestCase):
    """What the supervisor writes into a worker's environment, and what a worker
    makes of it."""

    def test_descriptors_numbered_from_three(self) -> None:
        self.assertEqual(inheritance(["tcp:25", "tcp:587", "tcp:8025"]),
                         {"tcp:25": 3, "tcp:587": 4, "tcp:8025": 5})
        self.assertEqual(inheritance([]), {})

    def test_read_back(self) -> None:
        named = {"tcp:2525:interface=127.0.0.1": 3, "ssl:465:privateKey=k.pem": 4}
        self.assertEqual(inherited_listeners({INHERITED_ENV: json.dumps(named)}), named)

    def test_nothing_or_garbage_is_no_listener(self) -> None:
        self.assertEqual(inherited_listeners({}), {})
        self.assertEqual(inherited_listeners({INHERITED_ENV: ""}), {})
        self.assertEqual(inherited_listeners({INHERITED_ENV: "3,4"}), {})
        self.assertEqual(inherited_listeners({INHERITED_ENV: "[3, 4]"}), {})
        # Only whole, non-negative descriptor numbers are taken.
        self.assertEqual(
            inherited_listeners({INHERITED_ENV: '{"a": 3, "b": "4", "c": -1, "d": 2.5}'}),
            {"a": 3},
        )

    def test_supervisor_pid(self) -> None:
        self.assertEqual(supervisor_pid({SUPERVISOR_ENV: "4242"}), 4242)
        self.assertIsNone(supervisor_pid({}))
        self.assertIsNone(supervisor_pid({SUPERVISOR_ENV: "-1"}))

    def test_a_supervisor_gone_before_the_watch_started(self) -> None:
        """The parent seen at the worker's start is already init: the PID the
        supervisor gave still tells that it is gone, at the first check."""
        from twisted.internet.task import Clock

        clock = Clock()
        stops: list[float] = []
        watch = ParentWatch(clock, lambda: stops.append(clock.seconds()), interval=1.0,
                            parent=lambda: 1, supervisor=4242)
        watch.startService()
        clock.advance(1)
        self.assertEqual(stops, [1.0])
        watch.stopService()

    def test_shareable(self) -> None:
        self.assertTrue(shareable(reactor, "tcp:2525:interface=127.0.0.1"))
        self.assertTrue(shareable(reactor, "tcp6:2525:interface=\\:\\:1"))
        self.assertFalse(shareable(reactor, "unix:/tmp/sendarix.sock"))
        self.assertFalse(shareable(reactor, "no-such-kind:1"))

    def test_open_refuses_what_is_not_tcp(self) -> None:
        self.assertRaises(ValueError, open_listening_socket, reactor, "unix:/tmp/x.sock")

    def test_open_refuses_a_taken_port(self) -> None:
        sock = open_listening_socket(reactor, "tcp:0:interface=127.0.0.1")
        self.addCleanup(sock.close)
        port = sock.getsockname()[1]
        self.assertRaises(OSError, open_listening_socket, reactor,
                          f"tcp:{port}:interface=127.0.0.1")

    def test_children_get_the_descriptors(self) -> None:
        """The pool opens each TCP listener once and gives every child the sockets at
        the numbers its environment names; a UNIX listener is left to the children."""
        from twisted.internet.task import Clock

        spawned: list[dict[str, Any]] = []

        class Spawner(Clock):
            def spawnProcess(self, protocol: Any, executable: str, args: Any,  # noqa: N802
                             env: Any, childFDs: Any) -> Any:  # noqa: N803
                spawned.append({"env": env, "fds": childFDs})

                class Transport:
                    pid = 1000 + len(spawned)
                return Transport()

        smtp, api = "tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.2"
        pool = WorkerPool(Spawner(), 2, [], listen=[smtp, "unix:/tmp/x.sock", api])
        pool.privilegedStartService()
        pool.startService()
        self.addCleanup(pool._remove_peers)
        self.assertEqual(list(pool.listeners), [smtp, api])
        first, second = pool.listeners[smtp], pool.listeners[api]
        self.assertEqual(first.getsockname()[0], "127.0.0.1")
        self.assertEqual(second.getsockname()[0], "127.0.0.2")
        self.assertEqual(len(spawned), 2)
        for child in spawned:
            self.assertEqual(json.loads(child["env"][INHERITED_ENV]), {smtp: 3, api: 4})
            self.assertEqual(child["env"][SUPERVISOR_ENV], str(os.getpid()))
            self.assertEqual(child["fds"][3], first.fileno())
            self.assertEqual(child["fds"][4], second.fileno())
        # The pool's stop closes its own copies (the children keep theirs).
        pool.stopService()
        self.assertEqual(first.fileno(), -1)
        self.assertEqual(second.fileno(), -1)
        self.assertEqual(pool.listeners, {})

    def test_beside_the_workers_of_a_killed_supervisor(self) -> None:
        """The workers of a supervisor that was killed still hold its socket while they
        stop: a new supervisor opens the port beside it rather than failing."""
        left = open_listening_socket(reactor, "tcp:0:interface=127.0.0.1", reuse_port=True)
        self.addCleanup(left.close)
        description = f"tcp:{left.getsockname()[1]}:interface=127.0.0.1"
        pool = WorkerPool(reactor, 2, [], listen=[description])
        pool.privilegedStartService()
        self.addCleanup(pool._close_listeners)
        self.assertEqual(pool.listeners[description].getsockname(), left.getsockname())

    def test_taken_port(self) -> None:
        """A port that is taken is refused once, before any worker starts, with its
        endpoint named; what was opened before it is closed again."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        description = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        pool = WorkerPool(reactor, 2, [], listen=["tcp:0:interface=127.0.0.1", description])
        err = StringIO()
        self.patch(sys, "stderr", err)
        with self.assertRaises(SystemExit) as raised:
            pool.privilegedStartService()
        self.assertEqual(raised.exception.code, 1)
        self.assertIn(f"cannot listen on {description}", err.getvalue())
        self.assertEqual(pool.listeners, {})
        self.assertEqual(pool.children, {})


class _Connected(Protocol):
    def connectionMade(self) -> None:  # noqa: N802
        self.factory.connected.callback(self.transport.getPeer().port)  # type: ignore[attr-defined]


class AdoptTests(TestCase):
    """A worker listens on the descriptor it inherited."""

    def supervisor_socket(self) -> tuple[socket.socket, str]:
        sock = open_listening_socket(reactor, "tcp:0:interface=127.0.0.1")
        self.addCleanup(sock.close)
        return sock, f"tcp:{sock.getsockname()[1]}:interface=127.0.0.1"

    async def test_adopts_the_inherited_socket(self) -> None:
        """The port is the supervisor's socket (same port, same open socket: no bind of
        its own), the inherited descriptor is closed once adopted, and a client's
        connection reaches the factory."""
        sock, description = self.supervisor_socket()
        inherited = os.dup(sock.fileno())  # what the child finds at fd 3, 4, ...
        factory = Factory.forProtocol(_Connected)
        factory.connected = Deferred()  # type: ignore[attr-defined]
        port = await listen_shared(reactor, description, factory, {description: inherited})
        self.addCleanup(port.stopListening)
        self.assertIsInstance(port, ExclusivePort)
        self.assertEqual(port.getHost().port, sock.getsockname()[1])
        self.assertRaises(OSError, os.fstat, inherited)
        client = socket.create_connection(("127.0.0.1", sock.getsockname()[1]))
        self.addCleanup(client.close)
        peer = await factory.connected  # type: ignore[attr-defined]
        self.assertEqual(peer, client.getsockname()[1])

    async def test_adopted_socket_is_non_blocking(self) -> None:
        """Even a descriptor inherited in blocking mode: an ``accept`` that finds
        nobody waiting must fail at once, not hold the reactor."""
        sock, description = self.supervisor_socket()
        sock.setblocking(True)
        port = await listen_shared(reactor, description, Factory.forProtocol(Protocol),
                                   {description: os.dup(sock.fileno())})
        self.addCleanup(port.stopListening)
        self.assertFalse(os.get_blocking(port.fileno()))
        port.doRead()  # nobody waiting: returns

    async def test_one_waiter_woken_per_connection(self) -> None:
        """On epoll the port is registered with EPOLLEXCLUSIVE (as the kernel shows in
        the epoll descriptor's fdinfo), so an idle worker alone is woken."""
        poller = getattr(reactor, "_poller", None)
        if not isinstance(poller, select.epoll):
            raise self.skipTest("the tests do not run on the epoll reactor")
        sock, description = self.supervisor_socket()
        port = await listen_shared(reactor, description, Factory.forProtocol(Protocol),
                                   {description: os.dup(sock.fileno())})
        self.addCleanup(port.stopListening)
        with open(f"/proc/self/fdinfo/{poller.fileno()}") as f:
            rows = [line.split() for line in f if line.startswith("tfd:")]
        events = {int(row[1]): int(row[3], 16) for row in rows}
        self.assertTrue(events[port.fileno()] & EPOLLEXCLUSIVE, hex(events[port.fileno()]))
        self.assertTrue(events[port.fileno()] & select.EPOLLIN)

    async def test_a_lost_wake_up_is_made_up_for(self) -> None:
        """A connection that arrives while no wake-up reaches this process (here: the
        port is not watched at all, as when the worker the kernel woke was killed) is
        still taken, by the port's periodic look at its socket."""
        sock, description = self.supervisor_socket()
        factory = Factory.forProtocol(_Connected)
        factory.connected = Deferred()  # type: ignore[attr-defined]
        port = ExclusivePort._fromListeningDescriptor(
            reactor, os.dup(sock.fileno()), socket.AF_INET, factory)
        port.sweep_interval = 0.05
        port.startListening()
        self.addCleanup(port.stopListening)
        port.stopReading()  # no wake-up will come
        client = socket.create_connection(("127.0.0.1", sock.getsockname()[1]))
        self.addCleanup(client.close)
        peer = await factory.connected  # type: ignore[attr-defined]
        self.assertEqual(peer, client.getsockname()[1])

    async def test_the_looks_end_with_the_port(self) -> None:
        sock, description = self.supervisor_socket()
        port = await listen_shared(reactor, description, Factory.forProtocol(Protocol),
                                   {description: os.dup(sock.fileno())})
        assert isinstance(port, ExclusivePort) and port._sweep is not None
        sweep = port._sweep
        self.assertTrue(sweep.running)
        await port.stopListening()
        self.assertFalse(sweep.running)

    async def test_without_an_inherited_socket_its_own(self) -> None:
        """No descriptor from a supervisor: the worker binds its own socket with
        SO_REUSEPORT, and two such share a port."""
        port_number = free_port()
        description = f"tcp:{port_number}:interface=127.0.0.1"
        factory = Factory.forProtocol(Protocol)
        first = await listen_shared(reactor, description, factory, {})
        self.addCleanup(first.stopListening)
        second = await listen_shared(reactor, description, factory, {})
        self.addCleanup(second.stopListening)
        self.assertEqual(first.getHost().port, port_number)
        self.assertEqual(second.getHost().port, port_number)

"""Several relay processes on one Redis (docs/scaling.md), each started with
twistd the way operators start it: shared work is delivered exactly once, a node
killed mid-delivery loses nothing (another node takes its leases when they expire),
and a Redis crash mid-stream loses nothing that was answered 250.

Each test runs its own redis-server (append-only file, ``appendfsync always``), DNS
server and sink (sendarix.control.cli.sink, counting Message-IDs) on loopback.
"""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import threading
from collections import Counter
from typing import Any

from twisted.internet import reactor, task
from twisted.trial.unittest import TestCase

from sendarix.control.cli.sink import SinkServer
from sendarix.model.event import EventQuery
from sendarix.stores.redis.connection import connect
from sendarix.stores.redis.eventlog import RedisEventLog
from tests.support.dnsserver import start_dns
from tests.support.redisserver import start_redis
from tests.support.relay import in_thread, until
from tests.support.relayproc import RelayProcessMixin, free_port, sink_server

DOMAIN = "cluster.test"


def submit(port: int, tag: str, count: int, stop: threading.Event | None = None) -> list[str]:
    """Send ``count`` messages over one SMTP session; the Message-IDs answered 250.

    Replies other than 250 (451 during a Redis outage) are skipped; so is a
    dropped session, which is opened again.  Blocking: run it in a thread.
    """
    accepted: list[str] = []
    i = 0
    for _ in range(count + 20):  # sessions; bounded
        if i >= count or (stop is not None and stop.is_set()):
            break
        try:
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as s:
                s.ehlo()
                while i < count and not (stop is not None and stop.is_set()):
                    mid = f"<{tag}{i}@test>"
                    i += 1
                    body = f"Message-ID: {mid}\r\nSubject: {mid}\r\n\r\nbody\r\n".encode()
                    if s.mail("app@example.com")[0] != 250:
                        s.rset()
                        continue
                    if s.rcpt(f"user{i % 7}@{DOMAIN}")[0] != 250:
                        s.rset()
                        continue
                    try:
                        code, _ = s.data(body)
                    except smtplib.SMTPDataError:
                        continue
                    if code == 250:
                        accepted.append(mid)
        except (OSError, smtplib.SMTPException):
            continue
    return accepted


class ClusterTests(RelayProcessMixin, TestCase):
    """Two relay processes sharing one Redis."""

    timeout = 90

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.redis_dir = os.path.join(self.dir, "redis")
        self.redis_port, self.stop_redis = start_redis(self.redis_dir)
        self.addCleanup(lambda: self.stop_redis())
        self.dns_port, stop_dns = start_dns(
            {DOMAIN: {"MX": [(10, f"mx.{DOMAIN}")]}, f"mx.{DOMAIN}": {"A": ["127.0.0.2"]}}
        )
        self.addCleanup(stop_dns)

    async def sink(self, port: int = 0, *faults: str) -> SinkServer:
        server = sink_server(port, *faults)
        await server.start()
        self.addCleanup(server.stop)
        return server

    def node(self, name: str, sink_port: int, lease_time: str = "5m") -> tuple[str, int]:
        """Write node ``name``'s config; (config path, SMTP port)."""
        port = free_port()
        path = os.path.join(self.dir, f"{name}.toml")
        with open(path, "w") as f:
            f.write(
                f'[node]\nname = "{name}"\nhostname = "{name}.test"\n'
                # One process per node: the API port is picked at start (tcp:0) and
                # the tests kill a node by its PID.
                "workers = 1\n"
                f'[spool]\nurl = "redis://127.0.0.1:{self.redis_port}/0"\n'
                f'lease_time = "{lease_time}"\n'
                "[events]\njson_log = false\n"
                '[api]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
                f'[dns]\nnameservers = ["127.0.0.1:{self.dns_port}"]\ntimeout = 2\n'
                f'[delivery]\nmx_port = {sink_port}\nretry_schedule = ["1s"]\n'
                '[[listener]]\nname = "relay"\n'
                f'endpoint = "tcp:{port}:interface=127.0.0.1"\n'
                'tls = "none"\nauth = "none"\ntrusted_networks = ["127.0.0.0/8"]\n'
            )
        return path, port

    def start_node(
        self, name: str, sink_port: int, **kw: Any
    ) -> tuple[subprocess.Popen[bytes], int]:
        """Start node ``name`` as a twistd process; (process, SMTP port)."""
        self.config, self.port = self.node(name, sink_port, **kw)
        return self.start_relay(), self.port

    async def test_two_nodes_deliver_each_message_once(self) -> None:
        """500 messages submitted across two nodes are each delivered exactly once,
        and both nodes take part in delivering them."""
        sink = await self.sink()
        sink_port = sink.addresses[0][1]
        (_, one), (_, two) = await in_thread(
            lambda: (self.start_node("n1", sink_port), self.start_node("n2", sink_port))
        )
        results = await in_thread(
            lambda: _both(lambda: submit(one, "a", 250), lambda: submit(two, "b", 250))
        )
        accepted = results[0] + results[1]
        self.assertEqual(len(accepted), 500)
        await until(
            lambda: set(accepted) <= set(sink.stats.message_ids), 45,
            lambda: f"{len(set(accepted) - set(sink.stats.message_ids))} not delivered",
        )
        counts = Counter(sink.stats.message_ids)
        self.assertEqual([m for m, n in counts.items() if n > 1], [])
        self.assertEqual(sum(counts.values()), 500)
        redis = connect(f"redis://127.0.0.1:{self.redis_port}/0", poolsize=1)
        self.addCleanup(redis.disconnect)
        await redis.wait_connected(reactor, 10.0)
        log = RedisEventLog(redis)
        for _ in range(100):  # the events follow the deliveries closely
            page = await log.search(EventQuery(type="delivered", limit=1000))
            if len(page.events) >= 500:
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(len(page.events), 500)
        self.assertEqual({e.node for e in page.events}, {"n1", "n2"})

    async def test_sigkill_node_other_node_takes_over(self) -> None:
        """Node n1 is SIGKILLed while its deliveries stall at the sink; node n2
        delivers them once n1's leases expire (lease_time 3 s), nothing lost."""
        stalled = await self.sink(0, "stall-data")
        sink_port = stalled.addresses[0][1]
        first, port = await in_thread(self.start_node, "n1", sink_port, lease_time="3s")
        accepted = await in_thread(submit, port, "k", 5)
        self.assertEqual(len(accepted), 5)
        await until(lambda: stalled.stats.connections >= 1, 15, "no delivery attempt")
        await task.deferLater(reactor, 0.3, lambda: None)
        os.kill(first.pid, signal.SIGKILL)
        await in_thread(first.wait)
        self.assertEqual(stalled.stats.messages, 0)
        await stalled.stop()
        healthy = await self.sink(sink_port)
        await in_thread(self.start_node, "n2", sink_port, lease_time="3s")
        await until(
            lambda: set(accepted) <= set(healthy.stats.message_ids), 30,
            lambda: f"not all of {accepted} delivered (got {healthy.stats.message_ids})",
        )
        self.assertEqual(sorted(healthy.stats.message_ids), sorted(accepted))

    async def test_redis_crash_mid_stream(self) -> None:
        """redis-server is SIGKILLed while two nodes accept and deliver a stream of
        mail, then restarted on its append-only file: every message answered 250 is
        delivered (once), and the nodes accept mail again without a restart."""
        sink = await self.sink()
        sink_port = sink.addresses[0][1]
        (_, one), (_, two) = await in_thread(
            lambda: (self.start_node("n1", sink_port), self.start_node("n2", sink_port))
        )
        stop = threading.Event()
        streams = in_thread(
            lambda: _both(lambda: submit(one, "c", 400, stop), lambda: submit(two, "d", 400, stop))
        )
        await until(lambda: len(sink.stats.message_ids) >= 40, 30, "no deliveries")
        self.stop_redis()
        await task.deferLater(reactor, 1.0, lambda: None)
        self.redis_port, self.stop_redis = start_redis(self.redis_dir, port=self.redis_port)
        await task.deferLater(reactor, 2.0, lambda: None)
        stop.set()
        results = await streams
        accepted = results[0] + results[1]
        after = await in_thread(submit, one, "e", 10)
        self.assertEqual(len(after), 10)
        wanted = set(accepted) | set(after)
        await until(
            lambda: wanted <= set(sink.stats.message_ids), 45,
            lambda: f"{len(wanted - set(sink.stats.message_ids))} answered 250 not delivered",
        )
        counts = Counter(m for m in sink.stats.message_ids if m in wanted)
        self.assertEqual([m for m, n in counts.items() if n > 1], [])


def _both(a: Any, b: Any) -> tuple[Any, Any]:
    """Run two blocking callables at once in threads; both results."""
    out: list[Any] = [None, None]

    def run(i: int, fn: Any) -> None:
        out[i] = fn()

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out[0], out[1]

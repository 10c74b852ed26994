"""Crash safety of delivery, with the relay as a real process: SIGKILL while
deliveries hang mid-DATA, restart under the same node name, and every accepted
message is still delivered (at least once)."""

from __future__ import annotations

import os
import signal
import smtplib

from twisted.internet import reactor, task
from twisted.trial.unittest import TestCase

from tests.support.dnsserver import start_dns
from tests.support.relay import in_thread, until
from tests.support.relayproc import RelayProcessMixin, sink_server

COUNT = 5


def _submit(port: int) -> list[str]:
    """Send ``COUNT`` messages over one session; the Message-IDs (blocking)."""
    ids = []
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as s:
        for i in range(COUNT):
            mid = f"<crash{i}@test>"
            body = f"Message-ID: {mid}\r\nSubject: crash {i}\r\n\r\nbody {i}\r\n".encode()
            refused = s.sendmail("app@example.com", [f"user{i}@crash.test"], body)
            if refused:
                raise AssertionError(f"refused: {refused}")
            ids.append(mid)
    return ids


class DeliveryCrashTests(RelayProcessMixin, TestCase):
    """A relay process killed while its deliveries are in flight."""

    timeout = 90

    async def test_sigkill_mid_delivery(self) -> None:
        """Deliveries stall after the message data; the relay is SIGKILLed, the sink
        replaced by a healthy one on the same port and the relay restarted under its
        node name: all accepted messages reach the sink (its own leases taken back at
        once, not after the 5-minute lease time)."""
        stalled = sink_server(0, "stall-data")
        await stalled.start()
        self.addCleanup(stalled.stop)
        sink_port = stalled.addresses[0][1]
        dns_port, stop_dns = start_dns(
            {"crash.test": {"MX": [(10, "mx.crash.test")]}, "mx.crash.test": {"A": ["127.0.0.2"]}}
        )
        self.addCleanup(stop_dns)
        self.write_relay_config(
            "crashy",
            f"[dns]\nnameservers = [\"127.0.0.1:{dns_port}\"]\ntimeout = 2\n"
            f"[delivery]\nmx_port = {sink_port}\nretry_schedule = [\"1s\"]\n",
        )

        proc = await in_thread(self.start_relay)
        ids = await in_thread(_submit, self.port)
        await until(lambda: stalled.stats.connections >= 1, 15, "no delivery attempt")
        # Let the stalled session reach the end of DATA before the kill.
        await task.deferLater(reactor, 0.3, lambda: None)
        os.kill(proc.pid, signal.SIGKILL)
        await in_thread(proc.wait)
        self.assertEqual(stalled.stats.messages, 0)
        await stalled.stop()

        healthy = sink_server(sink_port)
        await healthy.start()
        self.addCleanup(healthy.stop)
        restarted = await in_thread(self.start_relay)
        await until(
            lambda: set(ids) <= set(healthy.stats.message_ids), 20,
            f"not all of {ids} delivered (got {healthy.stats.message_ids})",
        )
        restarted.send_signal(signal.SIGTERM)
        await in_thread(restarted.wait, 30)
        self.assertEqual(len(set(healthy.stats.message_ids)), COUNT)

"""Durability and packaging, with the relay as a real process: a message answered 250
survives SIGKILL of the relay byte for byte; the twistd plugin is found."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import sys
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support.relayproc import TWISTD, RelayProcessMixin, env


class RelayProcessTests(RelayProcessMixin, TestCase):
    """The relay as a separate process, started the way operators start it."""

    timeout = 120

    def setUp(self) -> None:
        # No real DNS: the delivery agent defers, so the message stays queued.
        self.write_relay_config(
            "durable", "[dns]\nnameservers = [\"127.0.0.1:9\"]\ntimeout = 0.5\n"
        )

    def _cli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "sendarix.control.cli", "--config", self.config, *args],
            cwd=self.dir, env=env(), capture_output=True, timeout=60,
        )

    def test_sigkill_after_250(self) -> None:
        """Send, hear 250, SIGKILL the relay at once, restart it: the message is in
        ``sendarix queue list`` and its body is intact byte for byte."""
        body = (
            b"From: app@example.com\r\nSubject: durable\r\n\r\n"
            + bytes(range(32, 127)) + b"\r\n" + "caf\u00e9 \u2603".encode() + b"\r\n"
            + b"line\r\n" * 2000
        )

        def scenario() -> Any:
            proc = self.start_relay()
            s = smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test")
            s.ehlo()
            s.mail("app@example.com", ["BODY=8BITMIME"])
            s.rcpt("durable@example.org")
            code, reply = s.data(body)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            s.close()
            restarted = self.start_relay()
            listing = self._cli("queue", "list", "--json")
            qid = reply.split()[-1].decode()
            shown = self._cli("queue", "show", qid, "--body")
            restarted.send_signal(signal.SIGTERM)
            restarted.wait(timeout=30)
            return code, reply, listing, shown, restarted.returncode

        code, reply, listing, shown, rc = yield deferToThread(scenario)
        self.assertEqual(code, 250, reply)
        self.assertEqual(listing.returncode, 0, listing.stderr)
        messages = json.loads(listing.stdout)
        qid = reply.split()[-1].decode()
        self.assertEqual([m["queue_id"] for m in messages], [qid])
        self.assertEqual(messages[0]["envelope"]["recipients"], ["durable@example.org"])
        self.assertEqual(shown.returncode, 0, shown.stderr)
        self.assertTrue(shown.stdout.startswith(b"Received: "))
        self.assertTrue(shown.stdout.endswith(body.split(b"\r\n\r\n", 1)[1]))
        # twistd stops cleanly on SIGTERM and then exits with that signal's status.
        self.assertIn(rc, (0, -signal.SIGTERM))
        with open(os.path.join(self.dir, "relay1.log"), "rb") as f:
            self.assertIn(b"Server Shut Down", f.read())

    test_sigkill_after_250 = __import__(
        "twisted.internet.defer", fromlist=["inlineCallbacks"]
    ).inlineCallbacks(test_sigkill_after_250)

    def test_plugin_listed(self) -> None:
        """``twistd --help`` lists the sendarix plugin."""
        def run() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                [*TWISTD, "--help"],
                env=env(), capture_output=True, timeout=60, cwd=self.dir,
            )

        d = deferToThread(run)
        d.addCallback(lambda r: self.assertIn(b"sendarix", r.stdout))
        return d

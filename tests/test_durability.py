"""Durability and packaging, with the relay as a real process: a message answered 250
survives SIGKILL of the relay byte for byte; the twistd plugin is found."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"relay exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"relay not listening on {port}")


class RelayProcessTests(TestCase):
    """The relay as a separate process, started the way operators start it."""

    timeout = 120

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.port = _free_port()
        self.config = os.path.join(self.dir, "sendarix.toml")
        with open(self.config, "w") as f:
            f.write(
                "[node]\nname = \"durable\"\nhostname = \"relay.test\"\n"
                "[spool]\nurl = \"sqlite:var/spool.db\"\n"
                "[events]\njson_log = false\n"
                # No real DNS: the delivery agent defers, so the message stays queued.
                "[dns]\nnameservers = [\"127.0.0.1:9\"]\ntimeout = 0.5\n"
                "[[listener]]\nname = \"relay\"\n"
                f"endpoint = \"tcp:{self.port}:interface=127.0.0.1\"\n"
                "tls = \"none\"\nauth = \"none\"\ntrusted_networks = [\"127.0.0.0/8\"]\n"
            )
        self.procs: list[subprocess.Popen[bytes]] = []
        self.addCleanup(self._end_processes)

    def _end_processes(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def _start_relay(self) -> subprocess.Popen[bytes]:
        log = open(os.path.join(self.dir, f"relay{len(self.procs)}.log"), "wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "sendarix", "--config", self.config],
            cwd=self.dir, env=_env(), stdout=log, stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        _wait_listening(self.port, proc)
        return proc

    def _cli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "sendarix.cli", "--config", self.config, *args],
            cwd=self.dir, env=_env(), capture_output=True, timeout=60,
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
            proc = self._start_relay()
            s = smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test")
            s.ehlo()
            s.mail("app@example.com", ["BODY=8BITMIME"])
            s.rcpt("durable@example.org")
            code, reply = s.data(body)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            s.close()
            restarted = self._start_relay()
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
                env=_env(), capture_output=True, timeout=60, cwd=self.dir,
            )

        d = deferToThread(run)
        d.addCallback(lambda r: self.assertIn(b"sendarix", r.stdout))
        return d

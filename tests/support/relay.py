"""Test harness: a real relay node in the test's reactor, on loopback port 0, with
TLS from a test CA; and blocking SMTP clients run in threads."""

from __future__ import annotations

import os
import smtplib
import socket
import ssl
import sys
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue

from sendarix.config.loader import parse_config
from sendarix.config.settings import Config
from sendarix.ingress.authlimit import AuthLimiter
from sendarix.node.service import makeService
from tests.support.paths import REPO_ROOT
from tests.support.tlsca import TestCA

HOSTNAME = "relay.test"


class Relay:
    """A started node: ``ports[name]``, ``stores``, ``ca_path``, ``secret``."""

    def __init__(self, directory: str, listeners: list[dict[str, Any]], **sections: Any) -> None:
        directory = os.path.abspath(directory)
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.ca = TestCA(os.path.join(directory, "ca"))
        cert, key = self.ca.issue(HOSTNAME)
        data: dict[str, Any] = {
            "node": {"name": "test-node", "hostname": HOSTNAME},
            "spool": {"url": "sqlite:var/spool.db"},
            "tls": {"certificate": cert, "key": key},
            "listener": listeners,
            "events": {"json_log": False},
            # Tests never ask real DNS: unless a test names its own server, lookups
            # time out, so the delivery agent defers (never bounces) what it leases.
            "dns": {"nameservers": ["127.0.0.1:9"], "timeout": 0.5},
            # The HTTP API on a free port (``api_port`` once started).
            "api": {"endpoint": "tcp:0:interface=127.0.0.1"},
        }
        data.update(sections)
        self.config: Config = parse_config(data, directory)
        self.ca_path = self.ca.ca_path
        self.ports: dict[str, int] = {}
        self.api_port = 0
        self.secret = ""
        self.service: Any = None

    async def start(self, auth_limiter: AuthLimiter | None = None) -> Relay:
        self.service = makeService(
            self.config, reactor,
            auth_limiter=auth_limiter or AuthLimiter(base_delay=0.0, max_delay=0.0),
        )
        self.service.startService()
        self.stores = self.service.stores
        for listener in self.service.listeners:
            port = await listener.listening()
            self.ports[listener.name.split(":", 1)[1]] = port.getHost().port
        if self.service.api is not None:
            self.api_port = (await self.service.api.listening()).getHost().port
        return self

    async def add_credential(self, name: str = "app", **kw: Any) -> str:
        kw.setdefault("tenant", "acme")
        _, secret = await self.stores.credentials.add(name, **kw)
        return str(secret)

    def run_cli(self, *args: str) -> Deferred[tuple[bytes, bytes, int]]:
        """``sendarix ARGS`` as its own process on this relay's spool file (the
        operator's command beside the running node): (stdout, stderr, exit status)."""
        config = os.path.join(self.directory, "cli.toml")
        with open(config, "w") as f:
            f.write('[spool]\nurl = "sqlite:var/spool.db"\n')
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        return getProcessOutputAndValue(
            sys.executable, ["-m", "sendarix.control.cli", "--config", config, *args],
            env=env, path=self.directory,
        )

    def stop(self) -> Deferred[Any]:
        return self.service.stopService()


def start_relay(testcase: Any, listeners: list[dict[str, Any]], **sections: Any) -> Deferred[Relay]:
    """Start a relay for ``testcase``; it is stopped in the test's cleanup."""
    relay = Relay(testcase.mktemp(), listeners, **sections)

    async def go() -> Relay:
        await relay.start()
        testcase.addCleanup(relay.stop)
        return relay

    return ensureDeferred(go())


def client_context(ca_path: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_path)
    ctx.check_hostname = True
    return ctx


def in_thread(fn: Any, *args: Any, **kw: Any) -> Deferred[Any]:
    """Run a blocking client in a thread so the relay (in the reactor) can answer."""
    return deferToThread(fn, *args, **kw)


async def until(check: Any, timeout: float, what: Any) -> None:
    """Poll ``check()`` every 0.1 s until it is true, or fail after ``timeout`` seconds.

    ``check`` may return a Deferred (its result counts); ``what`` says what did not
    happen, as a string or a callable giving one when the wait fails.
    """
    for _ in range(int(timeout / 0.1)):
        result = check()
        if hasattr(result, "addCallback"):
            result = await result
        if result:
            return
        await task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"{what() if callable(what) else what} within {timeout} s")


def smtp_starttls(port: int, ca_path: str) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30)
    s.ehlo()
    s._host = HOSTNAME  # the name smtplib checks the certificate against
    s.starttls(context=client_context(ca_path))
    s.ehlo()
    return s


class RawClient:
    """A blocking socket client that sends raw bytes and reads reply lines."""

    def __init__(self, port: int, tls_ca: str | None = None, source: str | None = None) -> None:
        """Connect to 127.0.0.1:``port`` (from the address ``source`` when given, such
        as 127.0.0.5 for a client outside 127.0.0.1/32)."""
        sock = socket.create_connection(
            ("127.0.0.1", port), timeout=30,
            source_address=(source, 0) if source else None,
        )
        if tls_ca:
            sock = client_context(tls_ca).wrap_socket(sock, server_hostname=HOSTNAME)
        self.sock = sock
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def starttls(self, ca_path: str) -> None:
        self.sock = client_context(ca_path).wrap_socket(self.sock, server_hostname=HOSTNAME)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; pending {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> tuple[int, list[bytes]]:
        """One whole (multi-line) reply: (code, lines)."""
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def exchange(self, *lines: bytes) -> list[bytes]:
        """Send ``lines`` (each a whole command or a message's data) and return the
        first line of the reply to each."""
        for line in lines:
            self.send(line)
        return self.codes(len(lines))

    def codes(self, n: int) -> list[bytes]:
        """The first line of the next ``n`` replies, e.g. b"250 2.1.0 Sender OK"."""
        return [self.reply()[1][-1] for _ in range(n)]

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()

"""The load the bench puts on a relay: Postfix's ``smtp-source``, a one-message SMTP
client for latency and the large message, and a child process holding idle sessions.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from tests.bench.install import which
from tests.bench.sendarix import DOMAIN, Failed
from tests.support.relayproc import env

SENDER = f"bench@{DOMAIN}"
RECIPIENT = f"user@{DOMAIN}"


def smtp_source(port: int, sessions: int, messages: int, size: int,
                timeout: float) -> tuple[float, float]:
    """Run smtp-source (one message per session, no pipelining); return its
    (start, end) on the monotonic clock."""
    binary = which("smtp-source")
    if binary is None:
        raise Failed("smtp-source is not installed")
    command = [binary, "-s", str(sessions), "-m", str(messages), "-l", str(size),
               "-f", SENDER, "-t", RECIPIENT, "-M", "client.bench.invalid",
               f"127.0.0.1:{port}"]
    start = time.monotonic()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          timeout=timeout, check=False)
    end = time.monotonic()
    if done.returncode != 0:
        raise Failed(f"smtp-source failed: {done.stderr.decode(errors='replace')[-300:]}")
    return start, end


def message(size: int, subject: str = "bench") -> bytes:
    """A message of about ``size`` payload octets (dot-stuffing needs none: no line
    starts with a dot)."""
    header = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: {subject}\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    lines, rest = divmod(size, len(line))
    return header + line * lines + b"y" * max(rest - 2, 0) + b"\r\n"


class _Conversation:
    def __init__(self, port: int, timeout: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def reply(self) -> bytes:
        while True:
            lines = self.buf.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if len(line) >= 4 and line[3:4] == b" ":
                    self.buf = b"\r\n".join(lines[i + 1 :])
                    return line
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Failed("connection closed by the server")
            self.buf += chunk

    def command(self, line: bytes, expect: bytes) -> None:
        self.sock.sendall(line + b"\r\n")
        self.expect(expect)

    def expect(self, code: bytes) -> None:
        got = self.reply()
        if not got.startswith(code):
            raise Failed(f"expected {code.decode()}, got {got.decode(errors='replace')}")

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
        except OSError:
            pass
        self.sock.close()


def send_message(port: int, body: bytes, timeout: float = 60.0,
                 steps: dict[str, float] | None = None) -> float:
    """Submit one message in a new session; return the monotonic time it started.
    Returns after the 250 to the final dot (and a QUIT).

    ``steps``, when given, gets the seconds each step of the dialogue took, as this
    client saw them (``connect``: until the banner; ``ehlo``, ``mail``, ``rcpt``,
    ``data``: command to reply; ``dot``: the final dot to its 250), and ``dot_sent``,
    the monotonic time the final dot was sent."""
    start = time.monotonic()
    times = steps if steps is not None else {}
    conv = _Conversation(port, timeout)
    try:
        conv.expect(b"220")
        times["connect"] = time.monotonic() - start
        for name, line, code in (
            ("ehlo", b"EHLO client.bench.invalid", b"250"),
            ("mail", f"MAIL FROM:<{SENDER}>".encode(), b"250"),
            ("rcpt", f"RCPT TO:<{RECIPIENT}>".encode(), b"250"),
            ("data", b"DATA", b"354"),
        ):
            t = time.monotonic()
            conv.command(line, code)
            times[name] = time.monotonic() - t
        view = memoryview(body)
        for i in range(0, len(body), 1 << 20):
            conv.sock.sendall(view[i : i + (1 << 20)])
        times["dot_sent"] = time.monotonic()
        conv.command(b".", b"250")
        times["dot"] = time.monotonic() - times["dot_sent"]
    finally:
        conv.close()
    return start


class IdleSessions:
    """A child process holding ``count`` EHLO'd sessions open until ``close()``."""

    def __init__(self, port: int, count: int, timeout: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.idle", str(port), str(count), str(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env(),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().split()
        if len(line) != 2 or line[0] != "open":
            self.close()
            raise Failed("the idle-session client did not report")
        self.opened = int(line[1])

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

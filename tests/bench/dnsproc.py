"""A DNS server process for the bench: the bench domain's MX is the sink on loopback.

``python -m tests.bench.dnsproc DOMAIN`` prints its port on the first line of stdout
and serves (tests/dnsserver.py) until its stdin is closed.
"""

from __future__ import annotations

import subprocess
import sys

from tests.support.relayproc import env


def main(domain: str) -> None:
    from twisted.internet import reactor, stdio
    from twisted.internet.protocol import Protocol

    from tests.support.dnsserver import start_dns

    port, stop = start_dns({
        domain: {"MX": [(10, f"mx.{domain}")]},
        f"mx.{domain}": {"A": ["127.0.0.1"]},
    })

    class _UntilClosed(Protocol):
        def connectionLost(self, reason: object = None) -> None:
            stop().addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    stdio.StandardIO(_UntilClosed())
    print(port, flush=True)
    reactor.run()  # type: ignore[attr-defined]


class DNSProcess:
    """Runs ``main`` in a child process; ``port`` is where it answers."""

    def __init__(self, domain: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.dnsproc", domain],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env(),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError("the bench DNS server did not start")
        self.port = int(line)

    def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    main(sys.argv[1])

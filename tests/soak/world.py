"""The soak's outside world, run as its own process: DNS and the destination servers.

``python -m tests.soak.world RECORDS_FILE`` serves, on loopback:

- an authoritative DNS server (``tests.support.dnsserver``) with an MX record for every
  destination domain (:data:`DESTINATIONS`);
- one SMTP server per destination host, every one on the same port (the relay's
  ``[delivery] mx_port``) and each on its own 127.0.0.x address, behaving as its
  destination's profile says: accepting, greylisting (450), refusing recipients (550),
  answering 421, stalling (saying nothing until the client gives up), dropping the
  connection in the middle of DATA; one backup destination whose first MX refuses
  connections (nothing listens there), and one whose only host stops listening while
  the harness says so (``down NAME`` / ``up NAME`` lines on stdin).

Every message answered 250 is first written to ``RECORDS_FILE`` (one JSON line: the
destination, the relay's queue id from the ``Received:`` field the relay added, the
``X-Soak-Id`` token the submitter wrote, the recipients accepted, the client's EHLO
name, which says which node sent it, and the time), so a message counts as received
exactly when the relay was told 250.  When everything listens the process prints
``ready DNS_PORT SMTP_PORT``.
"""

from __future__ import annotations

import json
import random
import re
import socket
import sys
import time
from typing import Any

from attrs import frozen
from twisted.internet import reactor, stdio
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver

from tests.support.dnsserver import start_dns


@frozen
class Profile:
    """How one destination host behaves; the chances are per session or transaction."""

    greylist: bool = False  # 450 to the first attempt at every recipient
    bounce_prefix: str | None = None  # 550 5.1.1 to recipients whose local part starts so
    busy: float = 0.0  # 421 at the greeting
    busy_rcpt: float = 0.0  # 421 to a RCPT (the session ends)
    stall: float = 0.0  # no greeting, ever
    stall_mail: float = 0.0  # no reply to MAIL, ever
    drop_data: float = 0.0  # connection dropped after the first line of the message


#: domain -> [(MX preference, host address, profile or None: nothing listens there)].
DESTINATIONS: dict[str, list[tuple[int, str, Profile | None]]] = {
    "good.test": [(10, "127.0.0.2", Profile())],
    "greylist.test": [(10, "127.0.0.3", Profile(greylist=True))],
    "bounce.test": [(10, "127.0.0.4", Profile(bounce_prefix="gone"))],
    "busy.test": [(10, "127.0.0.5", Profile(busy=0.3, busy_rcpt=0.05))],
    "stall.test": [(10, "127.0.0.6", Profile(stall=0.15, stall_mail=0.1))],
    "drop.test": [(10, "127.0.0.7", Profile(drop_data=0.25))],
    "backup.test": [(10, "127.0.0.8", None), (20, "127.0.0.9", Profile())],
    "outage.test": [(10, "127.0.0.10", Profile())],
}

#: Destinations whose listener the harness may take down and bring back.
SWITCHABLE = ("outage.test",)

_RECEIVED_ID = re.compile(rb"^Received:.*?\bid\s+([A-Za-z0-9._-]+)", re.I | re.S | re.M)
_SOAK_ID = re.compile(rb"^X-Soak-Id:[ \t]*([0-9a-f]+)", re.I | re.M)
_ADDRESS = re.compile(r"<([^<>]*)>")


def expected_outcome(address: str) -> str:
    """What the destination of ``address`` finally does with it: "delivered" or
    "bounced"."""
    local, _, domain = address.rpartition("@")
    for _, _, profile in DESTINATIONS.get(domain.lower(), []):
        if profile is not None and profile.bounce_prefix and local.startswith(
            profile.bounce_prefix
        ):
            return "bounced"
    return "delivered"


class World:
    """What every session shares: the records file, greylist memory, the rng."""

    def __init__(self, records: str, seed: int) -> None:
        self.records = open(records, "a", buffering=1)
        self.rng = random.Random(seed)
        self.greylisted: set[str] = set()

    def record(self, entry: dict[str, Any]) -> None:
        self.records.write(json.dumps(entry, sort_keys=True) + "\n")
        self.records.flush()


class Destination(LineReceiver):
    """One SMTP session at a destination host (PIPELINING: replies in command order)."""

    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, world: World, domain: str, profile: Profile) -> None:
        self.world = world
        self.domain = domain
        self.profile = profile
        self.helo = ""
        self.silent = False
        self._reset()

    def _reset(self) -> None:
        self.sender: str | None = None
        self.rcpts: list[str] = []
        self.body: list[bytes] | None = None
        self.drop = False

    def _chance(self, p: float) -> bool:
        return p > 0 and self.world.rng.random() < p

    def _send(self, line: str) -> None:
        self.sendLine(line.encode())

    def connectionMade(self) -> None:
        # A stalled session is ended by the client; this bounds the rest.
        self.idle = reactor.callLater(120, self.transport.abortConnection)  # type: ignore[attr-defined]
        if self._chance(self.profile.stall):
            self.silent = True
        elif self._chance(self.profile.busy):
            self._send("421 4.3.2 busy, try again later")
            self.transport.loseConnection()
            self.silent = True
        else:
            self._send(f"220 {self.domain} soak destination")

    def connectionLost(self, reason: Any = None) -> None:
        if self.idle.active():
            self.idle.cancel()

    def lineReceived(self, line: bytes) -> None:
        if self.silent:
            return
        if self.body is not None:
            self._data_line(line)
            return
        verb, _, arg = line.decode("utf-8", "replace").partition(" ")
        verb = verb.upper()
        if verb in ("EHLO", "HELO"):
            self.helo = arg.strip()
            self._reset()
            self._send(f"250-{self.domain}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 0"
                       if verb == "EHLO" else f"250 {self.domain}")
        elif verb == "MAIL":
            if self._chance(self.profile.stall_mail):
                self.silent = True
                return
            self._reset()
            self.sender = arg
            self._send("250 2.1.0 OK")
        elif verb == "RCPT":
            self._rcpt(arg)
        elif verb == "DATA":
            if self.sender is None or not self.rcpts:
                self._send("554 5.5.1 no valid recipients")
                return
            self.body = []
            self.drop = self._chance(self.profile.drop_data)
            self._send("354 go ahead")
        elif verb == "RSET":
            self._reset()
            self._send("250 2.0.0 OK")
        elif verb == "NOOP":
            self._send("250 2.0.0 OK")
        elif verb == "QUIT":
            self._send("221 2.0.0 bye")
            self.transport.loseConnection()
        else:
            self._send("502 5.5.1 not here")

    def _rcpt(self, arg: str) -> None:
        if self.sender is None:
            self._send("503 5.5.1 MAIL first")
            return
        m = _ADDRESS.search(arg)
        address = m.group(1) if m else ""
        local = address.rpartition("@")[0]
        p = self.profile
        if self._chance(p.busy_rcpt):
            self._send("421 4.7.0 too many messages, slow down")
            self.transport.loseConnection()
            self.silent = True
        elif p.bounce_prefix and local.startswith(p.bounce_prefix):
            self._send("550 5.1.1 no such user here")
        elif p.greylist and address.lower() not in self.world.greylisted:
            self.world.greylisted.add(address.lower())
            self._send("450 4.2.0 greylisted, please retry later")
        else:
            self.rcpts.append(address)
            self._send("250 2.1.5 OK")

    def _data_line(self, line: bytes) -> None:
        assert self.body is not None
        if self.drop:
            # Mid-DATA: the client has sent part of the message; nothing is recorded.
            self.silent = True
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        if line != b".":
            self.body.append(line[1:] if line.startswith(b"..") else line)
            return
        raw = b"\r\n".join(self.body)
        head = raw.split(b"\r\n\r\n", 1)[0]
        queue_id = _RECEIVED_ID.search(head)
        token = _SOAK_ID.search(head)
        self.world.record({
            "domain": self.domain,
            "queue_id": queue_id.group(1).decode() if queue_id else None,
            "token": token.group(1).decode() if token else None,
            "recipients": self.rcpts,
            "helo": self.helo,
            "at": time.time(),
        })
        self._reset()
        self._send("250 2.0.0 OK: received")


class DestinationFactory(Factory):
    def __init__(self, world: World, domain: str, profile: Profile) -> None:
        self.world, self.domain, self.profile = world, domain, profile

    def buildProtocol(self, addr: Any) -> Destination:
        return Destination(self.world, self.domain, self.profile)


class Control(LineReceiver):
    """``down NAME`` / ``up NAME`` on stdin: stop or start a switchable listener."""

    delimiter = b"\n"

    def __init__(self, listen: Any, stop: Any) -> None:
        self.listen, self.stop = listen, stop

    def lineReceived(self, line: bytes) -> None:
        what, _, name = line.decode().strip().partition(" ")
        if what == "down":
            self.stop(name)
        elif what == "up":
            self.listen(name)

    def connectionLost(self, reason: Any = None) -> None:
        # The harness is gone: so are we.
        if reactor.running:  # type: ignore[attr-defined]
            reactor.stop()  # type: ignore[attr-defined]


def _port_free_everywhere(port: int) -> bool:
    for _, hosts in DESTINATIONS.items():
        for _, address, _ in hosts:
            with socket.socket() as s:
                try:
                    s.bind((address, port))
                except OSError:
                    return False
    return True


def main(argv: list[str]) -> None:
    world = World(argv[1], seed=int(argv[2]) if len(argv) > 2 else 1)
    records: dict[str, dict[str, Any]] = {}
    for domain, hosts in DESTINATIONS.items():
        records[domain] = {"MX": [(pref, f"mx{pref}.{domain}") for pref, _, _ in hosts]}
        for pref, address, _ in hosts:
            records[f"mx{pref}.{domain}"] = {"A": [address]}
    dns_port, _ = start_dns(records)
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
            port = s.getsockname()[1]
        if _port_free_everywhere(port):
            break
    else:
        raise SystemExit("no port free on every destination address")
    listening: dict[str, list[IListeningPort]] = {}

    def listen(domain: str) -> None:
        if listening.get(domain):
            return
        ports = []
        for _, address, profile in DESTINATIONS[domain]:
            if profile is not None:
                factory = DestinationFactory(world, domain, profile)
                try:
                    ports.append(reactor.listenTCP(port, factory, interface=address))  # type: ignore[attr-defined]
                except CannotListenError as e:
                    print(f"cannot listen for {domain}: {e}", file=sys.stderr, flush=True)
        listening[domain] = ports

    def stop(domain: str) -> None:
        for p in listening.pop(domain, []):
            p.stopListening()

    for domain in DESTINATIONS:
        listen(domain)
    stdio.StandardIO(Control(listen, stop))
    print(f"ready {dns_port} {port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv)

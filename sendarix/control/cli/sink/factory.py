"""The sink's factory: the sessions' shared state (faults, counters, received
messages, waiters) and where messages are written."""

from __future__ import annotations

import json
import os
import re
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import ssl
from twisted.internet.defer import (
    Deferred,
    gatherResults,
    succeed,
)
from twisted.internet.protocol import ServerFactory
from twisted.internet.threads import deferToThreadPool
from twisted.logger import (
    Logger,
)
from twisted.python.failure import Failure

from sendarix.control.cli.sink.faults import Fault, FaultKind
from sendarix.control.cli.sink.records import ReceivedMessage, SinkOptions, SinkStats
from sendarix.control.cli.sink.session import SinkProtocol

log = Logger()

#: Characters a Message-ID may keep in a file name.
_UNSAFE_RE = re.compile(r"[^A-Za-z0-9._@+=-]")

def _load_tls(options: SinkOptions) -> ssl.CertificateOptions | None:
    if options.certificate is None or options.key is None:
        return None
    pem = Path(options.certificate).read_bytes() + b"\n" + Path(options.key).read_bytes()
    return ssl.PrivateCertificate.loadPEM(pem).options()


def _write_files(directory: str, stem: str, body: bytes, meta: dict[str, Any]) -> None:
    """Write ``stem.json`` then ``stem.eml``, each through a temporary name, so a
    reader that sees the .eml file also finds its envelope."""
    base = os.path.join(directory, stem)
    for path, data in (
        (base + ".json", json.dumps(meta, indent=1).encode("utf-8")),
        (base + ".eml", body),
    ):
        tmp = path + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)


class SinkFactory(ServerFactory):
    """Builds :class:`SinkProtocol` sessions and holds what they share: faults,
    counters, the received messages and the waiters of :meth:`wait_for`."""

    noisy = False

    def __init__(self, options: SinkOptions, reactor: Any) -> None:
        # reactor: IReactorTime + IReactorThreads (+ IReactorTCP when listening).
        self.options = options
        self.reactor = reactor
        self.hostname = options.hostname
        self.max_size = options.max_message_size
        self.max_recipients = options.max_recipients
        self.idle_timeout = options.idle_timeout
        self.stats = SinkStats()
        self.messages: deque[ReceivedMessage] = deque(maxlen=options.max_messages)
        self.tls_context = _load_tls(options)
        self.on_change: Callable[[], None] | None = None

        faults = options.faults

        def first_of(kind: FaultKind) -> Fault | None:
            return next((x for x in faults if x.kind is kind), None)

        self.refuse = first_of(FaultKind.REFUSE) is not None
        self.connect = first_of(FaultKind.CONNECT)
        self.stall = first_of(FaultKind.STALL)
        self.stall_data = first_of(FaultKind.STALL_DATA)
        self.data_fault = first_of(FaultKind.DATA)
        self.drop_after_ehlo = first_of(FaultKind.DROP_AFTER_EHLO) is not None
        self.rcpt_faults = [x for x in faults if x.kind is FaultKind.RCPT]
        self.first_faults = [x for x in faults if x.kind is FaultKind.FIRST]
        self._transactions = 0

        self._seq = 0
        if options.maildir is not None:
            os.makedirs(options.maildir, exist_ok=True)
            for name in os.listdir(options.maildir):
                m = re.match(r"^(\d+)", name)
                if m:
                    self._seq = max(self._seq, int(m.group(1)))
        self._protocols: set[SinkProtocol] = set()
        self._lost: dict[SinkProtocol, list[Deferred[None]]] = {}
        self._pending: set[Deferred[bool]] = set()
        self._waiters: list[tuple[int, Deferred[list[ReceivedMessage]]]] = []

    def buildProtocol(self, addr: Any) -> SinkProtocol:
        return SinkProtocol(self)

    # ---- bookkeeping called by the protocol

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def connection_made(self, proto: SinkProtocol) -> None:
        self._protocols.add(proto)
        s = self.stats
        s.connections += 1
        s.active += 1
        s.max_concurrent = max(s.max_concurrent, s.active)
        peer = proto.peer_address
        s.active_by_peer[peer] = n = s.active_by_peer.get(peer, 0) + 1
        s.max_concurrent_by_peer[peer] = max(s.max_concurrent_by_peer.get(peer, 0), n)
        self._changed()

    def connection_lost(self, proto: SinkProtocol) -> None:
        if proto in self._protocols:
            self._protocols.discard(proto)
            self.stats.active -= 1
            peer = proto.peer_address
            left = self.stats.active_by_peer.get(peer, 0) - 1
            if left > 0:
                self.stats.active_by_peer[peer] = left
            else:
                self.stats.active_by_peer.pop(peer, None)
            self._changed()
        for d in self._lost.pop(proto, []):
            d.callback(None)

    def first_fault_for_new_transaction(self) -> Fault | None:
        """Count a transaction reaching RCPT; the ``first`` fault it falls under, if any."""
        self._transactions += 1
        n = self._transactions
        return next((x for x in self.first_faults if x.count is not None and n <= x.count), None)

    def next_queue_id(self) -> str:
        self._seq += 1
        return f"{self._seq:010d}"

    def store(self, message: ReceivedMessage) -> Deferred[bool] | None:
        """Keep ``message``; None when done at once, else a Deferred firing with success."""
        directory = self.options.maildir
        if directory is None:
            self.messages.append(message)
            self._received(message)
            return None
        stem = message.queue_id
        if message.message_id:
            stem += "-" + _UNSAFE_RE.sub("_", message.message_id.strip("<> "))[:120]
        d: Deferred[None] = deferToThreadPool(
            self.reactor,
            self.reactor.getThreadPool(),
            _write_files,
            directory,
            stem,
            message.body,
            message.to_dict(),
        )

        def ok(_: None) -> bool:
            self._received(message)
            return True

        def failed(reason: Failure) -> bool:
            log.failure("could not write message {queue_id}", reason, queue_id=message.queue_id)
            return False

        result: Deferred[bool] = d.addCallbacks(ok, failed)
        self._pending.add(result)

        def settled(ok: bool) -> bool:
            self._pending.discard(result)
            return ok

        return result.addCallback(settled)

    def _received(self, message: ReceivedMessage) -> None:
        s = self.stats
        s.messages += 1
        s.recipients += len(message.recipients)
        s.bytes += len(message.body)
        s.message_ids.append(message.message_id or "")
        if self.options.verbose:
            tls = message.tls.version if message.tls else "none"
            rcpts = ",".join(f"<{r}>" for r in message.recipients)
            sys.stdout.write(
                f"received {message.queue_id} from=<{message.sender}> to={rcpts} "
                f"size={len(message.body)} message_id={message.message_id or '-'} "
                f"peer={message.peer} local={message.local} tls={tls}\n"
            )
            sys.stdout.flush()
        self._changed()
        waiters, self._waiters = self._waiters, []
        for count, d in waiters:
            if s.messages >= count:
                d.callback(list(self.messages))
            else:
                self._waiters.append((count, d))

    # ---- for tests and the server

    def wait_for(self, count: int, timeout: float = 10.0) -> Deferred[list[ReceivedMessage]]:
        """Fire with the retained messages once ``count`` messages have been received
        in all; fail with ``twisted.internet.defer.TimeoutError`` after ``timeout``."""
        if self.stats.messages >= count:
            return succeed(list(self.messages))

        def cancel(d: Deferred[list[ReceivedMessage]]) -> None:
            self._waiters = [w for w in self._waiters if w[1] is not d]

        d: Deferred[list[ReceivedMessage]] = Deferred(cancel)
        self._waiters.append((count, d))
        d.addTimeout(timeout, self.reactor)
        return d

    def close_connections(self) -> Deferred[None]:
        """Abort every open session; fires when all of them are gone."""
        waits: list[Deferred[None]] = []
        for proto in list(self._protocols):
            d: Deferred[None] = Deferred()
            self._lost.setdefault(proto, []).append(d)
            waits.append(d)
            proto.abort()
        pending: list[Deferred[Any]] = [*waits, *self._pending]
        return gatherResults(pending).addCallback(lambda _: None)



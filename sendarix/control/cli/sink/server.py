"""A sink listening on its endpoints, with its stats file kept up to date."""

from __future__ import annotations

import json
import os
from collections import deque
from typing import Any

from twisted.internet.defer import (
    Deferred,
    DeferredList,
    maybeDeferred,
)
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import (
    Logger,
)

from sendarix.control.cli.sink.factory import SinkFactory
from sendarix.control.cli.sink.records import ReceivedMessage, SinkOptions, SinkStats

log = Logger()

class SinkServer:
    """A sink listening on every endpoint of its options, with the stats file kept up
    to date (at most once per second, and at stop)."""

    def __init__(self, options: SinkOptions, reactor: Any) -> None:
        self.options = options
        self.reactor = reactor
        self.factory = SinkFactory(options, reactor)
        self.factory.on_change = self._mark_dirty
        self.ports: list[IListeningPort] = []
        self._dirty = True
        self._writer: LoopingCall | None = None

    @property
    def stats(self) -> SinkStats:
        """The sink's counters."""
        return self.factory.stats

    @property
    def messages(self) -> deque[ReceivedMessage]:
        """The messages kept in memory (none with ``maildir``), oldest first."""
        return self.factory.messages

    def wait_for(self, count: int, timeout: float = 10.0) -> Deferred[list[ReceivedMessage]]:
        """See :meth:`SinkFactory.wait_for`."""
        return self.factory.wait_for(count, timeout)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every TCP listening port."""
        out = []
        for port in self.ports:
            addr: Any = port.getHost()
            if hasattr(addr, "port"):
                out.append((addr.host, addr.port))
        return out

    def start(self) -> Deferred[list[IListeningPort]]:
        """Listen on every endpoint; fires with the listening ports.  If one endpoint
        fails, the others are closed again and the Deferred fails."""

        async def run() -> list[IListeningPort]:
            results = await DeferredList(
                [
                    serverFromString(self.reactor, desc).listen(self.factory)
                    for desc in self.options.listen
                ],
                consumeErrors=True,
            )
            ports = [value for ok, value in results if ok]
            errors = [value for ok, value in results if not ok]
            if errors:
                for port in ports:
                    await maybeDeferred(port.stopListening)
                errors[0].raiseException()
            self.ports = ports
            if self.options.stats_file:
                self._write_stats()
                self._writer = LoopingCall(self._write_stats_if_dirty)
                self._writer.clock = self.reactor
                self._writer.start(1.0, now=False)
            return ports

        return Deferred.fromCoroutine(run())

    def stop(self) -> Deferred[None]:
        """Stop listening, drop open sessions, write the stats file a last time."""

        async def run() -> None:
            ports, self.ports = self.ports, []
            for port in ports:
                await maybeDeferred(port.stopListening)
            await self.factory.close_connections()
            if self._writer is not None and self._writer.running:
                self._writer.stop()
            self._writer = None
            if self.options.stats_file:
                self._write_stats()

        return Deferred.fromCoroutine(run())

    def _mark_dirty(self) -> None:
        self._dirty = True

    def _write_stats_if_dirty(self) -> None:
        if self._dirty:
            self._write_stats()

    def _write_stats(self) -> None:
        path = self.options.stats_file
        if not path:
            return
        self._dirty = False
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(self.stats.to_dict(), fh)
            os.replace(tmp, path)
        except OSError:
            log.failure("could not write the stats file {path}", path=path)



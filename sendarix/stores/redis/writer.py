"""Writes that ride out a Redis outage: the delivery log and the webhook outbox.

An outcome must reach the delivery log (and, for subscribed events, the webhook
outbox) even when Redis is away for a moment, yet the delivery agent must not wait
on every single write.  :class:`BufferedScript` queues each write's script
arguments, sends them in batches to one Lua script in order, and while Redis is
unavailable keeps them (up to ``max_buffer``) and tries again every
``retry_delay`` seconds.  The scripts are idempotent by event id, so a batch that
reached Redis before its connection broke may safely be written again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from sendarix.stores.errors import StoreUnavailable

log = Logger()


@define
class BufferedScript:
    """One Lua script's writes, batched and kept across an outage.

    :param run: runs the script with flat string arguments.
    :param batch: writes per script call.
    :param clock: schedules the retries.
    :param lost: what the warning calls the writes dropped at stop, e.g. "events not logged".
    """

    _run: Callable[[list[str]], Deferred[Any]] = field(alias="run")
    _batch: int = field(alias="batch")
    _clock: Any = field(alias="clock")
    _lost: str = field(alias="lost")
    #: Writes kept in memory while Redis is unreachable; beyond this, writes fail.
    max_buffer: int = 100_000
    #: Seconds between writes retried during an outage.
    retry_delay: float = 1.0
    _queue: list[tuple[list[str], Deferred[None]]] = field(init=False, factory=list)
    _writing: bool = field(init=False, default=False)
    _retry: Any = field(init=False, default=None)
    _closing: bool = field(init=False, default=False)
    _idle: list[Deferred[None]] = field(init=False, factory=list)

    def write(self, args: list[str]) -> Deferred[None]:
        """Queue one write; the Deferred fires once Redis has it."""
        d: Deferred[None] = Deferred()
        self._queue.append((args, d))
        if not self._writing:
            self._writing = True
            self._write_next()
        return d

    def _write_next(self) -> None:
        self._retry = None
        if not self._queue:
            self._writing = False
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)
            return
        batch, self._queue = self._queue[: self._batch], self._queue[self._batch :]

        def done(result: object) -> None:
            if isinstance(result, Failure):
                if (result.check(StoreUnavailable)
                        and len(self._queue) + len(batch) <= self.max_buffer):
                    # Keep them, in order, and try again once Redis may be back.
                    self._queue[:0] = batch
                    if self._closing:
                        self._drop_queue()
                    else:
                        self._retry = self._clock.callLater(self.retry_delay, self._write_next)
                    return
                for _, d in batch:
                    d.errback(result)
            else:
                for _, d in batch:
                    d.callback(None)
            self._write_next()

        self._run([a for args, _ in batch for a in args]).addBoth(done)

    def close(self) -> Deferred[None]:
        """Before the connection closes: fires once the writes waiting are done.  While
        Redis is unavailable they are dropped instead (no more retries), with a warning
        that says how many."""
        self._closing = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
            self._drop_queue()
        if not self._writing:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def _drop_queue(self) -> None:
        dropped, self._queue = self._queue, []
        if dropped:
            log.warn("{count} {what}: Redis unavailable at stop", count=len(dropped),
                     what=self._lost)
        for _, d in dropped:
            d.callback(None)
        self._write_next()

"""The webhook dispatcher: leases due batches from the outbox, POSTs them, and records
what the receiver answered.

Every ``interval`` seconds (once the stores are ready) the dispatcher asks the outbox
for due batches, at most ``concurrency`` in flight per endpoint, so one endpoint that
is slow or failing holds only its own slots: mail and other endpoints go on.  A
batch is POSTed with its ``webhook-*`` headers (signed again on every attempt, with a
fresh ``webhook-timestamp``), through an HTTP client whose connections pass the
address guard (:mod:`sendarix.events.webhooks.ssrf`), with a ``timeout`` on the
whole exchange and no redirects followed.  A 2xx answer acknowledges the batch; 410
disables the endpoint and dead-letters the batch; any other answer or error counts
as a failed attempt, tried again on the endpoint's schedule (``Retry-After``
honoured) until the schedule is used up and the batch is dead-lettered.

The endpoints come from a :class:`~sendarix.events.webhooks.directory.WebhookDirectory`,
so endpoints added while the node runs are served from the next round on; a batch of
an endpoint that was removed is not sent (its lease runs out, or it was dropped).

On start the dispatcher takes back the batches its node leased before a restart;
every hour it deletes dead batches older than ``dead_retention``.

:func:`post_signed` makes one signed POST; ``sendarix webhooks test`` and
``POST /v1/webhooks/{name}/test`` use it too, so a test goes through the same guard
and signing as the real thing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import treq
import treq.client
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IPolicyForHTTPS

from sendarix.events.webhooks.directory import WebhookDirectory
from sendarix.events.webhooks.endpoints import WebhookEndpoint
from sendarix.events.webhooks.schedule import GiveUp, after_failure, parse_retry_after
from sendarix.events.webhooks.signature import headers as signed_headers
from sendarix.events.webhooks.ssrf import GuardedEndpointFactory
from sendarix.interfaces import IWebhookOutbox
from sendarix.model.webhook import BATCH_FILL_TIME, MAX_BATCH_EVENTS, WebhookBatch
from sendarix.stores.errors import StoreUnavailable

log = Logger()

#: Bytes of an answer's body read (and then dropped) at most.
MAX_ANSWER = 64 * 1024


def guarded_agent(
    reactor: Any,
    allow_private: bool = False,
    connect_timeout: float = 10.0,
    resolver: Any = None,
    tls_policy: IPolicyForHTTPS | None = None,
) -> tuple[IAgent, HTTPConnectionPool]:
    """An HTTP agent (and its connection pool) that connects only to allowed addresses."""
    factory = GuardedEndpointFactory(
        reactor, allow_private=allow_private, connect_timeout=connect_timeout, resolver=resolver,
        **({"tls_policy": tls_policy} if tls_policy is not None else {}),
    )
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 4
    return Agent.usingEndpointFactory(reactor, factory, pool=pool), pool


class _Failed(Exception):  # noqa: N818
    """An attempt that the receiver did not accept."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


async def post_signed(
    agent: IAgent, clock: Any, endpoint: WebhookEndpoint, msg_id: str, body: bytes,
    timeout: float,
) -> Any:
    """POST ``body`` to ``endpoint`` with its ``webhook-*`` headers (signed now with
    every key of the endpoint), no redirects followed, within ``timeout`` seconds;
    the response, its body read (at most :data:`MAX_ANSWER` bytes) and dropped."""
    sent_at = int(clock.seconds())
    headers = signed_headers(list(endpoint.keys), msg_id, sent_at, body)
    headers["content-type"] = "application/json"
    headers["user-agent"] = "Sendarix-Webhooks/1"
    client = treq.client.HTTPClient(agent)
    response = await client.post(
        endpoint.url,
        data=body,
        headers=Headers({k: [v] for k, v in headers.items()}),
        allow_redirects=False,
        reactor=clock,
        timeout=timeout,
    )
    await _drain(response, clock, timeout)
    return response


async def _drain(response: Any, clock: Any, timeout: float) -> None:
    """Read (and drop) at most :data:`MAX_ANSWER` bytes of the answer, within
    ``timeout``, so the connection can be used again."""
    seen = 0

    def chunk(data: bytes) -> None:
        nonlocal seen
        seen += len(data)
        if seen > MAX_ANSWER:
            raise _Failed("answer too long")

    d = treq.collect(response, chunk)
    timer = clock.callLater(timeout, d.cancel)
    try:
        await d
    except Exception:  # noqa: BLE001 - the status decides; the body is not needed
        pass
    finally:
        if timer.active():
            timer.cancel()


def describe_error(error: BaseException) -> str:
    """An exception as one short line (why a POST failed)."""
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:500]


class WebhookDispatcher(Service):
    """Sends the outbox's batches (see the module docstring); a child service of the node."""

    name = "webhooks"

    def __init__(
        self,
        outbox: IWebhookOutbox,
        endpoints: Sequence[WebhookEndpoint] | WebhookDirectory,
        node: str,
        clock: Any,
        agent: IAgent,
        pool: HTTPConnectionPool | None = None,
        ready: Callable[[], Deferred[Any]] | None = None,
        interval: float = 0.5,
        lease_for: float = 60.0,
        concurrency: int = 4,
        timeout: float = 10.0,
        fill_time: float = BATCH_FILL_TIME,
        max_events: int = MAX_BATCH_EVENTS,
        dead_retention: float | None = None,
        on_result: Callable[[str], None] | None = None,
    ) -> None:
        #: Told each POST's result: ``delivered``, ``failed`` or ``dead_lettered``.
        self.on_result = on_result
        self.outbox = outbox
        #: Where endpoints are looked up (a fixed list becomes a directory of its own).
        self.directory = (
            endpoints if isinstance(endpoints, WebhookDirectory)
            else WebhookDirectory(list(endpoints), clock)
        )
        self.node = node
        self.clock = clock
        self.pool = pool
        self.ready = ready
        self.interval = interval
        self.lease_for = lease_for
        self.concurrency = concurrency
        self.timeout = timeout
        self.fill_time = fill_time
        self.max_events = max_events
        self.dead_retention = dead_retention
        self._agent = agent
        # Sends under way per endpoint name (a name is dropped once it has none).
        self._in_flight: Counter[str] = Counter()
        self._sending: set[Deferred[None]] = set()
        self._polling = False
        self._loop: LoopingCall | None = None
        self._trimmer: LoopingCall | None = None
        self._waiting: Deferred[Any] | None = None
        self._restart: Any = None

    # -- the service --------------------------------------------------------------

    def startService(self) -> None:  # noqa: N802
        super().startService()
        if self.ready is None:
            self._start_loop()
            return
        self._waiting = self.ready()
        self._waiting.addCallback(lambda _: self._start_loop() if self.running else None)
        self._waiting.addErrback(lambda f: log.failure("webhooks not started", f))

    #: Seconds between deletions of dead batches older than ``dead_retention``.
    trim_interval = 3600.0

    #: Seconds before starting again when the stores did not answer at start.
    start_retry = 1.0

    def _start_loop(self) -> Deferred[None]:
        """Take back this node's own leases (it is starting: nothing of it is in
        flight), then poll every ``interval`` seconds."""
        self._restart = None
        d = Deferred.fromCoroutine(self._reclaim_and_loop())
        d.addErrback(self._start_failed)
        return d

    def _start_failed(self, failure: Failure) -> None:
        if failure.check(StoreUnavailable):
            if not self.running:
                return  # stopping: the stores closed under the start
            # Redis went away while the node started: try again.
            log.warn("webhook dispatcher waits for the stores: {why}",
                     why=failure.getErrorMessage())
            self._restart = self.clock.callLater(self.start_retry, self._start_loop)
            return
        log.failure("webhook dispatcher stopped", failure)

    async def _reclaim_and_loop(self) -> None:
        count = await self.outbox.reclaim(self.node)
        if count:
            log.info("took back {count} webhook batches leased before a restart", count=count)
        if not self.running:
            return
        self._loop = LoopingCall(self.poll)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("webhook dispatcher stopped", f)
        )
        if self.dead_retention is not None:
            self._trimmer = LoopingCall(self._trim)
            self._trimmer.clock = self.clock
            self._trimmer.start(self.trim_interval, now=True)

    def _trim(self) -> Deferred[None]:
        assert self.dead_retention is not None
        d = self.outbox.trim(self.clock.seconds() - self.dead_retention)

        def trimmed(count: int) -> None:
            if count:
                log.info("deleted {count} dead webhook batches past retention", count=count)

        d.addCallback(trimmed)
        d.addErrback(lambda f: log.warn("trimming dead webhook batches failed: {why}",
                                        why=f.getErrorMessage()))
        return d

    def stopService(self) -> Deferred[Any]:  # noqa: N802
        super().stopService()
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        for loop in (self._loop, self._trimmer):
            if loop is not None and loop.running:
                loop.stop()
        # Sends end within their timeout; their leases run out if the stores close first.
        done = DeferredList(list(self._sending), consumeErrors=True)

        def close(_: object) -> Any:
            return self.pool.closeCachedConnections() if self.pool is not None else None

        return done.addCallback(close)

    def busy(self) -> dict[str, int]:
        """The POSTs under way, per endpoint name (endpoints with none are left out)."""
        return {name: n for name, n in self._in_flight.items() if n > 0}

    def idle(self) -> Deferred[Any]:
        """Fires once every send started so far has been recorded."""
        return DeferredList(list(self._sending), consumeErrors=True)

    # -- one round ----------------------------------------------------------------

    def poll(self) -> Deferred[None]:
        """Lease what is due (within each endpoint's free slots) and start sending it."""
        if self._polling:
            return succeed(None)
        limits = {
            name: self.concurrency - self._in_flight[name]
            for name in self.directory.names()
            if self._in_flight[name] < self.concurrency
        }
        if not limits:
            return succeed(None)
        self._polling = True
        now = self.clock.seconds()
        d = self.outbox.lease_due(
            self.node, now, limits, self.lease_for, self.fill_time, self.max_events
        )

        def leased(batches: list[WebhookBatch]) -> None:
            if not self.running and self._loop is not None:
                return  # stopping: the leases run out, or come back at the next start
            for batch in batches:
                self._start(batch)

        def done(result: object) -> None:
            self._polling = False

        d.addCallback(leased)
        d.addErrback(lambda f: log.failure("could not lease webhook batches", f))
        return d.addBoth(done)

    def _start(self, batch: WebhookBatch) -> None:
        endpoint = self.directory.get(batch.endpoint)
        if endpoint is None:
            return  # removed meanwhile: its lease runs out (a removal drops the batch)
        self._in_flight[endpoint.name] += 1
        d = Deferred.fromCoroutine(self._send(endpoint, batch))
        self._sending.add(d)

        def finished(result: object) -> None:
            self._sending.discard(d)
            self._in_flight[endpoint.name] -= 1
            if self._in_flight[endpoint.name] <= 0:
                del self._in_flight[endpoint.name]

        d.addErrback(lambda f: log.failure("webhook batch {id} not recorded", f, id=batch.id))
        d.addBoth(finished)

    async def _send(self, endpoint: WebhookEndpoint, batch: WebhookBatch) -> None:
        try:
            status = await self._post(endpoint, batch)
        except _Failed as e:
            await self._failed(endpoint, batch, str(e), e.retry_after)
            return
        except Exception as e:  # noqa: BLE001 - every error is a failed attempt
            await self._failed(endpoint, batch, describe_error(e), None)
            return
        if status == 410:
            log.warn(
                "webhook endpoint {endpoint} answered 410 Gone: disabled", endpoint=endpoint.name
            )
            await self.outbox.disable(endpoint.name, "HTTP 410 Gone", self.clock.seconds())
            await self.outbox.dead_letter(
                batch.id, self.node, "HTTP 410 Gone: endpoint disabled", self.clock.seconds()
            )
            self._tell("dead_lettered")
            return
        await self.outbox.ack(batch.id)
        self._tell("delivered")

    def _tell(self, result: str) -> None:
        if self.on_result is not None:
            self.on_result(result)

    async def _post(self, endpoint: WebhookEndpoint, batch: WebhookBatch) -> int:
        """POST ``batch``; its status when 2xx or 410, else raises :class:`_Failed`."""
        response = await post_signed(
            self._agent, self.clock, endpoint, batch.id, batch.body.encode("utf-8"),
            self.timeout,
        )
        status = int(response.code)
        if 200 <= status < 300 or status == 410:
            return status
        retry_after = None
        if status in (429, 503):
            values = response.headers.getRawHeaders(b"retry-after") or [None]
            raw = values[0]
            text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
            retry_after = parse_retry_after(text, self.clock.seconds())
        raise _Failed(f"HTTP {status}", retry_after)

    async def _failed(
        self, endpoint: WebhookEndpoint, batch: WebhookBatch, error: str, retry_after: float | None
    ) -> None:
        now = self.clock.seconds()
        decision = after_failure(
            batch.created, batch.attempts + 1, now, endpoint.retry_schedule, retry_after
        )
        if isinstance(decision, GiveUp):
            log.warn(
                "webhook batch {id} to {endpoint} dead-lettered after {attempts} attempts: {error}",
                id=batch.id, endpoint=endpoint.name, attempts=batch.attempts + 1, error=error,
            )
            await self.outbox.dead_letter(batch.id, self.node, error, now)
            self._tell("dead_lettered")
            return
        await self.outbox.retry(batch.id, self.node, decision.due, error)
        self._tell("failed")


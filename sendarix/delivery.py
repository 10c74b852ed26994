"""The delivery agent: leases due deliveries from the spool and sends them out.

Every ``poll_interval`` seconds :class:`DeliveryService` leases what is due (no more than
its bounded window of deliveries in flight has room for), groups the leased deliveries
by destination domain and runs each group on its own: route it (MX lookup; the
simulator domain never leaves the process), hand up to ``max_messages_per_connection``
messages to one egress session per hop, and try the next hop at once when a hop held
no session (connection refused, or 421 before any transaction).  Each recipient's
reply is classified (delivered, deferred, bounced), deferred recipients are rescheduled
or expired by the retry schedule, and the outcome is recorded with ``ISpool.complete``,
then reported as one event per recipient (DESIGN.md sections 3, 5, 7, 9 and 12).

Errors in one group are logged and its leases given back; they never stop the loop.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from attrs import frozen
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    DeferredSemaphore,
    gatherResults,
    maybeDeferred,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from sendarix import egress
from sendarix.classify import BounceRules, Classification, Verdict, classify
from sendarix.config import Config
from sendarix.events import Event
from sendarix.interfaces import IEventSink, IRouter, ISpool, ISuppressionStore
from sendarix.model import (
    LeasedDelivery,
    RecipientOutcome,
    RecipientRecord,
    RecipientStatus,
    Reply,
    TLSInfo,
)
from sendarix.providers import ProviderTable
from sendarix.routing.mx import Hop, RouteError
from sendarix.schedule import RetrySchedule
from sendarix.window import DestinationWindow

__all__ = ["DeliveryService", "simulate"]

log = Logger()

#: The ``mx`` of events for simulated deliveries.
SIMULATOR_MX = "simulator"
#: Seconds a stopping service waits for groups in flight before it lets go.
STOP_GRACE = 30.0


@frozen
class _Attempt:
    """What one attempt did for one recipient, with where it went."""

    record: RecipientRecord
    reply: Reply
    mx: str | None = None
    mx_ip: str | None = None
    source_ip: str | None = None
    tls: TLSInfo | None = None


def simulate(local_part: str, attempt: int) -> Reply | None:
    """The reply the simulator gives a recipient's ``attempt``-th attempt (1-based),
    by local part (DESIGN.md section 12); None means the recipient is suppressed."""
    kind = local_part.lower().split("+", 1)[0]
    if kind == "suppressed":
        return None
    if kind == "bounce":
        return Reply(550, "5.1.1", "simulated bounce: no such user")
    if kind == "defer" and attempt <= 1:
        return Reply(421, "4.7.0", "simulated deferral: try again later")
    if kind == "greylist" and attempt <= 1:
        return Reply(450, "4.2.0", "simulated greylisting: greylisted, try again later")
    if kind == "timeout":
        return Reply(451, "4.4.2", "simulated timeout waiting for the server")
    return Reply(250, "2.0.0", "simulated delivery: OK")


def _route_reply(error: RouteError) -> Reply:
    if error.permanent:
        code = 550 if error.enhanced.startswith("5.1.") else 554
        return Reply(code, error.enhanced, error.reason)
    return Reply(451, error.enhanced, error.reason)


def _held_no_session(result: egress.SessionResult) -> bool:
    """True when the hop refused us before any transaction: a connect error, or a 421
    (greeting or EHLO) that every message got as its only reply."""
    if result.connect_error is not None:
        return True
    replies = [m.message_reply for m in result.results]
    first = replies[0] if replies else None
    if first is None or first.code != 421:
        return False
    return all(
        m.message_reply == first and all(r.reply == first for r in m.recipients)
        for m in result.results
    )


class DeliveryService(Service):
    """Delivers what the spool has due, forever, until stopped.

    @param ready: a callable returning a Deferred that fires once the stores are open;
        the loop starts after it (None: at once).
    @param window: the most leased deliveries in flight at a time.
    """

    name = "delivery"

    def __init__(
        self,
        config: Config,
        spool: ISpool,
        events: IEventSink,
        suppressions: ISuppressionStore,
        router: IRouter,
        reactor: Any,
        *,
        ready: Callable[[], Deferred[Any]] | None = None,
        poll_interval: float = 0.5,
        window: int = 100,
        rules: BounceRules | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self.events = events
        self.suppressions = suppressions
        self.router = router
        self.reactor = reactor
        self.poll_interval = poll_interval
        self.window = window
        self.rules = rules if rules is not None else BounceRules.default()
        self.schedule = RetrySchedule.from_config(config.delivery)
        self.rng = rng if rng is not None else random.Random()
        self._ready = ready
        self._destinations: dict[str, DestinationWindow] = {}
        # MX host → provider name, for the events' ``provider`` field.
        self.providers = ProviderTable.default().merged(config.providers)
        self._loop: LoopingCall | None = None
        self._active = 0
        self._polling: Deferred[Any] | None = None
        self._wake_missed = False
        self._running: set[Deferred[Any]] = set()
        self._groups = DeferredSemaphore(config.delivery.concurrency)
        self._trust_root: Any = None
        if config.delivery.ca_file:
            with open(config.delivery.ca_file, "rb") as f:
                self._trust_root = ssl.Certificate.loadPEM(f.read())

    # -- lifecycle ----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._ready is None:
            self._start_loop()
            return
        d = self._ready()
        d.addCallback(lambda _: self._start_loop())
        d.addErrback(lambda f: log.failure("delivery not started", f))

    def _start_loop(self) -> None:
        if not self.running:
            return
        # A node restarting under its own name takes back the leases its previous
        # life held at once, rather than waiting for them to expire (DESIGN.md 15).
        d = maybeDeferred(self.spool.reclaim, self.config.node.name)
        d.addCallback(self._reclaimed)
        d.addErrback(self._failed, "reclaiming our own leases failed")
        d.addBoth(lambda _: self._begin_polling())

    def _reclaimed(self, count: Any) -> None:
        if count:
            log.info("took back {count} leases held by a previous run", count=count)

    def _begin_polling(self) -> None:
        if not self.running or self._loop is not None:
            return
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(self.poll_interval, now=True)

    def stopService(self) -> Deferred[Any]:
        """Stop polling; wait (at most ``STOP_GRACE`` seconds) for groups in flight.
        Leases of anything not finished simply expire."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        pending = list(self._running)
        if self._polling is not None:
            pending.append(self._polling)
        if not pending:
            return Deferred.fromCoroutine(_nothing())
        done: Deferred[Any] = DeferredList(pending, consumeErrors=True)
        out: Deferred[None] = Deferred()
        def give_up() -> None:
            if not out.called:
                out.callback(None)

        timer = self.reactor.callLater(STOP_GRACE, give_up)

        def finished(_: Any) -> None:
            if timer.active():
                timer.cancel()
            if not out.called:
                out.callback(None)

        done.addBoth(finished)
        return out

    def _failed(self, failure: Failure, what: str, **kw: Any) -> None:
        # While the node stops, the stores close under groups still in flight: that is
        # expected (their leases expire), not an error worth a traceback.
        if self.running:
            log.failure(what, failure, **kw)
        else:
            log.info(what + " while stopping: {why}", why=failure.getErrorMessage(), **kw)

    # -- the loop -----------------------------------------------------------------

    def wake(self) -> None:
        """New mail is queued: poll now rather than at the next interval.  Wakes while
        a poll is in flight (or the window is full) are folded into one more poll
        when it ends (or when a group finishes)."""
        if self._loop is not None:
            self._tick()

    def _tick(self) -> None:
        # Never return the Deferred: a failing poll must not stop the LoopingCall.
        if self._polling is not None or self.window - self._active <= 0:
            self._wake_missed = True
            return
        self._wake_missed = False
        free = self.window - self._active
        now = self.reactor.seconds()
        d = self.spool.lease_due(
            self.config.node.name, now, free, self.config.spool.lease_time
        )
        self._polling = d
        d.addCallback(self._dispatch)
        d.addErrback(self._failed, "leasing due deliveries failed")

        def done(_: Any) -> None:
            self._polling = None
            if self._wake_missed:
                self.wake()

        d.addBoth(done)

    def _dispatch(self, leased: list[LeasedDelivery]) -> None:
        if not self.running:
            return  # leased as the node stopped: the leases expire (or are reclaimed)
        groups: dict[str, list[LeasedDelivery]] = {}
        for delivery in leased:
            groups.setdefault(delivery.domain, []).append(delivery)
        for domain, deliveries in groups.items():
            self._active += len(deliveries)
            d = self._groups.run(self._group, domain, deliveries)
            self._running.add(d)

            def finished(_: Any, d: Deferred[Any] = d, n: int = len(deliveries)) -> None:
                self._running.discard(d)
                self._active -= n
                if self._wake_missed:
                    self.wake()

            d.addBoth(finished)

    # -- one domain ---------------------------------------------------------------

    def _group(self, domain: str, deliveries: list[LeasedDelivery]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._run_group(domain, deliveries))

    async def _run_group(self, domain: str, deliveries: list[LeasedDelivery]) -> None:
        """Deliver one domain's leased deliveries; errors release the unfinished ones."""
        pending = list(deliveries)
        try:
            if domain.lower() == self.config.simulator.domain.lower():
                for delivery in deliveries:
                    await self._simulate(delivery)
                    pending.remove(delivery)
                return
            route = await self.router.route(domain)
            window = self._window_for(domain)
            if route.error is None and window.is_dead(self.reactor.seconds()):
                # Repeated connection failures: defer at once instead of timing out
                # once per message (Postfix's "dead destination").
                reply = Reply(451, "4.4.1", f"{domain}: destination not responding, suspended")
                for delivery in deliveries:
                    await self._finish(delivery, [_Attempt(r, reply) for r in delivery.recipients])
                    pending.remove(delivery)
                return
            if route.error is not None:
                reply = _route_reply(route.error)
                for delivery in deliveries:
                    await self._finish(delivery, [_Attempt(r, reply) for r in delivery.recipients])
                    pending.remove(delivery)
                return
            size = self.config.delivery.max_messages_per_connection
            renewer = self._renew_while_running(pending)
            try:
                for i in range(0, len(deliveries), size):
                    if not window.try_acquire(self.reactor.seconds()):
                        # The destination's window is full: hand the rest back; the
                        # next poll leases them again.
                        for delivery in list(pending):
                            pending.remove(delivery)
                            await self._release(delivery)
                        return
                    try:
                        await self._send_batch(
                            route.hops, deliveries[i : i + size], pending, window
                        )
                    except Exception:
                        window.release()
                        raise
            finally:
                if renewer.running:
                    renewer.stop()
        except Exception:
            self._failed(Failure(), "delivery to {domain} failed", domain=domain)
            for delivery in pending:
                await self._release(delivery)

    async def _release(self, delivery: LeasedDelivery) -> None:
        try:
            await self.spool.release(delivery.queue_id, delivery.domain, self.config.node.name)
        except Exception:
            self._failed(Failure(), "releasing {queue_id} failed", queue_id=delivery.queue_id)

    def _window_for(self, domain: str) -> DestinationWindow:
        window = self._destinations.get(domain)
        if window is None:
            concurrency = self.config.delivery.concurrency
            window = DestinationWindow(initial=min(5, concurrency), maximum=concurrency)
            self._destinations[domain] = window
        return window

    def _renew_while_running(self, pending: list[LeasedDelivery]) -> LoopingCall:
        """Renew the leases of ``pending`` deliveries every third of the lease time, so
        a long delivery is not taken over by another node."""
        lease_time = self.config.spool.lease_time
        node = self.config.node.name

        def renew() -> Deferred[Any]:
            expires = self.reactor.seconds() + lease_time
            return DeferredList(
                [self.spool.renew(d.queue_id, d.domain, node, expires) for d in list(pending)],
                consumeErrors=True,
            )

        loop = LoopingCall(renew)
        loop.clock = self.reactor
        loop.start(lease_time / 3.0, now=False).addErrback(
            lambda f: self._failed(f, "renewing leases failed")
        )
        return loop

    async def _send_batch(
        self,
        hops: Sequence[Hop],
        batch: list[LeasedDelivery],
        pending: list[LeasedDelivery],
        window: DestinationWindow | None = None,
    ) -> None:
        """One session (per hop tried) for up to ``max_messages_per_connection`` messages;
        each delivery leaves ``pending`` once it is settled."""
        messages: list[egress.OutboundMessage] = []
        sending: list[LeasedDelivery] = []
        # All bodies at once: the reads share one database round trip.
        bodies = await gatherResults(
            [maybeDeferred(self.spool.body, d.queue_id) for d in batch], consumeErrors=True
        )
        for delivery, body in zip(batch, bodies):
            if body is None:
                # Deleted while leased: nothing to send, nothing to record.
                pending.remove(delivery)
                await self._release(delivery)
                continue
            envelope = delivery.envelope
            messages.append(
                egress.OutboundMessage(
                    queue_id=delivery.queue_id,
                    sender=envelope.sender,
                    recipients=tuple(r.address for r in delivery.recipients),
                    body=body,
                    smtputf8=envelope.smtputf8,
                    eight_bit=(envelope.body or "").upper() in ("8BITMIME", "BINARYMIME"),
                )
            )
            sending.append(delivery)
        if not sending:
            if window is not None:
                window.release()
            return
        dc = self.config.delivery
        result: egress.SessionResult | None = None
        hop: Hop | None = None
        for hop in hops:
            result = await egress.deliver(
                self.reactor,
                hop.address,
                hop.port,
                messages,
                helo=self.config.node.hostname,
                tls=dc.tls,
                tls_hostname=hop.host,
                trust_root=self._trust_root,
                connect_timeout=dc.connect_timeout,
                command_timeout=dc.command_timeout,
            )
            if not _held_no_session(result):
                break
            log.info(
                "{host} ({address}) held no session: {reply}",
                host=hop.host, address=hop.address,
                reply=result.connect_error or result.results[0].message_reply,
            )
        assert result is not None and hop is not None  # a Route without error has hops
        if window is not None:
            if _held_no_session(result):
                window.failure(self.reactor.seconds())
            else:
                window.success()
        by_id = {m.queue_id: m for m in result.results}

        async def settle(delivery: LeasedDelivery) -> None:
            message = by_id[delivery.queue_id]
            replies = {r.address: r.reply for r in message.recipients}
            attempts = [
                _Attempt(
                    record,
                    replies[record.address],
                    mx=hop.host,
                    mx_ip=result.mx_ip,
                    source_ip=result.source_ip,
                    tls=result.tls,
                )
                for record in delivery.recipients
            ]
            await self._finish(delivery, attempts)
            pending.remove(delivery)

        # Settled together, the outcomes and events of a session share their commits.
        await gatherResults(
            [Deferred.fromCoroutine(settle(d)) for d in sending], consumeErrors=True
        )

    async def _simulate(self, delivery: LeasedDelivery) -> None:
        attempts: list[_Attempt] = []
        suppressed: list[RecipientRecord] = []
        for record in delivery.recipients:
            reply = simulate(record.address.rsplit("@", 1)[0], record.attempts + 1)
            if reply is None:
                suppressed.append(record)
            else:
                attempts.append(_Attempt(record, reply, mx=SIMULATOR_MX))
        await self._finish(delivery, attempts, suppressed)
        for a in attempts:
            local = a.record.address.rsplit("@", 1)[0].lower().split("+", 1)[0]
            if local == "complaint" and a.reply.code // 100 == 2:
                await self._emit("complained", delivery, a, None)
                await self._suppress(delivery, a.record.address, "complaint", "simulated complaint")

    # -- outcomes -----------------------------------------------------------------

    async def _finish(
        self,
        delivery: LeasedDelivery,
        attempts: list[_Attempt],
        suppressed: Sequence[RecipientRecord] = (),
    ) -> None:
        """Classify, record with ``complete``, then emit events and suppress."""
        now = self.reactor.seconds()
        soft = self.config.delivery.soft_bounce_codes
        outcomes: list[RecipientOutcome] = []
        reports: list[tuple[str, _Attempt, Classification | None]] = []
        for a in attempts:
            c = classify(a.reply, self.rules, soft)
            if c.verdict is Verdict.DELIVERED:
                outcomes.append(
                    RecipientOutcome(a.record.address, RecipientStatus.DELIVERED, a.reply)
                )
                reports.append(("delivered", a, c))
            elif c.verdict is Verdict.BOUNCED:
                outcomes.append(
                    RecipientOutcome(a.record.address, RecipientStatus.BOUNCED, a.reply)
                )
                reports.append(("bounced", a, c))
            else:
                when = self.schedule.next_attempt(
                    a.record.attempts + 1, delivery.meta.received_at, now, self.rng, c
                )
                if when is None:
                    outcomes.append(
                        RecipientOutcome(a.record.address, RecipientStatus.EXPIRED, a.reply)
                    )
                    reports.append(("expired", a, c))
                else:
                    outcomes.append(
                        RecipientOutcome(a.record.address, RecipientStatus.DEFERRED, a.reply, when)
                    )
                    reports.append(("deferred", a, c))
        for record in suppressed:
            outcomes.append(RecipientOutcome(record.address, RecipientStatus.SUPPRESSED))
        await self.spool.complete(
            delivery.queue_id, delivery.domain, self.config.node.name, outcomes, now
        )
        for kind, a, cl in reports:
            await self._emit(kind, delivery, a, cl)
            if kind in ("bounced", "expired") and self._suppresses(delivery.meta.tenant):
                source = "bounce" if kind == "bounced" else "expired"
                await self._suppress(delivery, a.record.address, source, str(a.reply.code)
                                     + (f" {a.reply.enhanced}" if a.reply.enhanced else "")
                                     + f" {a.reply.text}")
        for record in suppressed:
            await self._emit("suppressed", delivery, _Attempt(record, Reply(0, None, "")), None)

    def _suppresses(self, tenant: str) -> bool:
        if not self.config.delivery.hard_bounce_suppresses:
            return False
        tenant_config = self.config.tenants.get(tenant)
        return tenant_config is None or tenant_config.suppress_hard_bounces

    async def _suppress(
        self, delivery: LeasedDelivery, address: str, source: str, reason: str
    ) -> None:
        try:
            await self.suppressions.add(
                delivery.meta.tenant, address, reason[:500], source, self.reactor.seconds()
            )
        except Exception:
            self._failed(Failure(), "suppressing {address} failed", address=address)

    async def _emit(
        self, kind: str, delivery: LeasedDelivery, a: _Attempt, c: Classification | None
    ) -> None:
        meta = delivery.meta
        response = a.reply if a.reply.code else None
        event = Event.make(
            kind,
            self.reactor.seconds(),
            queue_id=delivery.queue_id,
            message_id=meta.message_id,
            tenant=meta.tenant,
            sender=delivery.envelope.sender,
            recipient=a.record.address,
            attempt=a.record.attempts + 1 if response is not None else None,
            response=response,
            mx=a.mx,
            mx_ip=a.mx_ip,
            source_ip=a.source_ip,
            tls=a.tls,
            provider=self.providers.provider_for(a.mx) if a.mx else None,
            bounce_category=c.category if c is not None and kind != "delivered" else None,
            tags=meta.tags,
            node=self.config.node.name,
        )
        try:
            await maybeDeferred(self.events.emit, event)
        except Exception:
            self._failed(Failure(), "emitting a {kind} event failed", kind=kind)


async def _nothing() -> None:
    return None

"""The delivery agent: leases due deliveries from the spool and sends them out.

Every ``poll_interval`` seconds :class:`DeliveryService` leases what is due (no more
than its bounded window of deliveries held has room for, leaving in the spool the mail
of sites whose ready queue is full), groups the leased deliveries by destination domain
and routes each group (MX lookup, smarthost pool, or the simulator: mail to its domain
and all sandbox mail, answered inside the process).  Routed deliveries wait in their
site's ready queue (:mod:`sendarix.scheduler.ready`), their leases renewed; one drainer
per site sends them, up to ``max_messages_per_connection`` per session, over the hop's
transport (SMTP, or the simulator), as the site's window, connection cap and rate
admit, trying the next hop at once when a hop held no session
(connection refused, or 421 before any transaction).  Each recipient's reply is
classified (delivered, deferred, bounced), deferred recipients are rescheduled or
expired by the retry schedule, and the outcome is recorded with ``ISpool.complete``,
then reported as one event per recipient (docs/delivery.md, docs/routing.md).

Errors in one group or connection are logged and its leases given back; they never
stop the loop.  A stop hands queued deliveries back to the spool at once.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

from attrs import define, frozen
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    DeferredSemaphore,
    FirstError,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sendarix.config.settings import Config, EgressSourceConfig, RouteConfig
from sendarix.egress import client as egress
from sendarix.egress.simulator import FeedbackReader, SimulatorRouter, SimulatorTransport
from sendarix.egress.sources import TieredSelector
from sendarix.events.guard import hold_key
from sendarix.interfaces import (
    IActiveQueue,
    IDeliveryObserver,
    IDestinationControl,
    IEgressSelector,
    IEventSink,
    IFailoverStrategy,
    IRouter,
    ISelectiveLease,
    ISiteSuspensions,
    ISpool,
    ISuppressionStore,
    IThrottle,
    ITransport,
)
from sendarix.model.event import Event
from sendarix.model.message import (
    Lease,
    LeasedDelivery,
    NewMessage,
    Reply,
)
from sendarix.model.session import (
    SIMULATOR_TRANSPORT,
    SMTP_TRANSPORT,
    Hop,
    OutboundMessage,
    SessionOptions,
    SessionResult,
)
from sendarix.routing.mx import RouteError
from sendarix.routing.pool import OrderedFallback
from sendarix.routing.providers import ProviderTable
from sendarix.routing.rules import SIMULATOR_ROUTE, RouteFacts, RuleRouter, RuleTable
from sendarix.routing.shaping import POOL_PREFIX, Shaping, SiteShape, strictest_tls
from sendarix.routing.state import read_state, write_state
from sendarix.routing.throttle import MemoryThrottle
from sendarix.scheduler.classify import BounceRules, classify
from sendarix.scheduler.core import (
    DRAIN_NAP,
    DeferSite,
    Release,
    Route,
    Scheduler,
    WaitUntil,
    dead_until,
    pause_reply,
)
from sendarix.scheduler.outcome import (
    Attempt,
    OutcomeRules,
    Suppress,
    plan_outcomes,
)
from sendarix.scheduler.retry import RetrySchedule
from sendarix.scheduler.window import WindowSlot
from sendarix.stores.errors import LeaseLost, StoreUnavailable

__all__ = ["DeliveryService"]

log = Logger()

#: Seconds a stopping service waits for groups in flight before it lets go.
STOP_GRACE = 30.0
#: The longest a connection waits for its site's rate to admit one more message;
#: beyond it the session ends and the rest of the batch goes back to the ready queue.
MAX_PACE_WAIT = 2.0
#: Failed connection attempts (nothing sent) a queued delivery gets before it is
#: handed back to the spool.
MAX_FAILURES = 5
#: The source name in per-source throttle keys when no [[egress.source]] is used.
SYSTEM_SOURCE = "system"
#: Seconds between two writes of the routing state file.
STATE_INTERVAL = 5.0
#: Seconds between reads of the suspensions shared by the nodes and workers.
SUSPENSION_SYNC = 2.0
#: Bodies of fresh mail kept in memory for its first delivery attempt (the active
#: queue), at most this many octets in all; larger mail is read back from the spool.
BODY_CACHE_OCTETS = 32 * 1024 * 1024
#: ...and a body larger than this is never kept.
BODY_CACHE_MAX = 1024 * 1024
#: Seconds an egress session rests open after its last message, for the next
#: delivery to the same server (Postfix's connection cache keeps them 2 s).
SESSION_REST = 2.0
#: Deliveries deferred without a connection (a poll's group for a dead or paused
#: site or a held tenant, a route that failed, a dead site's ready queue) are
#: deferred this many at a time: their outcomes and events share commits (well under
#: the spool's batch of 512 jobs), and the reactor gets a turn between groups.
DEFER_GROUP = 200


@frozen
class _GroupKey:
    """Deliveries handled together: the rule that routes them (-1: the default
    route), the egress pool they leave from (None: the system's address), the domain."""

    rule: int
    egress_pool: str | None
    domain: str


@define(eq=False)
class _Connection:
    """Where the deliveries of one group go: what their connections share."""

    key: _GroupKey
    site: str
    shape: SiteShape
    hops: tuple[Hop, ...]
    strategy: IFailoverStrategy


@frozen
class _Ready:
    """A leased, routed delivery waiting in its site's ready queue."""

    conn: _Connection
    delivery: LeasedDelivery


def _route_reply(error: RouteError) -> Reply:
    if error.permanent:
        code = 550 if error.enhanced.startswith("5.1.") else 554
        return Reply(code, error.enhanced, error.reason)
    return Reply(451, error.enhanced, error.reason)


def _refused_421(result: SessionResult) -> bool:
    """True when the hop answered (greeting, EHLO or every message) with 421."""
    if result.connect_error is not None or not result.results:
        return False
    first = result.results[0].message_reply
    return first is not None and first.code == 421


def _held_no_session(result: SessionResult) -> bool:
    """True when the hop refused us before any transaction: a connect error, no
    greeting (closed or timed out first), or a 421 (greeting or EHLO) that every
    message got as its only reply."""
    if result.connect_error is not None or not result.greeted:
        return True
    replies = [m.message_reply for m in result.results]
    first = replies[0] if replies else None
    if first is None or first.code != 421:
        return False
    return all(
        m.message_reply == first and all(r.reply == first for r in m.recipients)
        for m in result.results
    )


def _put_back(
    deliveries: Sequence[LeasedDelivery],
    pending: list[LeasedDelivery],
    back: list[LeasedDelivery],
) -> None:
    """Move ``deliveries`` from a connection's ``pending`` list to ``back`` (the site's
    ready queue takes them again, leases kept)."""
    for delivery in deliveries:
        pending.remove(delivery)
        back.append(delivery)


@implementer(IDestinationControl, IActiveQueue)
class DeliveryService(Service):
    """Delivers what the spool has due, forever, until stopped.

    :param ready: a callable returning a Deferred that fires once the stores are open;
        the loop starts after it (None: at once).
    :param window: the most leased deliveries in flight at a time.
    :param feedback: reads the abuse reports the simulator sends back for its
        ``complaint`` recipients (the node's feedback handler; None: none come back).
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
        routers: Mapping[str, tuple[IRouter, IFailoverStrategy]] | None = None,
        throttle: IThrottle | None = None,
        selector: IEgressSelector | None = None,
        state_file: str | None = None,
        observer: IDeliveryObserver | None = None,
        feedback: FeedbackReader | None = None,
        suspensions: ISiteSuspensions | None = None,
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
        #: The envelope sender a delivery goes out with (a tenant's VERP return path,
        #: or the sender as given).
        self.return_path: Callable[[LeasedDelivery], str] = lambda d: d.envelope.sender
        #: Tells senders of final failures (DSNs); set by the node once intake exists.
        self.notifier: Any = None
        #: hold key (a tenant, or ``tenant/provider``) -> why that mail is held (kept
        #: current by the complaint guard).
        self.held_tenants: dict[str, str] = {}
        self.schedule = RetrySchedule.from_config(config.delivery)
        self.rng = rng if rng is not None else random.Random()
        self._ready = ready
        # MX host → provider name (events' ``provider``), and the shaping key (site).
        self.providers = ProviderTable.default().merged(config.providers)
        self.outcome_rules = OutcomeRules(
            rules=self.rules, soft_codes=config.delivery.soft_bounce_codes,
            schedule=self.schedule, node=config.node.name, suppresses=self._suppresses,
            provider_for=self.providers.provider_for,
        )
        # [[route]] rules over via → (router, failover strategy); "mx" is ``router``;
        # sandbox mail and the simulator domain's go to the simulator.
        self.routes = RuleRouter(
            RuleTable(config.routes),
            {
                "mx": (router, OrderedFallback()),
                SIMULATOR_ROUTE.via: (SimulatorRouter(), OrderedFallback()),
                **(routers or {}),
            },
            simulator_domain=config.simulator.domain,
        )
        self.throttle: IThrottle = throttle if throttle is not None else MemoryThrottle()
        self.shaping = Shaping(self.providers, config.delivery)
        # None when no [[egress.source]] is configured: the system's address.
        self.selector: IEgressSelector | None = None
        if config.egress_sources:
            self.selector = (
                selector if selector is not None else TieredSelector(config.egress_sources)
            )
        self._egress_pools = set(config.egress_pools)
        # Where the routing state is written for `sendarix queue stats` (None: never).
        self.state_file = state_file
        #: Told of connections and rate waits (the metrics); None: nobody.
        self.observer = observer
        self._state_loop: LoopingCall | None = None
        #: Where operators' suspensions are shared with the other nodes and workers
        #: (None: this node only), read again every ``SUSPENSION_SYNC`` seconds.
        self.suspensions = suspensions
        self.suspension_sync = SUSPENSION_SYNC
        self._suspension_loop: LoopingCall | None = None
        #: Writes of suspensions not yet stored, and how many have been stored: a read
        #: that overlaps one must not undo what this node was just told.
        self._suspension_writes = 0
        self._suspension_stored = 0
        self._loop: LoopingCall | None = None
        # The lease poll and the ledger of leases held (renewed while held); routed
        # deliveries wait in their site's ready queue, which the scheduler owns.
        self.scheduler: Scheduler[_Ready] = Scheduler(
            window, gather_wait=config.delivery.gather_time,
            gather_target=config.delivery.gather_messages,
        )
        #: Whether clients are sending mail to this process right now (set by the
        #: node from its listeners; see :meth:`intake_quiet`).
        self.intake_busy: Callable[[], bool] = lambda: False
        self.ready_queues = self.scheduler.ready_queues
        self._drainers: dict[str, Deferred[None] | None] = {}
        self._wakeups: dict[str, Deferred[None]] = {}
        self._renewer: LoopingCall | None = None
        # When the resting sites were last looked up, and what they were.
        self._resting_sites: tuple[float, list[str]] = (float("-inf"), [])
        # Failed connection attempts per delivery that was kept queued.
        self._failures: dict[tuple[str, str], int] = {}
        #: Spool traffic of the lease poll: deliveries leased, handed back unsent
        #: (released) and kept leased until their site has room (parked).
        self.counters = self.scheduler.counters
        self._polling: Deferred[Any] | None = None
        self._running: set[Deferred[Any]] = set()
        self._groups = DeferredSemaphore(config.delivery.concurrency)
        #: Take fresh mail from memory at its commit (the active queue); when False,
        #: every message waits for a lease poll and its body is read from the spool.
        self.active_queue = True
        #: Egress sessions resting between deliveries to the same server.
        self.sessions = egress.SessionCache(reactor, SESSION_REST)
        #: What carries a session to a hop, by the hop's ``transport``.
        self.transports: dict[str, ITransport] = {
            SMTP_TRANSPORT: egress.SmtpTransport(reactor, self.sessions),
            SIMULATOR_TRANSPORT: SimulatorTransport(reactor, feedback),
        }
        # The active queue: bodies of fresh mail handed over at its commit, by
        # (queue id, domain), until its first connection takes them.
        self._bodies: dict[tuple[str, str], bytes] = {}
        self._body_octets = 0
        self._trust_root: Any = None
        if config.delivery.ca_file:
            with open(config.delivery.ca_file, "rb") as f:
                self._trust_root = ssl.Certificate.loadPEM(f.read())

    # -- lifecycle ----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.sessions.open()
        self.scheduler.start()
        self._restore_state()
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
        # life held at once, rather than waiting for them to expire.
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
        self._renewer = LoopingCall(self._renew_held)
        self._renewer.clock = self.reactor
        self._renewer.start(self.config.spool.lease_time / 3.0, now=False).addErrback(
            lambda f: self._failed(f, "renewing leases stopped")
        )
        if self.suspensions is not None:
            self._suspension_loop = LoopingCall(self._sync_suspensions)
            self._suspension_loop.clock = self.reactor
            self._suspension_loop.start(self.suspension_sync, now=True).addErrback(
                lambda f: self._failed(f, "reading the suspended sites stopped")
            )
        if self.state_file is not None:
            self._state_loop = LoopingCall(self._write_state)
            self._state_loop.clock = self.reactor
            self._state_loop.start(STATE_INTERVAL, now=False).addErrback(
                lambda f: self._failed(f, "writing the routing state stopped")
            )

    def routing_state(self) -> dict[str, Any]:
        """What this node knows about sites, pool endpoints and egress sources (the
        routing state file's content)."""
        now = self.reactor.seconds()
        today = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
        sites = []
        for site, shape in sorted(self.shaping.sites.items()):
            entry = shape.describe(now)
            entry["queued"] = self.ready_queues.queued(site)
            entry["open"] = self.throttle.connections("conn:" + site)
            entry["held_until"] = self.scheduler.suspended_until(site, now)
            sites.append(entry)
        pools = {
            via[5:]: strategy.states(now)
            for via, (_, strategy) in self.routes.routers.items()
            if via.startswith("pool:")
        }
        egress_state: list[dict[str, object]] = []
        if self.selector is not None:
            egress_state = self.selector.snapshot(now, today)
        return {
            "node": self.config.node.name,
            "written_at": now,
            "sites": sites,
            "pools": pools,
            "egress": egress_state,
        }

    def suspend(self, site: str, until: float) -> None:
        """Send nothing to ``site`` (a provider name, an ``mx:`` or ``pool:`` key)
        before ``until``: its mail is deferred meanwhile.  In force here at once, and
        on the other nodes and workers of the stores within ``SUSPENSION_SYNC``
        seconds."""
        self._suspend_here(site, until)
        self._store_suspension(site, until)

    def resume(self, site: str) -> bool:
        """Lift ``site``'s suspension at once (here, and soon on the other nodes);
        False when it was not suspended."""
        resumed = self._resume_here(site)
        self._store_suspension(site, None)
        return resumed

    def _suspend_here(self, site: str, until: float) -> None:
        self.shaping.get(site)  # listed in the routing state from now on
        self.scheduler.suspend(site, until)
        log.info("site {site} suspended by the operator until {until}", site=site,
                 until=datetime.datetime.fromtimestamp(until, datetime.UTC).isoformat())
        self._kick(site)

    def _resume_here(self, site: str) -> bool:
        resumed = self.scheduler.resume(site)
        if resumed:
            log.info("site {site} resumed by the operator", site=site)
            self._kick(site)
        return resumed

    def _store_suspension(self, site: str, until: float | None) -> None:
        """Share a suspension (``until``) or its end (None) through the stores."""
        if self.suspensions is None:
            return
        self._suspension_writes += 1
        d = (self.suspensions.suspend(site, until) if until is not None
             else self.suspensions.resume(site))

        def stored(result: Any) -> Any:
            self._suspension_writes -= 1
            self._suspension_stored += 1
            return result

        d.addBoth(stored)
        d.addErrback(self._failed, "sharing the suspension of {site} failed", site=site)

    def _sync_suspensions(self) -> Deferred[None]:
        """Take up the suspensions other nodes made or lifted."""
        assert self.suspensions is not None
        now = self.reactor.seconds()
        quiet = self._suspension_writes == 0
        stored = self._suspension_stored
        d = self.suspensions.active(now)

        def apply(shared: dict[str, float]) -> None:
            if not (quiet and self._suspension_writes == 0
                    and stored == self._suspension_stored):
                # This node changed a suspension while the read ran: the read may
                # predate that write (and would undo it); the next one will not.
                return
            mine = self.scheduler.suspensions(self.reactor.seconds())
            for site, until in shared.items():
                if mine.get(site) != until:
                    self._suspend_here(site, until)
            for site in mine:
                if site not in shared:  # lifted elsewhere
                    self._resume_here(site)

        d.addCallback(apply)
        d.addErrback(self._failed, "reading the suspended sites failed")
        return d

    def _restore_state(self) -> None:
        """Take back today's warmup counts and the deprioritization marks from the
        routing state file a previous run of this node wrote (a small local file,
        read once at start)."""
        # A shared selector keeps its counts where it shares them: it takes nothing.
        if self.state_file is None or self.selector is None:
            return
        state = read_state(self.state_file)
        if state is None or state.get("node") != self.config.node.name:
            return
        written_at = state.get("written_at")
        entries = state.get("egress")
        if not isinstance(written_at, (int, float)) or not isinstance(entries, list):
            return
        today = datetime.datetime.fromtimestamp(self.reactor.seconds(), datetime.UTC).date()
        taken = self.selector.restore(entries, float(written_at), today)
        if taken:
            log.info("took back {n} warmup counts and marks from {path}",
                     n=taken, path=self.state_file)

    def _write_state(self) -> Deferred[Any]:
        assert self.state_file is not None
        d = deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), write_state, self.state_file,
            self.routing_state(),
        )
        d.addErrback(lambda f: self._failed(f, "writing the routing state failed"))
        return d

    def stopService(self) -> Deferred[Any]:
        """Stop polling; wait (at most ``STOP_GRACE`` seconds) for groups in flight.
        Leases of anything not finished simply expire."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._suspension_loop is not None and self._suspension_loop.running:
            self._suspension_loop.stop()
        self._suspension_loop = None
        if self._state_loop is not None and self._state_loop.running:
            self._state_loop.stop()
            # The last word, so a restart takes back today's counts and marks.
            try:
                write_state(self.state_file, self.routing_state())  # type: ignore[arg-type]
            except OSError:
                log.failure("writing the routing state at stop failed")
        self._state_loop = None
        if self._renewer is not None and self._renewer.running:
            self._renewer.stop()
        self._renewer = None
        for wakeup in list(self._wakeups.values()):
            wakeup.callback(None)
        # What waits in the ready queues goes back to the spool at once; what is
        # being sent finishes (within the grace period).
        for release in self.scheduler.stop(lambda ready: ready.delivery):
            released: Deferred[bool] = Deferred.fromCoroutine(self._release(release.delivery))
            self._running.add(released)
            released.addBoth(self._forget, released)
        if not self._running and self._polling is None:
            return self._close_transports()
        done = Deferred.fromCoroutine(self._stopping(self._polling))
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

    def _close_transports(self) -> Deferred[None]:
        d = DeferredList([t.close() for t in self.transports.values()], consumeErrors=True)
        return d.addCallback(lambda _: None)

    def _failed(self, failure: Failure, what: str, **kw: Any) -> None:
        # While the node stops, the stores close under groups still in flight: that is
        # expected (their leases expire), not an error worth a traceback.
        if isinstance(failure.value, FirstError):  # one of several reads at once
            failure = failure.value.subFailure
        if self.running and failure.check(StoreUnavailable):
            log.warn(what + ": {why}", why=failure.getErrorMessage(), **kw)
        elif self.running:
            log.failure(what, failure, **kw)
        else:
            log.info(what + " while stopping: {why}", why=failure.getErrorMessage(), **kw)

    # -- the active queue ---------------------------------------------------------

    def reserve(self, message: NewMessage) -> Lease | None:
        """Room in the window for fresh ``message``, due now: the lease its commit
        writes (then :meth:`take` or :meth:`cancel`), or None (enqueue it as usual)."""
        if self._loop is None or not self.running or not self.active_queue:
            return None
        now = self.reactor.seconds()
        if message.not_before is not None and message.not_before > now:
            return None
        domains = {_domain_of(a) for a in message.envelope.recipients}
        if not self.scheduler.reserve(
            len(domains), message.queue_id, domains, self._resting(now)
        ):
            return None
        return Lease(node=self.config.node.name, expires=now + self.config.spool.lease_time)

    def queued(self, message: NewMessage) -> None:
        """``message`` was committed to the spool without being handed over (no room
        for it, or not due yet): poll for it now, unless the poll would leave out
        every site it goes to."""
        if self._loop is None:
            return
        domains = {_domain_of(a) for a in message.envelope.recipients}
        if self.scheduler.queued(domains, self._resting(self.reactor.seconds())):
            self.wake()

    def take(self, message: NewMessage, deliveries: Sequence[LeasedDelivery]) -> None:
        """``message`` is durable with ``deliveries`` leased to us: route them now, the
        body from memory, as a lease poll would have."""
        count = len({_domain_of(a) for a in message.envelope.recipients})
        body = message.body
        if len(body) <= BODY_CACHE_MAX:
            for delivery in deliveries:
                if self._body_octets + len(body) > BODY_CACHE_OCTETS:
                    break
                self._bodies[(delivery.queue_id, delivery.domain)] = body
                self._body_octets += len(body)
        self._dispatch_actions(
            self.scheduler.handed(deliveries, count, self._group_key, message.queue_id)
        )

    def cancel(self, message: NewMessage) -> None:
        """The commit of a reserved message failed: free its room."""
        count = len({_domain_of(a) for a in message.envelope.recipients})
        if self.scheduler.unreserve(count, message.queue_id):
            self.wake()

    def _drop_body(self, delivery: LeasedDelivery) -> bytes | None:
        body = self._bodies.pop((delivery.queue_id, delivery.domain), None)
        if body is not None:
            self._body_octets -= len(body)
        return body

    # -- the loop -----------------------------------------------------------------

    def wake(self) -> None:
        """New mail is queued: poll now rather than at the next interval.  Wakes while
        a poll is in flight (or the window is full) are folded into one more poll
        when it ends (or when a group finishes)."""
        if self._loop is not None:
            self._tick()

    def _tick(self) -> None:
        # Never return the Deferred: a failing poll must not stop the LoopingCall.
        for site in self.ready_queues.sites():
            if site not in self._drainers:
                self._kick(site)
        now = self.reactor.seconds()
        lease = self.scheduler.poll(now, self._resting(now))
        if lease is None:
            return  # folded into one more poll when this one ends or a group settles
        node, lease_time = self.config.node.name, self.config.spool.lease_time
        # Mail of sites whose ready queue is full stays in the spool.
        if lease.skip_domains and ISelectiveLease.providedBy(self.spool):
            d = self.spool.lease_due_except(
                node, lease.now, lease.limit, lease_time, list(lease.skip_domains)
            )
        else:
            d = self.spool.lease_due(node, lease.now, lease.limit, lease_time)
        self._polling = d

        def done(result: Any) -> None:
            self._polling = None
            # A full poll (limited by one site's room) likely left more due, and
            # wakes while it ran asked for another: go on at once.
            leased = len(result) if isinstance(result, list) else 0
            if self.scheduler.poll_done(leased, lease.limit):
                self.wake()

        d.addCallback(self._dispatched)
        d.addErrback(self._failed, "leasing due deliveries failed")
        d.addBoth(done)

    def _resting(self, now: float) -> list[str]:
        """Sites this node sends nothing to now: dead (connections kept failing) or
        paused (sessions kept being refused with 421).  Looked up at most once per
        poll interval: every queued message wakes a poll, and there may be many sites."""
        at, sites = self._resting_sites
        if now - at >= self.poll_interval / 2 or now < at:
            sites = [
                site for site, shape in self.shaping.sites.items()
                if pause_reply(site, shape, now) is not None
            ]
            self._resting_sites = (now, sites)
        return sites

    async def _stopping(self, polling: Deferred[Any] | None) -> None:
        """Wait for the poll in flight, then for every group and connection, including
        those that poll started (its Deferred has its own errback), then close the
        resting sessions (and the simulator's pending reports)."""
        if polling is not None:
            await polling
        running = list(self._running)
        if running:
            await DeferredList(running, consumeErrors=True)
        await self._close_transports()

    def _dispatched(self, leased: list[LeasedDelivery]) -> list[LeasedDelivery]:
        self._dispatch(leased)
        return leased

    def _dispatch(self, leased: list[LeasedDelivery]) -> None:
        self._dispatch_actions(self.scheduler.leased(leased, self._group_key))

    def _dispatch_actions(self, actions: Sequence[Route | Release]) -> None:
        for action in actions:
            if isinstance(action, Release):
                # Leased while stopping: hand it back at once, so that another node
                # takes it now rather than when the lease expires.
                released: Deferred[bool] = Deferred.fromCoroutine(
                    self._release(action.delivery)
                )
                self._running.add(released)
                released.addBoth(self._forget, released)
                continue
            key = action.group
            assert isinstance(key, _GroupKey)
            d = self._groups.run(
                self._group, key, list(action.deliveries), action.poll, action.reserved
            )
            self._running.add(d)

            def finished(_: Any, d: Deferred[Any] = d, n: int = len(action.deliveries)) -> None:
                self._running.discard(d)
                if self.scheduler.routed(n):
                    self.wake()

            d.addBoth(finished)

    def _group_key(self, delivery: LeasedDelivery) -> _GroupKey:
        """Deliveries share a group when the same rule routes them to the same domain
        from the same egress pool (routing depends on sender, tenant, tags, stream)."""
        meta = delivery.meta
        facts = RouteFacts.of(
            delivery.domain, delivery.envelope.sender, meta.tenant, meta.tags, meta.stream,
            meta.sandbox,
        )
        choice = self.routes.choose(facts)
        rule = choice.rule
        pool: str | None = None
        # The simulator sends from no address: no egress source, no warmup count.
        if self.selector is not None and rule.via != SIMULATOR_ROUTE.via:
            pool = rule.egress_pool or self.config.tenant(meta.tenant).egress_pool or "default"
            if pool not in self._egress_pools:
                pool = None  # no such sources: the system's address
        return _GroupKey(choice.index, pool, delivery.domain)

    # -- one group ----------------------------------------------------------------

    def _group(
        self, key: _GroupKey, deliveries: list[LeasedDelivery], poll: int, reserved: bool
    ) -> Deferred[None]:
        return Deferred.fromCoroutine(self._run_group(key, deliveries, poll, reserved))

    async def _run_group(
        self, key: _GroupKey, deliveries: list[LeasedDelivery], poll: int = 0,
        reserved: bool = False,
    ) -> None:
        """Route one group's leased deliveries and queue them for their site; route
        errors and paused sites are settled at once.  Errors release the deliveries not
        yet queued.  ``reserved``: fresh mail whose room was taken before its commit
        (queued whatever its site holds, within the window)."""
        domain = key.domain
        pending = list(deliveries)
        try:
            choice = self.routes.choice(key.rule)
            rule = choice.rule
            # A tenant held by the complaint guard sends nothing until released.
            held = [d for d in deliveries if d.meta.tenant in self.held_tenants]
            if held:
                reason = self.held_tenants[held[0].meta.tenant]
                await self._defer_all(held, pending, Reply(
                    451, "4.7.1", f"Tenant's mail held by the operator's guard: {reason}"
                ))
                deliveries = list(pending)
            if not deliveries:
                return
            strategy = choice.strategy
            route = await choice.router.route(domain)
            if route.error is not None:
                reply = _route_reply(route.error)
                await self._defer_all(deliveries, pending, reply)
                return
            site = self._site_of(rule, route.hops)
            # A tenant held at this provider only (its complaints come from there).
            held = [d for d in deliveries if hold_key(d.meta.tenant, site) in self.held_tenants]
            if held:
                await self._defer_all(held, pending, Reply(
                    451, "4.7.1", f"Tenant's mail to {site} held by the operator's guard: "
                    f"{self.held_tenants[hold_key(held[0].meta.tenant, site)]}"
                ))
                deliveries = list(pending)
                if not deliveries:
                    return
            shape = self.shaping.get(site)
            # Repeated connection failures (Postfix's "dead destination") or
            # rate-limit refusals: defer at once instead of trying once per message.
            now = self.reactor.seconds()
            paused = pause_reply(domain, shape, now)
            if paused is not None:
                await self._defer_all(deliveries, pending, paused, dead_until(shape, now))
                return
            conn = _Connection(key, site, shape, route.hops, strategy)
            # Mail of a site met for the first time was leased before the poll could
            # know its site: keep it all (within the window).
            first = not self.ready_queues.knew(site, poll)
            self.ready_queues.note_domain(domain, site, poll)
            for delivery in deliveries:
                if not self.ready_queues.offer(
                    site, key, _Ready(conn, delivery), first or reserved
                ):
                    # The site holds its share already (the spool could not leave
                    # this one out): keep the lease until the site can take it.
                    await self._park(conn, delivery)
                pending.remove(delivery)
            self._kick(site)
        except Exception:
            self._failed(Failure(), "delivery to {domain} failed", domain=domain)
            for delivery in pending:
                await self._release(delivery)

    async def _defer_all(
        self, deliveries: Sequence[LeasedDelivery], pending: list[LeasedDelivery],
        reply: Reply, not_before: float | None = None,
    ) -> None:
        """Defer those of ``deliveries`` still in ``pending`` with ``reply`` (due again
        by the retry schedule, not before ``not_before``), taking each out of
        ``pending`` once it is recorded; the first failure is raised once its group
        has settled, and what it left in ``pending`` is the caller's."""
        failures = await self._defer_together(
            [d for d in deliveries if d in pending], reply, pending, not_before
        )
        if failures:
            failures[0][1].raiseException()

    async def _defer_together(
        self, deliveries: Sequence[LeasedDelivery], reply: Reply,
        pending: list[LeasedDelivery] | None = None, not_before: float | None = None,
    ) -> list[tuple[LeasedDelivery, Failure]]:
        """Defer ``deliveries`` with ``reply``, ``DEFER_GROUP`` at a time, each group's
        outcomes and events sharing the spool's commits; the deliveries that could not
        be recorded, with why (with ``pending``, the groups stop at the first that
        had a failure).  Awaited one after another, each deferral took two commits
        of its own (its outcome, then its event), and a dead site's backlog was
        deferred at about half the rate it had come in."""

        async def defer(delivery: LeasedDelivery) -> None:
            await self._finish(
                delivery,
                [Attempt(r, reply, not_before=not_before) for r in delivery.recipients],
            )
            if pending is not None:
                pending.remove(delivery)

        failures: list[tuple[LeasedDelivery, Failure]] = []
        for start in range(0, len(deliveries), DEFER_GROUP):
            group = deliveries[start:start + DEFER_GROUP]
            results = await DeferredList(
                [Deferred.fromCoroutine(defer(d)) for d in group], consumeErrors=True
            )
            for delivery, (ok, outcome) in zip(group, results):
                if not ok:
                    failures.append((delivery, cast(Failure, outcome)))
            if failures and pending is not None:
                break  # the rest stays pending, as the caller expects
        return failures

    def _site_of(self, rule: RouteConfig, hops: Sequence[Hop]) -> str:
        """The shaping key: ``pool:NAME`` for smarthost routes, ``simulator`` for the
        simulator's, else the provider name or MX rollup of the hop hosts."""
        if rule.via == SIMULATOR_ROUTE.via:
            return SIMULATOR_ROUTE.via
        if rule.pool is not None:
            return POOL_PREFIX + rule.pool
        return self.providers.site_for(h.host for h in hops)

    # -- the ready queues ---------------------------------------------------------

    def _kick(self, site: str) -> None:
        """Wake ``site``'s drainer, or start one when its ready queue has none."""
        wakeup = self._wakeups.pop(site, None)
        if wakeup is not None and not wakeup.called:
            wakeup.callback(None)
        if site in self._drainers or not self.running or not self.ready_queues.queued(site):
            return
        # Registered before it runs: the drainer's first steps run at once and may
        # kick the site again (a connection that ends without waiting).
        self._drainers[site] = None
        d = Deferred.fromCoroutine(self._drain(site))
        d.addErrback(self._failed, "draining the ready queue of {site} failed", site=site)

        def finished(_: Any) -> None:
            self._drainers.pop(site, None)
            self._running.discard(d)

        d.addBoth(finished)
        if not d.called:
            self._drainers[site] = d
            self._running.add(d)

    def intake_quiet(self) -> None:
        """No client is sending any more: what waits for company goes now."""
        for site in list(self._wakeups):
            self._kick(site)

    def _nap(self, site: str, seconds: float) -> Deferred[None]:
        """Sleep up to ``seconds`` (at most ``DRAIN_NAP``), or until ``_kick(site)``."""
        d: Deferred[None] = Deferred()
        self._wakeups[site] = d

        def wake() -> None:
            if not d.called:
                d.callback(None)

        timer = self.reactor.callLater(max(0.0, min(seconds, DRAIN_NAP)), wake)

        def woken(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if self._wakeups.get(site) is d:
                del self._wakeups[site]
            return result

        d.addBoth(woken)
        return d

    async def _drain(self, site: str) -> None:
        """Send ``site``'s ready queue, one connection per batch, as the scheduler
        decides (the site's window, pauses, pacing); sleep, woken when a connection
        ends or mail arrives, while it says wait."""
        shape = self.shaping.get(site)
        conn_key = "conn:" + site
        while self.running:
            now = self.reactor.seconds()
            step = self.scheduler.site_step(site, shape, now, self.intake_busy())
            if step is None:
                return
            if isinstance(step, WaitUntil):
                await self._nap(site, step.when - now)
                continue
            if isinstance(step, DeferSite):
                drained = [ready.delivery for ready in self.ready_queues.drain(site)]
                deferred = await self._defer_together(
                    drained, step.reply, not_before=step.not_before
                )
                for delivery, failure in deferred:
                    self._failed(failure, "deferring {queue_id} failed",
                                 queue_id=delivery.queue_id)
                    await self._release(delivery)
                return
            taken = await self._throttled(
                self.throttle.acquire_connection, conn_key, shape.max_connections, now
            )
            if not taken:
                self.scheduler.connect_failed(step)
                await self._nap(site, DRAIN_NAP)
                continue
            started = False
            try:
                # The first message of the connection waits for the site's rate here.
                batch = (
                    self.ready_queues.take(site, step.batch)
                    if await self._await_rate(site, shape) else []
                )
                if batch:
                    self.scheduler.session_started(site)
                    d = Deferred.fromCoroutine(self._send_taken(site, batch, conn_key, step.slot))
                    started = True
                    self._running.add(d)
                    d.addBoth(self._forget, d)
            finally:
                if not started:
                    self.scheduler.connect_failed(step)
                    await self._throttled(self.throttle.release_connection, conn_key)

    def _forget(self, result: Any, d: Deferred[Any]) -> Any:
        self._running.discard(d)
        return result

    async def _await_rate(self, site: str, shape: SiteShape) -> bool:
        """Wait until the site's rate admits one message (counted); False when the
        service stops first."""
        key = "rate:" + site
        started = self.reactor.seconds()
        while self.running:
            rate = shape.current_rate
            if rate is None:
                return True
            wait = await self._throttled(
                self.throttle.admit, key, rate, shape.period, self.reactor.seconds()
            )
            if wait is not None and wait <= 0:
                self._waited(site, started)
                return True
            await deferLater(
                self.reactor, DRAIN_NAP if wait is None else min(wait, DRAIN_NAP), lambda: None
            )
        return False

    async def _throttled(self, method: Callable[..., Any], *args: Any) -> Any:
        """Call an IThrottle method; None when it fails (a shared throttle whose store
        is unreachable): callers then wait, never count on a slot or a rate."""
        try:
            result = method(*args)
            # The memory throttle answers at once: no Deferred to wrap and wait for.
            return (await result) if isinstance(result, Deferred) else result
        except Exception as e:
            if self.running:
                log.warn("throttle {method} failed: {error}", method=method.__name__, error=e)
            return None

    async def _send_taken(
        self, site: str, batch: list[_Ready], conn_key: str, window_slot: WindowSlot,
    ) -> None:
        """Send a batch taken from ``site``'s queue over one connection (its window
        ``window_slot`` and connection slot held); what the session could not send goes
        back to the queue."""
        conn = batch[0].conn
        deliveries = [r.delivery for r in batch]
        pending = list(deliveries)
        back: list[LeasedDelivery] = []
        attempted: list[LeasedDelivery] = []
        ended = False

        async def connection_done() -> None:
            # The session's connection is resting in the cache or closed: it stops
            # counting against the site's limit now, while the outcomes are still
            # being written.  Counted until those commits, a busy site's sessions
            # ending together would find no room to leave their connections resting,
            # and the next sessions would connect afresh.
            nonlocal ended
            if ended:
                return
            ended = True
            self.scheduler.session_ended(site)
            await self._throttled(self.throttle.release_connection, conn_key)
            if self.running:
                self._kick(site)

        try:
            await self._send_batch(
                conn, deliveries, pending, back, attempted, window_slot, connection_done
            )
        except Exception:
            # Failed before the session was over, the slot is still held; after it
            # (writing the outcomes failed), it went back with the session's verdict
            # and this does nothing.
            window_slot.release()
            self._failed(Failure(), "delivery to {domain} failed", domain=conn.key.domain)
            for delivery in pending:
                key = (delivery.queue_id, delivery.domain)
                tries = self._failures[key] = self._failures.get(key, 0) + 1
                if self.running and delivery not in attempted and tries <= MAX_FAILURES:
                    # Nothing was sent (the spool is down, say): keep it queued, still
                    # leased and renewed, and try again after a pause.
                    back.append(delivery)
                    self.scheduler.hold_site(site, self.reactor.seconds())
                else:
                    # What may have been sent is never retried early (its lease
                    # expires first); a delivery failing again and again goes back.
                    self._failures.pop(key, None)
                    await self._release(delivery)
            pending.clear()
        finally:
            await connection_done()
            keep = [r for r in batch if r.delivery in back]
            if self.running:
                self.ready_queues.put_back(site, conn.key, keep)
                self.ready_queues.done(site, len(batch) - len(keep))
                self._kick(site)
                if self.scheduler.room_made(site):
                    self.wake()
            else:
                # Stopping: the ready queues were handed back already; so is this.
                self.ready_queues.done(site, len(batch))
                for ready in keep:
                    await self._release(ready.delivery)

    async def _park(self, conn: _Connection, delivery: LeasedDelivery) -> None:
        """Keep ``delivery``'s lease, out of memory, until about when its site can take
        it (its lease then expires and a later poll leases it again)."""
        site, shape = conn.site, conn.shape
        rate = shape.current_rate
        interval = shape.period / rate if rate else 0.0
        until = self.ready_queues.park_until(site, self.reactor.seconds(), interval)
        try:
            await self.spool.renew(delivery.queue_id, delivery.domain, self.config.node.name, until)
        except Exception:
            # The spool is down: its lease would run its whole time out; keep it in
            # memory (the poll took it within the window) and send it in its turn.
            self._failed(Failure(), "parking {queue_id} failed", queue_id=delivery.queue_id)
            self.ready_queues.offer(site, conn.key, _Ready(conn, delivery), force=True)
            return
        self.scheduler.parked(delivery)
        self._drop_body(delivery)

    async def _admit(self, conn: _Connection) -> bool:
        """Ask the site's rate to admit one message (counted when admitted), waiting
        up to ``MAX_PACE_WAIT`` seconds; False when it would take longer."""
        shape = conn.shape
        rate = shape.current_rate
        if rate is None:
            return True
        key = "rate:" + conn.site
        started = self.reactor.seconds()
        wait = await self._throttled(
            self.throttle.admit, key, rate, shape.period, started
        )
        while wait is not None and 0 < wait <= MAX_PACE_WAIT:
            await deferLater(self.reactor, wait, lambda: None)
            rate = shape.current_rate or rate
            wait = await self._throttled(
                self.throttle.admit, key, rate, shape.period, self.reactor.seconds()
            )
        if wait is not None and wait <= 0:
            self._waited(conn.site, started)
            return True
        return False

    def _waited(self, site: str, started: float) -> None:
        """Tell the observer how long a message for ``site`` waited for its rate."""
        if self.observer is not None:
            self.observer.throttle_wait(site, self.reactor.seconds() - started)

    def _pacer(self, conn: _Connection) -> Callable[[], Deferred[bool]] | None:
        """The per-message ``pace`` callback of one session: the first message was
        admitted before connecting, each further one asks the site's rate."""
        if conn.shape.current_rate is None:
            return None
        first = [True]

        def pace() -> Deferred[bool]:
            if first[0]:
                first[0] = False
                return succeed(True)
            return Deferred.fromCoroutine(self._admit(conn))

        return pace

    async def _send_batch(
        self,
        conn: _Connection,
        batch: list[LeasedDelivery],
        pending: list[LeasedDelivery],
        back: list[LeasedDelivery],
        attempted: list[LeasedDelivery],
        window_slot: WindowSlot,
        connection_done: Callable[[], Awaitable[None]],
    ) -> None:
        """One session (per hop tried) for one batch whose first message the site's
        rate has admitted; each delivery leaves ``pending`` once it is settled or
        moved to ``back`` (not sent: warmup cap or rate); ``attempted`` lists those
        handed to a session.  This gives back the connection's ``window_slot``."""
        shape = conn.shape
        now = self.reactor.seconds()
        today = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
        # Where it leaves from: a source of the egress pool, within its warmup cap and
        # with a connection to the site free.
        source: EgressSourceConfig | None = None
        slot: str | None = None
        if self.selector is not None and conn.key.egress_pool is not None:
            source, slot, capped = await self._choose_source(conn, now, today)
            if capped:
                window_slot.release()
                _put_back(batch, pending, back)
                self.scheduler.back_off(conn.site)
                return
            if source is None:
                window_slot.release()
                # Warmup budgets renew at midnight UTC: come back then.
                midnight = datetime.datetime.combine(
                    today + datetime.timedelta(days=1), datetime.time(), datetime.UTC
                ).timestamp()
                reply = Reply(
                    451, "4.7.0",
                    f"no source of egress pool {conn.key.egress_pool} may send to "
                    f"{conn.site} now (warmup caps reached for today), "
                    f"try again in {max(1, int(midnight - now + 1))} seconds",
                )
                await self._defer_all(batch, pending, reply)
                return
            left = self.selector.remaining(source, conn.site, today)
            if left is not None and left < len(batch):
                _put_back(batch[left:], pending, back)
                batch = batch[:left]
        elif shape.max_connections_per_source is not None:
            slot = f"conn:{SYSTEM_SOURCE}|{conn.site}"
            if not await self._throttled(
                self.throttle.acquire_connection, slot, shape.max_connections_per_source, now
            ):
                window_slot.release()
                _put_back(batch, pending, back)
                self.scheduler.back_off(conn.site)
                return

        async def release_slot() -> None:
            nonlocal slot
            if slot is not None:
                released, slot = slot, None
                await self._throttled(self.throttle.release_connection, released)

        async def done_with_connection() -> None:
            # The source's connection slot goes back with the site's (see _send_taken).
            await release_slot()
            await connection_done()

        try:
            await self._send_from(
                conn, batch, pending, back, attempted, source, now, today, window_slot,
                done_with_connection,
            )
        finally:
            await release_slot()

    async def _choose_source(
        self, conn: _Connection, now: float, today: datetime.date
    ) -> tuple[EgressSourceConfig | None, str | None, bool]:
        """The egress source for one connection of ``conn`` and the throttle key of the
        per-source connection slot taken for it (None: the site sets no per-source
        cap), or (None, None, False) when no source has warmup budget left, or
        (None, None, True) when every source tried has its connections open."""
        assert self.selector is not None and conn.key.egress_pool is not None
        cap = conn.shape.max_connections_per_source
        tried: set[str] = set()
        for _ in range(2 * len(self.config.egress_sources) + 1):
            source = self.selector.choose(conn.key.egress_pool, conn.site, now, today)
            if source is None:
                return None, None, False
            if cap is None:
                return source, None, False
            if source.name in tried:
                continue
            tried.add(source.name)
            slot = f"conn:{source.name}|{conn.site}"
            if await self._throttled(self.throttle.acquire_connection, slot, cap, now):
                return source, slot, False
        return None, None, True

    async def _send_from(
        self,
        conn: _Connection,
        batch: list[LeasedDelivery],
        pending: list[LeasedDelivery],
        back: list[LeasedDelivery],
        attempted: list[LeasedDelivery],
        source: EgressSourceConfig | None,
        now: float,
        today: datetime.date,
        window_slot: WindowSlot,
        connection_done: Callable[[], Awaitable[None]],
    ) -> None:
        """The session of :meth:`_send_batch`, from ``source`` (None: the system's
        address), giving back the connection's ``window_slot``; ``connection_done``
        is awaited once the connection is given up, before the outcomes are
        settled."""
        shape = conn.shape
        messages: list[OutboundMessage] = []
        sending: list[LeasedDelivery] = []
        # All bodies at once: fresh mail's from memory, the reads of the others share
        # one database round trip.
        kept = [self._drop_body(d) for d in batch]
        bodies: list[bytes | None] = kept
        if any(body is None for body in kept):
            reads: list[Deferred[bytes | None]] = [
                succeed(body) if body is not None else maybeDeferred(self.spool.body, d.queue_id)
                for d, body in zip(batch, kept)
            ]
            bodies = await gatherResults(reads, consumeErrors=True)
        for delivery, body in zip(batch, bodies):
            if body is None:
                # Deleted while leased: nothing to send, nothing to record.
                pending.remove(delivery)
                await self._release(delivery)
                continue
            envelope = delivery.envelope
            messages.append(
                OutboundMessage(
                    queue_id=delivery.queue_id,
                    sender=self.return_path(delivery),
                    recipients=tuple(r.address for r in delivery.recipients),
                    body=body,
                    smtputf8=envelope.smtputf8,
                    eight_bit=(envelope.body or "").upper() in ("8BITMIME", "BINARYMIME"),
                    attempts=tuple(r.attempts for r in delivery.recipients),
                )
            )
            sending.append(delivery)
        if not sending:
            window_slot.release()
            return
        hops = conn.strategy.order(conn.hops, now)
        if source is not None and hops:
            # A source reaches hops of its own address family only.
            v6 = egress.is_ipv6(source.address)
            hops = tuple(h for h in hops if egress.is_ipv6(h.address) == v6)
            if not hops:
                window_slot.release()
                reply = Reply(
                    451, "4.4.1",
                    f"{conn.site}: no {'IPv6' if v6 else 'IPv4'} address to send to from "
                    f"egress source {source.name} ({source.address})",
                )
                await self._defer_all(sending, pending, reply)
                return
        if not hops:
            # No connection can be made: a failure of the site as a refused one
            # would be, so that a pool whose endpoints stay down makes the site dead
            # (its mail then waits in the spool instead of being leased, deferred and
            # logged again and again).
            window_slot.failure(now)
            reply = Reply(
                451, "4.4.1", f"{conn.site}: every endpoint is resting after failures"
            )
            await self._defer_all(sending, pending, reply)
            return
        if source is not None:
            # Counted before sending, so concurrent connections never overshoot a cap.
            for _ in sending:
                self.selector.record_send(source.name, conn.site, today)  # type: ignore[union-attr]
        dc = self.config.delivery
        result: SessionResult | None = None
        hop: Hop | None = None
        refused_421 = True
        attempted.extend(sending)
        for hop in hops:
            options = SessionOptions(
                helo=(source.ehlo if source is not None and source.ehlo else None)
                or self.config.node.hostname,
                tls=strictest_tls(shape.tls, hop.tls),
                trust_root=self._trust_root,
                bind_address=source.address if source is not None else None,
                connect_timeout=dc.connect_timeout,
                command_timeout=dc.command_timeout,
                # Smarthosts are ours: one that does not greet at once is down.
                greeting_timeout=dc.connect_timeout if hop.endpoint is not None else None,
                pace=self._pacer(conn),
                cache_site=conn.site,
                # Resting plus open sessions (this one is still counted) stay within
                # the site's connection limit.
                cache_room=lambda: shape.window.limit - self.scheduler.sessions(conn.site) + 1,
                reuse_limit=shape.messages_per_connection,
            )
            result = await self.transports[hop.transport].deliver(hop, messages, options)
            held = not _held_no_session(result)
            if self.observer is not None:
                self.observer.outbound_connection(conn.site, held)
            if held:
                conn.strategy.succeeded(hop, self.reactor.seconds())
                break
            first = result.results[0].message_reply if result.results else None
            if result.connect_error is not None or first is None or first.code != 421:
                refused_421 = False
            if source is None or not _refused_421(result):
                # A hop that could not be reached rests for everyone; a 421 to an
                # egress source is about that source (its reputation or its pace),
                # so the hop stays open to the other sources (other tenants' pools).
                conn.strategy.failed(hop, self.reactor.seconds())
            log.info(
                "{host} ({address}) held no session: {reply}",
                host=hop.host, address=hop.address,
                reply=result.connect_error or result.results[0].message_reply,
            )
        assert result is not None and hop is not None  # a Route without error has hops
        self._learn(conn, source, result, refused_421, window_slot)
        await connection_done()
        by_id = {m.queue_id: m for m in result.results}
        settling: list[LeasedDelivery] = []
        for delivery in sending:
            if delivery.queue_id in result.unsent:
                # Held back by the site's rate: back to the ready queue.
                pending.remove(delivery)
                back.append(delivery)
                continue
            settling.append(delivery)

        async def settle(delivery: LeasedDelivery) -> None:
            message = by_id[delivery.queue_id]
            replies = {r.address: r.reply for r in message.recipients}
            attempts = [
                Attempt(
                    record,
                    replies[record.address],
                    mx=hop.host,
                    mx_ip=result.mx_ip,
                    source_ip=result.source_ip
                    or (source.address if source is not None else None),
                    tls=result.tls,
                )
                for record in delivery.recipients
            ]
            await self._finish(delivery, attempts)
            pending.remove(delivery)

        # Settled together, the outcomes and events of a session share their commits.
        if len(settling) == 1:
            await settle(settling[0])  # the usual single message: no DeferredList
        else:
            await gatherResults(
                [Deferred.fromCoroutine(settle(d)) for d in settling], consumeErrors=True
            )

    def _learn(
        self,
        conn: _Connection,
        source: EgressSourceConfig | None,
        result: SessionResult,
        refused_421: bool,
        window_slot: WindowSlot,
    ) -> None:
        """Feed one session's outcome to the site's window and rate, and to the egress
        selector: rate-limit and block replies slow the site and mark the source."""
        shape = conn.shape
        now = self.reactor.seconds()
        if _held_no_session(result):
            if refused_421 and source is not None:
                # Refused, from this source only as far as we know: the source is
                # marked and the pace slows, but the site is not counted down or
                # paused for the other sources (another tenant's pool among them).
                window_slot.release()
                shape.throttled(now)
                self._penalize(source, conn.site, now)
                return
            window_slot.failure(now)
            if refused_421:
                # Every host answered 421: slow down; refused again and again, the
                # whole site pauses for a while.
                shape.throttled(now, refused=True)
                self._penalize(source, conn.site, now)
            return
        window_slot.success()
        shape.held_session()
        soft = self.config.delivery.soft_bounce_codes
        signalled = blocked = False
        for message in result.results:
            for r in message.recipients:
                if 200 <= r.reply.code < 300:
                    shape.delivered()
                    continue
                c = classify(r.reply, self.rules, soft)
                signalled = signalled or c.throttle
                blocked = blocked or c.category == "reputation/block"
        if signalled:
            shape.throttled(now)
        if signalled or blocked:
            self._penalize(source, conn.site, now)

    def _penalize(self, source: EgressSourceConfig | None, site: str, now: float) -> None:
        if source is not None and self.selector is not None:
            self.selector.penalize(source.name, site, now)
            log.info(
                "egress source {source} ({address}) deprioritized for {site}",
                source=source.name, address=source.address, site=site,
            )

    async def _release(self, delivery: LeasedDelivery) -> bool:
        """Give ``delivery``'s lease back (no longer renewed).  A release that fails
        (the spool is down) is retried while the lease lasts: given up at once, the
        delivery would wait for its lease to expire.  False when it was given up."""
        self.scheduler.releasing(delivery)
        self._drop_body(delivery)
        self._failures.pop((delivery.queue_id, delivery.domain), None)
        deadline = self.reactor.seconds() + self.config.spool.lease_time
        delay = 0.5
        while True:
            try:
                await self.spool.release(
                    delivery.queue_id, delivery.domain, self.config.node.name
                )
                self.scheduler.released()
                return True
            except Exception:
                if not self.running or self.reactor.seconds() + delay >= deadline:
                    self._failed(
                        Failure(), "releasing {queue_id} failed", queue_id=delivery.queue_id
                    )
                    return False
            await deferLater(self.reactor, delay, lambda: None)
            delay = min(delay * 2, 10.0)

    def _renew_held(self) -> Deferred[Any]:
        """Renew the lease of every delivery held in memory (routing, queued or being
        sent), every third of the lease time, so no other node takes it over."""
        expires = self.reactor.seconds() + self.config.spool.lease_time
        node = self.config.node.name
        return DeferredList(
            [
                maybeDeferred(self.spool.renew, d.queue_id, d.domain, node, expires)
                for d in self.scheduler.held()
            ],
            consumeErrors=True,
        )

    # -- outcomes -----------------------------------------------------------------

    async def _finish(
        self,
        delivery: LeasedDelivery,
        attempts: list[Attempt],
    ) -> None:
        """Record the planned outcomes with ``complete``, then emit and suppress."""
        plan = plan_outcomes(
            delivery, attempts, self.reactor.seconds(), self.outcome_rules, self.rng
        )
        notices: list[Event] = []
        original: bytes | None = None
        if self.notifier is not None:
            events = [e for e in plan.effects if isinstance(e, Event)]
            notices = self.notifier.failures(delivery, events)
            if notices:
                # Read before completing: a message whose last recipient fails leaves
                # the spool with its body.
                original = await self.spool.body(delivery.queue_id)
        try:
            await self.spool.complete(
                delivery.queue_id, delivery.domain, self.config.node.name,
                list(plan.outcomes), self.reactor.seconds(),
            )
        except LeaseLost:
            # Deleted by an operator while it was being sent, or its lease ran out
            # and another node took it: the record is no longer ours to write.  What
            # the destination answered still happened, so its events and
            # suppressions follow as usual.
            log.warn("the outcome of {queue_id} at {domain} was not recorded: the "
                     "message was deleted, or another node holds it now",
                     queue_id=delivery.queue_id, domain=delivery.domain)
        self.scheduler.settled(delivery)
        self._drop_body(delivery)
        self._failures.pop((delivery.queue_id, delivery.domain), None)
        await self._carry_out(plan.effects)
        if notices and original is not None:
            try:
                await self.notifier.notify(delivery, notices, bytes(original))
            except Exception:
                self._failed(Failure(), "the DSN for {queue_id} was not queued",
                             queue_id=delivery.queue_id)

    async def _carry_out(self, effects: Sequence[Event | Suppress]) -> None:
        for effect in effects:
            if isinstance(effect, Suppress):
                try:
                    await self.suppressions.add(
                        effect.tenant, effect.address, effect.reason, effect.source,
                        self.reactor.seconds(),
                    )
                except Exception:
                    self._failed(Failure(), "suppressing {address} failed",
                                 address=effect.address)
                continue
            try:
                await maybeDeferred(self.events.emit, effect)
            except Exception:
                self._failed(Failure(), "emitting a {kind} event failed", kind=effect.type)

    def _suppresses(self, tenant: str) -> bool:
        if not self.config.delivery.hard_bounce_suppresses:
            return False
        tenant_config = self.config.tenants.get(tenant)
        return tenant_config is None or tenant_config.suppress_hard_bounces

def _domain_of(address: str) -> str:
    """The destination domain of ``address``, as the spool splits deliveries."""
    at = address.rfind("@")
    return address[at + 1 :].lower() if at >= 0 else ""


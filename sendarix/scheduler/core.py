"""The delivery scheduler's core: when to poll the spool, what to do with what it
leased, and the account of every lease the node holds (sans-IO).

The delivery agent (:mod:`sendarix.delivery.service`) feeds it what happened, each
input carrying ``now`` where time matters, and carries out the frozen actions it
returns: :class:`Lease` (ask the spool), :class:`Route` (route one group),
:class:`Release` (hand a lease back).  The core keeps the books that make the
agent's promises checkable without sockets:

- the node never holds more than ``window`` deliveries in memory (routing, queued in a
  ready queue, or being sent);
- every lease taken is settled, parked, released or put back exactly once, and a
  delivery is never settled twice;
- a stop releases every lease still waiting in a ready queue, and anything leased
  while stopping goes straight back.

The per-site ready queues themselves (the fair split of the window) are
:class:`~sendarix.scheduler.ready.ReadyQueues`, which the core owns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from typing import Generic, TypeVar

from attrs import define, field, frozen

from sendarix.model.message import LeasedDelivery, Reply
from sendarix.routing.shaping import SiteShape
from sendarix.scheduler.ready import ReadyQueues
from sendarix.scheduler.window import WindowSlot

T = TypeVar("T")

#: The longest a site's drainer waits at a time (so a stop is noticed soon).
DRAIN_NAP = 1.0
#: Messages per second one connection is assumed to carry (a slow provider takes up
#: to half a second per message): a paced site gets no more connections at once than
#: its rate needs at this speed.
PACED_PER_CONNECTION = 2.0
#: Seconds of a paced site's rate that one connection takes from the ready queue.
PACED_BATCH_SECONDS = 10.0

#: A leased delivery's identity: (queue id, destination domain).
Key = tuple[str, str]


def key_of(delivery: LeasedDelivery) -> Key:
    """The ledger key of ``delivery``."""
    return delivery.queue_id, delivery.domain


@frozen
class Lease:
    """Ask the spool for at most ``limit`` due deliveries, leaving out the domains of
    ``skip_domains`` (sites whose ready queue is full)."""

    now: float
    limit: int
    skip_domains: tuple[str, ...]


@frozen
class Route:
    """Route one group: deliveries that share a rule, an egress pool and a domain."""

    group: Hashable
    deliveries: tuple[LeasedDelivery, ...]
    poll: int
    #: Fresh mail handed over after a :meth:`Scheduler.reserve`: its room in the
    #: window was taken before its commit, so it is queued even when a poll has
    #: filled its site's share since (never parked).
    reserved: bool = False


@frozen
class Release:
    """Hand ``delivery``'s lease back to the spool (another node may take it now)."""

    delivery: LeasedDelivery


@frozen
class WaitUntil:
    """Nothing to start for the site before ``when`` (or before a connection ends or
    mail arrives, whichever comes first)."""

    when: float


@frozen
class DeferSite:
    """The site is dead or paused: defer everything its ready queue holds with
    ``reply`` (the retry schedule brings it back, not before ``not_before``)."""

    reply: Reply
    not_before: float | None = None


@frozen
class Connect:
    """Open one more connection to the site (its window slot ``slot`` is taken) and
    send up to ``batch`` messages over it, once the connection cap and the rate admit
    it."""

    batch: int
    #: Left out of comparisons: a step is the action, whichever slot it carries.
    slot: WindowSlot = field(eq=False, repr=False)


def pause_reply(name: str, shape: SiteShape, now: float) -> Reply | None:
    """The deferral while the site is dead (connections keep failing) or paused (it
    kept refusing with 421), else None; ``name`` is what the reply names."""
    if shape.window.is_dead(now):
        return Reply(451, "4.4.1", f"{name}: destination not responding, suspended")
    if shape.is_suspended(now):
        assert shape.suspended_until is not None
        wait = max(1, int(shape.suspended_until - now + 0.999))
        return Reply(
            451, "4.7.0",
            f"{shape.site}: paused after rate-limit replies, try again in {wait} seconds",
        )
    return None


def dead_until(shape: SiteShape, now: float) -> float | None:
    """When a dead site's suspension ends and its probe connection is due, or None
    when the site is not dead.  Mail deferred for it is not due again before then:
    with the retry schedule's first step (60 s) shorter than the suspension (300 s),
    every delivery of a large backlog was leased and deferred again while the site
    was still suspended.  A pause after 421s needs no such floor: its reply names
    the wait, which the classifier takes as the retry hint."""
    return shape.window.dead_until if shape.window.is_dead(now) else None


def batch_size(shape: SiteShape) -> int:
    """Messages for one connection: for a paced site no more than its rate admits in
    ``PACED_BATCH_SECONDS``, so what a slow site holds drains a few at a time and its
    ready queue is topped up in between."""
    size = shape.messages_per_connection
    rate = shape.current_rate
    if rate is not None:
        size = min(size, max(1, int(rate / shape.period * PACED_BATCH_SECONDS) + 1))
    return size


def connections_needed(shape: SiteShape) -> int:
    """The most connections worth opening at once: for a paced site, what its rate
    needs (more would only share the rate and wait); else the window's limit."""
    rate = shape.current_rate
    if rate is None:
        return shape.window.limit
    return max(1, math.ceil(rate / shape.period / PACED_PER_CONNECTION))


@define
class Scheduler(Generic[T]):
    """The lease poll and the ledger of leases held; ``T`` is what the ready queues
    hold (the agent's routed delivery)."""

    window: int
    #: While other clients are still sending (``intake_busy``), how long fresh mail
    #: for a site waits for more of its kind, so that one outgoing session carries
    #: several messages rather than each taking its own: the longest wait, and the
    #: queue length that ends it at once.  0 never waits.
    gather_wait: float = 0.0
    gather_target: int = 1
    ready_queues: ReadyQueues[T] = field(init=False)
    #: Spool traffic: deliveries leased, handed back unsent, parked until their turn.
    #: ``handed``: fresh mail given to delivery in memory at its commit (no poll).
    counters: dict[str, int] = field(factory=lambda: {"leased": 0, "released": 0,
                                                      "parked": 0, "handed": 0})
    _held: dict[Key, LeasedDelivery] = field(factory=dict, init=False)
    _routing: int = field(default=0, init=False)
    #: Room held for the poll under way (its limit), until its deliveries come back:
    #: fresh mail reserved meanwhile must not count on it.
    _poll_hold: int = field(default=0, init=False)
    _polls: int = field(default=0, init=False)
    _polling: bool = field(default=False, init=False)
    _wake_missed: bool = field(default=False, init=False)
    #: Sites whose full ready queue the poll under way (or the last one) left out.
    _skipped_full: frozenset[str] = field(factory=frozenset, init=False)
    #: Sites a short poll left out because their queue was full: the end of one of
    #: their connections makes room, and what the poll left in the spool is due.
    _repoll_on_room: frozenset[str] = field(factory=frozenset, init=False)
    #: Full sites that fresh mail left in the spool waits for: the end of one of
    #: their connections polls for it.
    _mail_waits_for: set[str] = field(factory=set, init=False)
    _stopped: bool = field(default=False, init=False)
    #: Connections open (or being opened) per site.
    _sessions: dict[str, int] = field(factory=dict, init=False)
    #: Sites whose next connection waits a while (every source was at its cap, or
    #: the spool failed).
    _backoff: set[str] = field(factory=set, init=False)
    #: Sites that open no connection before a time (the spool failed under them).
    _held_until: dict[str, float] = field(factory=dict, init=False)
    #: Sites an operator suspended, and until when.
    _suspended: dict[str, float] = field(factory=dict, init=False)
    #: Active-queue room taken per site by commits under way, and by which commit.
    _site_reserved: dict[str, int] = field(factory=dict, init=False)
    _reservations: dict[Hashable, tuple[str, ...]] = field(factory=dict, init=False)
    #: Sites whose queued mail waits for company, and since when.
    _gathering: dict[str, float] = field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self.ready_queues = ReadyQueues(self.window, promised=self._site_reserved)

    # -- the poll -----------------------------------------------------------------

    def poll(self, now: float, resting: Iterable[str] = ()) -> Lease | None:
        """Time to poll (the interval passed, or new mail was queued): the lease to
        ask for, or None while a poll is under way or the window is full (the wish is
        remembered and granted by :meth:`wanted` once there is room).

        ``resting``: sites this node will not connect to now (dead, or paused after
        421s): their mail is left in the spool, where another node, which may well
        reach them, takes it, rather than being leased here only to be deferred (its
        next try would then come a whole retry interval later).  Alone, the node
        takes it again once the site's rest is over.
        """
        free = 0
        if not self._polling and not self._stopped:
            free = self.ready_queues.poll_limit(
                self.window - self.ready_queues.total() - self._routing
            )
        if free <= 0:
            self._wake_missed = True
            return None
        self._wake_missed = False
        self._polling = True
        self._poll_hold = free
        self._routing += free
        resting = set(resting)
        self._skipped_full = frozenset(self.ready_queues.full_sites() - resting)
        return Lease(now, free, tuple(self.ready_queues.skip_domains(resting=resting)))

    def leased(
        self,
        deliveries: Sequence[LeasedDelivery],
        group_of: Callable[[LeasedDelivery], Hashable],
    ) -> list[Route | Release]:
        """The spool answered a :class:`Lease`: route each group, or hand everything
        back when the node is stopping."""
        self._release_poll_hold()
        if self._stopped:
            return [Release(d) for d in deliveries]
        self.counters["leased"] += len(deliveries)
        self._polls += 1
        groups: dict[Hashable, list[LeasedDelivery]] = {}
        for delivery in deliveries:
            self._held[key_of(delivery)] = delivery
            groups.setdefault(group_of(delivery), []).append(delivery)
        self._routing += len(deliveries)
        return [Route(group, tuple(ds), self._polls) for group, ds in groups.items()]

    # -- the active queue: fresh mail handed over in memory --------------------------

    def reserve(
        self, count: int, key: Hashable = None, domains: Iterable[str] = (),
        resting: Collection[str] = (),
    ) -> bool:
        """Fresh mail of ``count`` deliveries is about to be committed with its lease
        already ours (the spool is not read back): take room for it in the window now,
        so that what the commit hands over never overshoots it.  False when there is
        no room (or the node is stopping): the mail goes through the spool and a poll.
        Settle a True with :meth:`handed` or :meth:`unreserve` (with the same ``key``).

        ``domains``: the mail's destination domains.  Mail to a site already known
        to be holding its share is not taken either (it would only be parked): it
        waits in the spool, where a poll takes it once the site has room.  Room taken
        for commits still under way counts against the site, so a burst of
        submissions to one site does not overshoot it.

        ``resting``: sites this node sends nothing to now (dead or paused).  Mail
        whose every domain goes to one of them is not taken: handed over, it would
        only be deferred, a commit and an event per message while the site rests.
        It waits in the spool, for another node that may reach the site; this
        node's polls leave it out (see :meth:`poll`) until the rest is over, or lease
        and defer it in groups once there is more of it than they look past.
        """
        if self._stopped or count <= 0:
            return False
        if self.window - self.ready_queues.total() - self._routing < count:
            return False
        sites: list[str] = []
        if key is not None:
            named = list(domains)
            sites = [s for d in named if (s := self.ready_queues.site_of(d)) is not None]
            # A domain never routed may go anywhere: only known resting sites count.
            if resting and sites and len(sites) == len(named) and all(
                s in resting for s in sites
            ):
                return False
            for site in set(sites):
                room = self.ready_queues.open_room(site)
                if room < sites.count(site):
                    return False
            for site in sites:
                self._site_reserved[site] = self._site_reserved.get(site, 0) + 1
            self._reservations[key] = tuple(sites)
        self._routing += count
        return True

    def _settle_reservation(self, key: Hashable) -> None:
        for site in self._reservations.pop(key, ()) if key is not None else ():
            left = self._site_reserved.get(site, 0) - 1
            if left > 0:
                self._site_reserved[site] = left
            else:
                self._site_reserved.pop(site, None)

    def unreserve(self, count: int, key: Hashable = None) -> bool:
        """The commit of a :meth:`reserve` failed: give its room back; True when a poll
        that found no room should now run."""
        self._routing -= count
        self._settle_reservation(key)
        return self._wake_missed

    def handed(
        self,
        deliveries: Sequence[LeasedDelivery],
        reserved: int,
        group_of: Callable[[LeasedDelivery], Hashable],
        key: Hashable = None,
    ) -> list[Route | Release]:
        """The commit of a :meth:`reserve` of ``reserved`` deliveries leased
        ``deliveries`` to this node: route them as a poll's, or hand them back when
        the node is stopping."""
        self._routing -= reserved
        self._settle_reservation(key)
        if self._stopped:
            return [Release(d) for d in deliveries]
        self.counters["handed"] += len(deliveries)
        groups: dict[Hashable, list[LeasedDelivery]] = {}
        for delivery in deliveries:
            self._held[key_of(delivery)] = delivery
            groups.setdefault(group_of(delivery), []).append(delivery)
        self._routing += len(deliveries)
        return [Route(group, tuple(ds), self._polls, reserved=True) for group, ds in groups.items()]

    def poll_done(self, leased: int, limit: int) -> bool:
        """The poll is over (``leased`` deliveries came back, 0 when it failed): poll
        again at once?  Yes when wakes came in while it ran, or when it came back full
        (more is likely due).

        A poll that came back short while it left out full sites is answered later,
        by :meth:`room_made`: their mail is likely still due, and a backlog for
        one site would otherwise wait a whole poll interval each time its queue
        drains."""
        self._polling = False
        self._release_poll_hold()
        self._repoll_on_room = (
            self._skipped_full if leased < limit and not self._stopped else frozenset()
        )
        self._skipped_full = frozenset()
        return self._wake_missed or (0 < limit <= leased and not self._stopped)

    def _release_poll_hold(self) -> None:
        """The poll's deliveries are back (or it failed): what it held goes; the
        deliveries it brought are counted on their own."""
        self._routing -= self._poll_hold
        self._poll_hold = 0

    def routed(self, count: int) -> bool:
        """A group of ``count`` deliveries is routed (queued, parked or settled); True
        when a poll that found no room should now run."""
        self._routing -= count
        return self._wake_missed

    @property
    def wanted(self) -> bool:
        """A poll was asked for while there was no room."""
        return self._wake_missed

    @property
    def polls(self) -> int:
        return self._polls

    # -- the ledger ---------------------------------------------------------------

    def holds(self, delivery: LeasedDelivery) -> bool:
        """Is ``delivery``'s lease held in memory (to renew, to settle)?"""
        return key_of(delivery) in self._held

    def held(self) -> list[LeasedDelivery]:
        """Every delivery whose lease the node holds in memory (renewed while held)."""
        return list(self._held.values())

    def settled(self, delivery: LeasedDelivery) -> bool:
        """``delivery``'s outcomes are recorded; False when it was not held (settled
        already, or never leased here)."""
        return self._held.pop(key_of(delivery), None) is not None

    def parked(self, delivery: LeasedDelivery) -> None:
        """``delivery``'s lease was extended until its site can take it; it leaves
        memory and a later poll leases it again."""
        if self._held.pop(key_of(delivery), None) is not None:
            self.counters["parked"] += 1

    def releasing(self, delivery: LeasedDelivery) -> None:
        """``delivery``'s lease is being handed back: no longer held or renewed."""
        self._held.pop(key_of(delivery), None)

    def released(self) -> None:
        """A lease went back to the spool (the spool confirmed it)."""
        self.counters["released"] += 1

    # -- one site's connections ---------------------------------------------------

    def site_step(
        self, site: str, shape: SiteShape, now: float, intake_busy: bool = False
    ) -> WaitUntil | DeferSite | Connect | None:
        """What ``site``'s drainer does next: None when its ready queue is empty;
        :class:`Connect` takes a window slot (give it back with
        :meth:`connect_failed` if no connection is made).

        ``intake_busy``: other clients are sending mail to this node right now, so
        more is on its way; see :meth:`_gather`."""
        queued = self.ready_queues.queued(site)
        if not queued:
            self._gathering.pop(site, None)
            return None
        until = self._held_until.get(site)
        if until is not None:
            if now < until:
                # Not cut short when a connection ends: each would fail the same way.
                return WaitUntil(until)
            del self._held_until[site]
        if self.suspended_until(site, now) is not None:
            return DeferSite(Reply(451, "4.7.0", f"{site}: suspended by the operator"))
        if site in self._backoff:
            self._backoff.discard(site)
            return WaitUntil(now + DRAIN_NAP)
        reply = pause_reply(site, shape, now)
        if reply is not None:
            return DeferSite(reply, dead_until(shape, now))
        if self._sessions.get(site, 0) >= connections_needed(shape):
            # A paced site's open connections already carry its rate.
            return WaitUntil(now + DRAIN_NAP)
        gathered = self._gather(site, shape, queued, now, intake_busy)
        if gathered is not None:
            return gathered
        slot = shape.window.acquire(now)
        if slot is None:
            return WaitUntil(now + DRAIN_NAP)
        return Connect(batch_size(shape), slot)

    def _gather(
        self, site: str, shape: SiteShape, queued: int, now: float, intake_busy: bool
    ) -> WaitUntil | None:
        """Let ``site``'s mail wait a moment for company, or None to send it now.

        Under a load of many clients, each message handed over on its own would take
        an outgoing session (and its bookkeeping) of its own.  While other clients
        are sending, the first message to wait starts a short clock: the site
        connects when ``gather_target`` messages are queued, or when the clock runs
        out, whichever comes first.  A message that arrives with nobody else sending
        (a lone message, the last of a burst) goes at once, and so does what
        waited, as soon as the clients stop."""
        if not intake_busy or self.gather_wait <= 0:
            self._gathering.pop(site, None)
            return None
        since = self._gathering.setdefault(site, now)
        target = min(self.gather_target, batch_size(shape))
        if queued < target and now < since + self.gather_wait:
            return WaitUntil(since + self.gather_wait)
        del self._gathering[site]
        return None

    def connect_failed(self, step: Connect) -> None:
        """The connection of ``step`` was not made (no connection slot, or nothing
        left to send): its window slot is free again."""
        step.slot.release()

    def session_started(self, site: str) -> None:
        self._sessions[site] = self._sessions.get(site, 0) + 1

    def session_ended(self, site: str) -> None:
        left = self._sessions.get(site, 0) - 1
        if left > 0:
            self._sessions[site] = left
        else:
            self._sessions.pop(site, None)

    def room_made(self, site: str) -> bool:
        """A connection to ``site`` ended and its ready queue no longer counts what it
        sent: True when a poll should run now (one found no room, or ``site`` was left
        out of one, or fresh mail waits for it, while it was full, and it can take a
        useful amount again: a poll before that would leave it out once more)."""
        if (
            (site in self._repoll_on_room or site in self._mail_waits_for)
            and not self._stopped and self.ready_queues.hungry(site)
        ):
            # The poll leaves out the sites still full; coming back short, it
            # makes them wait for room again (poll_done).
            self._repoll_on_room = frozenset()
            self._mail_waits_for.clear()
            return True
        return self._wake_missed

    def queued(self, domains: Iterable[str], resting: Iterable[str] = ()) -> bool:
        """Fresh mail to ``domains`` is in the spool, not handed over in memory: True
        when a poll should run for it now.

        Not when every site it goes to would be left out of that poll: a full site
        (the mail waits for its room, and :meth:`room_made` then asks for the poll)
        or a ``resting`` one (the regular polls take it once the rest is over).  A
        poll at each such commit would look past the site's due mail for nothing,
        and under a backlog lease some of it only to park it.
        """
        if self._stopped:
            return True
        sites = set()
        for domain in domains:
            site = self.ready_queues.site_of(domain)
            if site is None:
                return True  # never routed: the poll cannot leave it out
            sites.add(site)
        full = self.ready_queues.full_sites()
        if not sites or not sites <= full | set(resting):
            return True
        self._mail_waits_for |= sites & full
        return False

    def sessions(self, site: str) -> int:
        """Connections open (or being opened) to ``site``."""
        return self._sessions.get(site, 0)

    def hold_site(self, site: str, now: float) -> None:
        """The spool failed under a connection to ``site``: open none before
        ``DRAIN_NAP`` seconds have passed, even when other connections end meanwhile
        (each would fail the same way and use up the deliveries' tries)."""
        self._held_until[site] = max(self._held_until.get(site, now), now + DRAIN_NAP)

    def back_off(self, site: str) -> None:
        """The site's next connection waits a while (sources at their caps, or the
        spool failed)."""
        self._backoff.add(site)

    # -- the operator's suspensions -------------------------------------------------

    def suspend(self, site: str, until: float) -> None:
        """Send nothing to ``site`` before ``until``: what its ready queue holds, and
        whatever is routed to it meanwhile, is deferred (the retry schedule brings it
        back)."""
        self._suspended[site] = until

    def resume(self, site: str) -> bool:
        """Lift ``site``'s suspension; False when it was not suspended."""
        return self._suspended.pop(site, None) is not None

    def suspended_until(self, site: str, now: float) -> float | None:
        """When ``site``'s suspension ends, or None when it is not suspended (an
        expired suspension is forgotten here)."""
        until = self._suspended.get(site)
        if until is not None and now >= until:
            del self._suspended[site]
            return None
        return until

    def suspensions(self, now: float) -> dict[str, float]:
        """Every site suspended now, with when its suspension ends."""
        return {
            site: until for site in sorted(self._suspended)
            if (until := self.suspended_until(site, now)) is not None
        }

    # -- starting and stopping ----------------------------------------------------

    def start(self) -> None:
        """The node (re)starts delivering: polls lease again."""
        self._stopped = False

    def stop(self, unwrap: Callable[[T], LeasedDelivery]) -> list[Release]:
        """The node stops: what waits in the ready queues goes back to the spool at
        once (what is being sent finishes); later polls lease nothing."""
        self._stopped = True
        return [Release(unwrap(item)) for item in self.ready_queues.drain_all()]

    @property
    def stopped(self) -> bool:
        return self._stopped

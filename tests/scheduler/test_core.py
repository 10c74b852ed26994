"""Tests for :mod:`sendarix.scheduler.core`: the lease poll and the ledger of leases,
driven through hundreds of poll / lease / route / send / settle / stop sequences
without a spool, a socket or a reactor (time is a ``task.Clock``)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sendarix.model.message import (
    Envelope,
    Lease,
    LeasedDelivery,
    MessageMeta,
    RecipientRecord,
    RecipientStatus,
    Reply,
)
from sendarix.routing.shaping import SiteShape
from sendarix.routing.throttle import AdaptiveRate
from sendarix.scheduler.core import (
    DRAIN_NAP,
    Connect,
    DeferSite,
    Release,
    Route,
    Scheduler,
    WaitUntil,
    key_of,
    pause_reply,
)
from sendarix.scheduler.core import Lease as LeaseRequest
from sendarix.scheduler.window import DestinationWindow, WindowSlot

#: A slot for the expected steps: a Connect's slot takes no part in comparisons.
ANY_SLOT = WindowSlot(DestinationWindow(), held=False)

DOMAINS = ("a.test", "b.test", "c.test", "d.test")
_ids = itertools.count()


def delivery(domain: str, number: int | None = None) -> LeasedDelivery:
    qid = f"Q{next(_ids) if number is None else number:06d}"
    return LeasedDelivery(
        queue_id=qid, domain=domain,
        envelope=Envelope("s@x.test", (f"r@{domain}",)),
        meta=MessageMeta(tenant="t", received_at=0.0),
        recipients=(RecipientRecord(f"r@{domain}", domain, RecipientStatus.PENDING),),
        lease=Lease("n1", 300.0),
    )


def by_domain(d: LeasedDelivery) -> str:
    return d.domain


def fill_site(
    scheduler: Scheduler[LeasedDelivery], count: int, *others: tuple[str, str]
) -> LeaseRequest:
    """Poll, and queue ``count`` deliveries to a.test (site-a) from that poll, so
    that site-a holds its share of a window of 10; ``others``: more (domain, site)
    pairs the poll's routing came across.  The poll's lease."""
    queues = scheduler.ready_queues
    lease = scheduler.poll(0.0)
    assert lease is not None
    got = [delivery("a.test") for _ in range(count)]
    for route in scheduler.leased(got, by_domain):
        assert isinstance(route, Route)
        queues.note_domain("a.test", "site-a", route.poll)
        for domain, site in others:
            queues.note_domain(domain, site, route.poll)
        for d in route.deliveries:
            queues.offer("site-a", "lane", d, force=True)
    scheduler.routed(len(got))
    return lease


def holding(count: int) -> Scheduler[LeasedDelivery]:
    """A started scheduler with a window of 20 whose site-a (a.test's) holds
    ``count`` queued deliveries."""
    scheduler: Scheduler[LeasedDelivery] = Scheduler(20)
    scheduler.start()
    scheduler.ready_queues.note_domain("a.test", "site-a")
    for _ in range(count):
        scheduler.ready_queues.offer("site-a", "lane", delivery("a.test"))
    return scheduler


def send(scheduler: Scheduler[LeasedDelivery], site: str, count: int) -> bool:
    """A connection to ``site`` sends ``count`` of what it holds and ends: whether
    the room it made asks for a poll."""
    queues = scheduler.ready_queues
    taken = queues.take(site, count)
    scheduler.session_started(site)
    for d in taken:
        scheduler.settled(d)
    scheduler.session_ended(site)
    queues.done(site, len(taken))
    return scheduler.room_made(site)


class SchedulerMachine(RuleBasedStateMachine):
    """A node's delivery loop, as the agent drives it: the spool is a list of due
    deliveries, each site is its domain."""

    @initialize(window=st.integers(1, 40))
    def start(self, window: int) -> None:
        self.clock = Clock()
        self.window = window
        self.scheduler: Scheduler[LeasedDelivery] = Scheduler(window)
        self.scheduler.start()
        self.due: list[LeasedDelivery] = []
        self.routing: list[Route] = []
        self.sending: list[tuple[str, list[LeasedDelivery]]] = []
        self.settled: set[tuple[str, str]] = set()
        self.released: set[tuple[str, str]] = set()
        self.parked: set[tuple[str, str]] = set()
        self.in_memory = 0  # routing + queued + sending, as the agent counts it
        self.numbers = 0
        #: The poll under way: asked for, its deliveries not back yet (the spool's
        #: answer takes a while, and fresh mail keeps coming meanwhile).
        self.lease: LeaseRequest | None = None
        self.handed_routes: list[Route] = []

    @rule(domain=st.sampled_from(DOMAINS), count=st.integers(1, 10))
    def mail_arrives(self, domain: str, count: int) -> None:
        # Numbered per run, so that every run of the same steps is the same.
        for _ in range(count):
            self.due.append(delivery(domain, self.numbers))
            self.numbers += 1

    @rule(seconds=st.floats(0, 5))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: self.lease is None)
    @rule()
    def poll_starts(self) -> None:
        lease = self.scheduler.poll(self.clock.seconds())
        if lease is None:
            return
        assert lease.limit >= 1
        assert self.in_memory + lease.limit <= self.window, (self.in_memory, lease)
        self.lease = lease

    @precondition(lambda self: self.lease is not None)
    @rule(answer=st.integers(0, 100))
    def poll_returns(self, answer: int) -> None:
        lease, self.lease = self.lease, None
        assert lease is not None
        skip = set(lease.skip_domains)
        offered = [d for d in self.due if d.domain not in skip][: min(answer, lease.limit)]
        for d in offered:
            self.due.remove(d)
        actions = self.scheduler.leased(offered, by_domain)
        self.scheduler.poll_done(len(offered), lease.limit)
        for action in actions:
            if isinstance(action, Release):
                self._release(action.delivery)
            else:
                assert isinstance(action, Route)
                self.routing.append(action)
                self.in_memory += len(action.deliveries)

    @rule(domain=st.sampled_from(DOMAINS), count=st.integers(1, 4),
          commit_fails=st.booleans())
    def fresh_mail_handed(self, domain: str, count: int, commit_fails: bool) -> None:
        """Fresh mail committed with its leases ours (the active queue), when the
        window has room for it; else it waits in the spool for a poll."""
        before = self.scheduler.ready_queues.total() + sum(
            len(r.deliveries) for r in self.routing
        ) + self.outstanding()
        key = ("commit", self.numbers)
        if not self.scheduler.reserve(count, key, [domain] * count):
            self.mail_arrives(domain, count)
            return
        assert before + count <= self.window, (before, count)
        if commit_fails:
            self.scheduler.unreserve(count, key)
            return
        fresh = [delivery(domain, self.numbers + i) for i in range(count)]
        self.numbers += count
        for action in self.scheduler.handed(fresh, count, by_domain, key):
            if isinstance(action, Release):
                self._release(action.delivery)
            else:
                assert isinstance(action, Route)
                self.routing.append(action)
                self.handed_routes.append(action)

    @precondition(lambda self: self.routing)
    @rule(choice=st.integers(0, 1000), settle_some=st.booleans())
    def route(self, choice: int, settle_some: bool) -> None:
        """One group routed: each delivery queued, or parked when its site is full, or
        settled at once (a route error, the simulator) when ``settle_some``."""
        group = self.routing.pop(choice % len(self.routing))
        queues = self.scheduler.ready_queues
        first = not queues.knew(str(group.group), group.poll)
        queues.note_domain(str(group.group), str(group.group), group.poll)
        for d in group.deliveries:
            if settle_some and int(d.queue_id[1:]) % 3 == 0:
                self._settle(d)
                self.in_memory -= 1
            elif queues.offer(d.domain, d.domain, d, first or group.reserved):
                pass  # now counted by the ready queues
            else:
                self.scheduler.parked(d)
                self.parked.add(key_of(d))
                self.in_memory -= 1
        self.scheduler.routed(len(group.deliveries))

    @precondition(lambda self: self.scheduler.ready_queues.sites())
    @rule(choice=st.integers(0, 1000), limit=st.integers(1, 10))
    def connect(self, choice: int, limit: int) -> None:
        queues = self.scheduler.ready_queues
        sites = [s for s in queues.sites() if queues.queued(s)]
        if not sites:
            return
        site = sites[choice % len(sites)]
        taken = queues.take(site, limit)
        if taken:
            self.sending.append((site, taken))

    @precondition(lambda self: self.sending)
    @rule(choice=st.integers(0, 1000), sent=st.integers(0, 10))
    def session_done(self, choice: int, sent: int) -> None:
        """A connection ends: the first ``sent`` settle, the rest go back to the queue."""
        site, batch = self.sending.pop(choice % len(self.sending))
        done, back = batch[:sent], batch[sent:]
        for d in done:
            self._settle(d)
        queues = self.scheduler.ready_queues
        if self.scheduler.stopped:
            queues.done(site, len(batch))
            for d in back:
                self._release(d)
        else:
            queues.put_back(site, site, back)
            queues.done(site, len(done))

    @rule()
    def stop(self) -> None:
        for action in self.scheduler.stop(lambda d: d):
            self._release(action.delivery)
        assert not any(self.scheduler.ready_queues.queued(s) for s in DOMAINS)

    @precondition(lambda self: self.scheduler.stopped)
    @rule()
    def restart(self) -> None:
        self.scheduler.start()

    def _settle(self, d: LeasedDelivery) -> None:
        assert self.scheduler.settled(d), f"{key_of(d)} settled twice or never held"
        assert key_of(d) not in self.settled
        self.settled.add(key_of(d))

    def _release(self, d: LeasedDelivery) -> None:
        self.scheduler.releasing(d)
        self.scheduler.released()
        self.released.add(key_of(d))

    def outstanding(self) -> int:
        """What the poll under way may still bring."""
        return self.lease.limit if self.lease is not None else 0

    @invariant()
    def window_never_exceeded(self) -> None:
        """Held deliveries, and what the poll under way may bring, fit the window:
        fresh mail reserved while a poll runs does not count on the poll's room."""
        queues = self.scheduler.ready_queues
        routing = sum(len(r.deliveries) for r in self.routing)
        assert queues.total() + routing + self.outstanding() <= self.window
        self.in_memory = queues.total() + routing + self.outstanding()

    @invariant()
    def reserved_mail_is_never_parked(self) -> None:
        """Fresh mail had its room before its commit: it is queued, never parked."""
        fresh = {key_of(d) for r in self.handed_routes for d in r.deliveries}
        assert not fresh & self.parked, fresh & self.parked

    @invariant()
    def every_lease_accounted_for(self) -> None:
        """Each delivery leased is exactly one of: held (routing, queued, sending),
        settled, parked or released."""
        held = {key_of(d) for d in self.scheduler.held()}
        assert not held & self.settled
        assert not held & self.parked
        assert not self.settled & self.released
        queued = {key_of(d) for d in self.scheduler.ready_queues.items()}
        sending = {key_of(d) for _, batch in self.sending for d in batch}
        routing = {key_of(d) for r in self.routing for d in r.deliveries}
        assert queued | sending | routing == held, (queued, sending, routing, held)
        counters = self.scheduler.counters
        assert counters["parked"] == len(self.parked)
        assert counters["released"] == len(self.released)


class SchedulerStateMachineTests(SynchronousTestCase):
    def test_random_sequences(self) -> None:
        """Hundreds of random sequences through the scheduler core keep the window,
        account for every lease and settle nothing twice."""
        run_state_machine_as_test(
            SchedulerMachine,
            settings=settings(max_examples=150, stateful_step_count=40, deadline=None),
        )


class SchedulerTests(SynchronousTestCase):
    """Single decisions, spelled out."""

    def test_no_second_poll_while_one_runs(self) -> None:
        scheduler: Scheduler[LeasedDelivery] = Scheduler(10)
        first = scheduler.poll(0.0)
        assert first is not None
        self.assertEqual((first.limit, first.skip_domains), (10, ()))
        self.assertIsNone(scheduler.poll(0.1))
        self.assertTrue(scheduler.wanted)
        # The wake that found a poll running asks for another one once it ends.
        self.assertTrue(scheduler.poll_done(0, first.limit))

    def test_resting_sites_left_out(self) -> None:
        """The domains of sites the node rests (dead or paused) are left out of the
        poll, for other nodes to take; other domains are not."""
        scheduler: Scheduler[LeasedDelivery] = Scheduler(10)
        scheduler.ready_queues.note_domain("a.test", "site-a")
        scheduler.ready_queues.note_domain("b.test", "site-b")
        lease = scheduler.poll(0.0, resting=["site-a"])
        assert lease is not None
        self.assertEqual(lease.skip_domains, ("a.test",))
        scheduler.poll_done(0, lease.limit)
        lease = scheduler.poll(1.0)
        assert lease is not None
        self.assertEqual(lease.skip_domains, ())

    def test_full_poll_polls_again(self) -> None:
        scheduler: Scheduler[LeasedDelivery] = Scheduler(10)
        lease = scheduler.poll(0.0)
        assert lease is not None
        got = [delivery("a.test") for _ in range(lease.limit)]
        routes = scheduler.leased(got, by_domain)
        self.assertEqual([len(r.deliveries) for r in routes if isinstance(r, Route)], [10])
        self.assertTrue(scheduler.poll_done(len(got), lease.limit))
        self.assertEqual(scheduler.counters["leased"], 10)

    def test_short_poll_past_a_full_site_polls_when_it_has_room(self) -> None:
        """A poll that left out a full site and came back short is run again once a
        connection to that site has made room enough for it to be polled for (its
        backlog is likely still due), once; not while the site is still full, not for
        another site's connection, and not after a poll that skipped no full site."""
        scheduler: Scheduler[LeasedDelivery] = Scheduler(10)
        scheduler.start()
        lease = fill_site(scheduler, 9)
        self.assertFalse(scheduler.poll_done(9, lease.limit))
        self.assertIn("site-a", scheduler.ready_queues.full_sites())
        lease = scheduler.poll(0.5)
        assert lease is not None
        self.assertEqual(lease.skip_domains, ("a.test",))
        self.assertFalse(scheduler.poll_done(0, lease.limit))

        self.assertFalse(send(scheduler, "site-b", 1))
        self.assertFalse(send(scheduler, "site-a", 1))  # room for 1: still full
        self.assertTrue(send(scheduler, "site-a", 2))  # room for 3 of a share of 9: hungry
        self.assertFalse(send(scheduler, "site-a", 2))  # answered once
        # A poll that skipped no full site leaves nothing to answer.
        lease = scheduler.poll(1.0, resting=["site-a"])
        assert lease is not None
        self.assertEqual(lease.skip_domains, ("a.test",))
        scheduler.poll_done(0, lease.limit)
        self.assertFalse(send(scheduler, "site-a", 1))

    def test_mail_queued_for_a_full_site_waits_for_its_room(self) -> None:
        """Fresh mail left in the spool asks for a poll only when the poll could take
        it: not when every site it goes to is full (it waits for that site's room,
        which then asks once) or resting; yes for a site never routed, a site with
        room, or mail to a full site and another."""
        scheduler: Scheduler[LeasedDelivery] = Scheduler(10)
        scheduler.start()
        lease = fill_site(scheduler, 9, ("b.test", "site-b"))
        # A full poll: nothing waits for site-a's room because of a short poll.
        self.assertTrue(scheduler.poll_done(lease.limit, lease.limit))
        self.assertIn("site-a", scheduler.ready_queues.full_sites())

        self.assertFalse(scheduler.queued(["a.test"]))
        self.assertFalse(scheduler.queued(["b.test"], resting=["site-b"]))
        self.assertTrue(scheduler.queued(["b.test"]))
        self.assertTrue(scheduler.queued(["new.test"]))
        self.assertTrue(scheduler.queued(["a.test", "b.test"]))

        self.assertFalse(send(scheduler, "site-a", 1))  # room for 1: still full
        # Room for 3 of a share of 9: the waiting mail's poll, once.
        self.assertTrue(send(scheduler, "site-a", 2))
        self.assertFalse(send(scheduler, "site-a", 1))
        scheduler.stop(lambda d: d)
        self.assertTrue(scheduler.queued(["a.test"]))

    def test_leased_while_stopping_goes_back(self) -> None:
        scheduler: Scheduler[LeasedDelivery] = Scheduler(10)
        lease = scheduler.poll(0.0)
        assert lease is not None
        scheduler.stop(lambda d: d)
        got = [delivery("a.test"), delivery("b.test")]
        self.assertEqual(scheduler.leased(got, by_domain), [Release(d) for d in got])
        self.assertEqual(scheduler.held(), [])
        self.assertIsNone(scheduler.poll(1.0))

    def test_handed_mail_takes_reserved_room(self) -> None:
        scheduler: Scheduler[LeasedDelivery] = Scheduler(3)
        scheduler.start()
        self.assertTrue(scheduler.reserve(2))
        # Reserved room is taken while the commit runs: a poll gets the rest only.
        lease = scheduler.poll(0.0)
        assert lease is not None
        self.assertEqual(lease.limit, 1)
        scheduler.poll_done(0, lease.limit)
        self.assertFalse(scheduler.reserve(2))
        got = [delivery("a.test"), delivery("a.test")]
        routes = scheduler.handed(got, 2, by_domain)
        self.assertEqual([r.deliveries for r in routes if isinstance(r, Route)], [tuple(got)])
        self.assertTrue(all(scheduler.holds(d) for d in got))
        self.assertEqual(scheduler.counters["handed"], 2)
        self.assertFalse(scheduler.reserve(2))
        scheduler.routed(2)
        for d in got:
            scheduler.settled(d)
        self.assertTrue(scheduler.reserve(3))
        scheduler.unreserve(3)
        self.assertTrue(scheduler.reserve(3))

    def test_active_queue_leaves_a_full_site_to_the_spool(self) -> None:
        """Fresh mail to a site holding its share is not taken in memory (it would
        only be parked): it goes through the spool; mail to other sites still is.
        Commits under way count against their site."""
        scheduler = holding(16)
        self.assertEqual(scheduler.ready_queues.room("site-a"), 2)
        self.assertTrue(scheduler.reserve(1, "m1", ["a.test"]))
        self.assertTrue(scheduler.reserve(1, "m2", ["A.test"]))
        self.assertFalse(scheduler.reserve(1, "m3", ["a.test"]))  # two commits under way
        self.assertTrue(scheduler.reserve(1, "m4", ["b.test"]))  # a site not yet known
        scheduler.unreserve(1, "m1")
        self.assertTrue(scheduler.reserve(1, "m5", ["a.test"]))
        scheduler.handed([delivery("a.test")], 1, by_domain, "m2")
        self.assertTrue(scheduler.reserve(1, "m6", ["a.test"]))

    def test_handed_mail_is_routed_as_reserved(self) -> None:
        """Handed-over mail comes as a reserved route (queued whatever its site holds,
        within the window); a poll's does not."""
        scheduler: Scheduler[LeasedDelivery] = Scheduler(20)
        scheduler.start()
        self.assertTrue(scheduler.reserve(1, "m1", ["a.test"]))
        routes = scheduler.handed([delivery("a.test")], 1, by_domain, "m1")
        self.assertEqual([r.reserved for r in routes if isinstance(r, Route)], [True])
        lease = scheduler.poll(0.0)
        assert lease is not None
        routes = scheduler.leased([delivery("a.test")], by_domain)
        self.assertEqual([r.reserved for r in routes if isinstance(r, Route)], [False])

    def test_poll_leaves_a_sites_reserved_room_to_its_commits(self) -> None:
        """While fresh mail to a site is being committed, a poll may take no more of
        that site's room than is left beside it: otherwise the committed mail, handed
        over, would find its site full."""
        scheduler = holding(10)
        queues = scheduler.ready_queues
        self.assertEqual(queues.room("site-a"), 8)
        for key in ("m1", "m2", "m3"):
            self.assertTrue(scheduler.reserve(1, key, ["a.test"]))
        lease = scheduler.poll(0.0)
        assert lease is not None
        self.assertEqual(lease.limit, 5)
        scheduler.poll_done(0, lease.limit)
        scheduler.handed([delivery("a.test")], 1, by_domain, "m1")
        self.assertEqual(queues.open_room("site-a"), 6)

    def test_active_queue_leaves_a_resting_site_to_the_spool(self) -> None:
        """Fresh mail whose every domain goes to a resting site (dead or paused) is
        not taken in memory: it would only be deferred, one commit and event at a
        time.  Mail that also goes elsewhere, or to a domain never routed, is."""
        scheduler: Scheduler[LeasedDelivery] = Scheduler(20)
        scheduler.start()
        queues = scheduler.ready_queues
        queues.note_domain("a.test", "site-a")
        queues.note_domain("a2.test", "site-a")
        queues.note_domain("b.test", "site-b")
        resting = ["site-a"]
        self.assertFalse(scheduler.reserve(1, "m1", ["a.test"], resting))
        self.assertFalse(scheduler.reserve(2, "m2", ["a.test", "a2.test"], resting))
        self.assertTrue(scheduler.reserve(2, "m3", ["a.test", "b.test"], resting))
        self.assertTrue(scheduler.reserve(2, "m4", ["a.test", "new.test"], resting))
        self.assertTrue(scheduler.reserve(1, "m5", ["a.test"], []))  # rested
        # Refused reservations took no room: only m3, m4 and m5 hold some.
        self.assertEqual(scheduler.poll(0.0).limit, 20 - 5)  # type: ignore[union-attr]

    def test_handed_while_stopping_goes_back(self) -> None:
        scheduler: Scheduler[LeasedDelivery] = Scheduler(10)
        self.assertTrue(scheduler.reserve(1))
        scheduler.stop(lambda d: d)
        d = delivery("a.test")
        self.assertEqual(scheduler.handed([d], 1, by_domain), [Release(d)])
        self.assertFalse(scheduler.reserve(1))

    def test_settled_once(self) -> None:
        scheduler: Scheduler[LeasedDelivery] = Scheduler(10)
        scheduler.poll(0.0)
        d = delivery("a.test")
        scheduler.leased([d], by_domain)
        self.assertTrue(scheduler.holds(d))
        self.assertTrue(scheduler.settled(d))
        self.assertFalse(scheduler.settled(d))


def shape(site: str = "s", initial: int = 2, rate: float | None = None) -> SiteShape:
    return SiteShape(
        site=site, max_connections=10, messages_per_connection=50, tls="may",
        window=DestinationWindow(initial=initial, maximum=initial, minimum=1, dead_after=1,
                                 suspend_for=60.0),
        rate=AdaptiveRate(rate, rate / 10) if rate is not None else None,
    )


class SiteStepTests(SynchronousTestCase):
    """What a site's drainer does next, decided without a connection."""

    def setUp(self) -> None:
        self.scheduler: Scheduler[LeasedDelivery] = Scheduler(10)
        self.d = delivery("a.test")
        self.scheduler.ready_queues.offer("s", "lane", self.d)

    def test_nothing_queued(self) -> None:
        self.assertIsNone(self.scheduler.site_step("other", shape("other"), 0.0))

    def test_connect_takes_a_window_slot(self) -> None:
        """Within the window: connect, with a batch of messages_per_connection; the
        window's slots run out, and a failed connect gives its slot back."""
        s = shape(initial=2)
        first = self.scheduler.site_step("s", s, 0.0)
        self.assertEqual(first, Connect(50, ANY_SLOT))
        self.assertEqual(self.scheduler.site_step("s", s, 0.0), Connect(50, ANY_SLOT))
        self.assertEqual(self.scheduler.site_step("s", s, 0.0), WaitUntil(DRAIN_NAP))
        assert isinstance(first, Connect)
        self.scheduler.connect_failed(first)
        # Given back once: a second call frees no other connection's slot.
        self.scheduler.connect_failed(first)
        self.assertEqual(s.window.active, 1)
        self.assertEqual(self.scheduler.site_step("s", s, 1.0), Connect(50, ANY_SLOT))

    def test_paced_site(self) -> None:
        """A paced site opens only the connections its rate needs, and takes a batch
        of what the rate admits in a few seconds."""
        s = shape(initial=5, rate=60.0)  # one a second
        self.assertEqual(self.scheduler.site_step("s", s, 0.0), Connect(11, ANY_SLOT))
        self.scheduler.session_started("s")
        self.assertEqual(self.scheduler.site_step("s", s, 0.0), WaitUntil(DRAIN_NAP))
        self.scheduler.session_ended("s")
        self.assertEqual(self.scheduler.sessions("s"), 0)

    def test_back_off_once(self) -> None:
        s = shape()
        self.scheduler.back_off("s")
        self.assertEqual(self.scheduler.site_step("s", s, 5.0), WaitUntil(5.0 + DRAIN_NAP))
        self.assertIsInstance(self.scheduler.site_step("s", s, 5.0), Connect)

    def test_dead_site_is_deferred(self) -> None:
        """Until its suspension ends: a try before then would only be deferred again."""
        s = shape(initial=1)
        s.window.failure(0.0)
        step = self.scheduler.site_step("s", s, 1.0)
        self.assertEqual(step, DeferSite(Reply(451, "4.4.1",
                                               "s: destination not responding, suspended"),
                                         not_before=60.0))

    def test_paused_site_is_deferred(self) -> None:
        s = shape()
        for _ in range(3):
            s.throttled(0.0, refused=True)
        step = self.scheduler.site_step("s", s, 10.0)
        assert isinstance(step, DeferSite)
        self.assertEqual((step.reply.code, step.reply.enhanced), (451, "4.7.0"))
        self.assertIn("try again in 50 seconds", step.reply.text)
        self.assertIsNone(step.not_before)  # the reply names the wait
        self.assertIsNone(pause_reply("s", s, 61.0))

    def test_hold_is_not_cut_short(self) -> None:
        """After a spool failure the site opens nothing for DRAIN_NAP seconds, however
        often the drainer is woken meanwhile."""
        s = shape()
        self.scheduler.hold_site("s", 10.0)
        for now in (10.0, 10.2, 10.9):
            self.assertEqual(self.scheduler.site_step("s", s, now), WaitUntil(10.0 + DRAIN_NAP))
        self.assertIsInstance(self.scheduler.site_step("s", s, 11.0), Connect)

    def test_operator_suspension(self) -> None:
        """A suspended site defers what it holds until the suspension ends or is
        lifted; an ended suspension is forgotten."""
        s = shape()
        self.scheduler.suspend("s", 100.0)
        self.assertEqual(self.scheduler.suspensions(50.0), {"s": 100.0})
        step = self.scheduler.site_step("s", s, 50.0)
        self.assertEqual(step, DeferSite(Reply(451, "4.7.0", "s: suspended by the operator")))
        self.assertIsInstance(self.scheduler.site_step("s", s, 100.0), Connect)
        self.assertEqual(self.scheduler.suspensions(100.0), {})
        self.assertFalse(self.scheduler.resume("s"))
        self.scheduler.suspend("s", 200.0)
        self.assertTrue(self.scheduler.resume("s"))
        self.assertIsNone(self.scheduler.suspended_until("s", 150.0))
        self.assertIsInstance(self.scheduler.site_step("s", s, 150.0), Connect)


class GatherTests(SynchronousTestCase):
    """While other clients are sending, fresh mail waits a moment for company, so that
    one outgoing session carries several messages; nothing else ever waits for it."""

    def setUp(self) -> None:
        self.scheduler: Scheduler[LeasedDelivery] = Scheduler(
            100, gather_wait=0.05, gather_target=3
        )
        self.shape = shape(initial=5)

    def offer(self, n: int = 1) -> None:
        for _ in range(n):
            self.scheduler.ready_queues.offer("s", "lane", delivery("a.test"))

    def test_lone_message_goes_at_once(self) -> None:
        """Nobody else sending: connect now, however short the queue."""
        self.offer()
        self.assertIsInstance(self.scheduler.site_step("s", self.shape, 0.0, False), Connect)

    def test_waits_while_clients_send(self) -> None:
        """Others sending: the first message waits out the clock, woken as often as
        it may be; then it goes with whatever came meanwhile."""
        self.offer()
        for now in (10.0, 10.01, 10.049):
            self.assertEqual(
                self.scheduler.site_step("s", self.shape, now, True), WaitUntil(10.05)
            )
        self.offer()
        self.assertIsInstance(self.scheduler.site_step("s", self.shape, 10.05, True), Connect)

    def test_target_ends_the_wait(self) -> None:
        self.offer(2)
        self.assertIsInstance(self.scheduler.site_step("s", self.shape, 0.0, True), WaitUntil)
        self.offer()
        self.assertIsInstance(self.scheduler.site_step("s", self.shape, 0.001, True), Connect)

    def test_clients_stopping_end_the_wait(self) -> None:
        self.offer()
        self.assertIsInstance(self.scheduler.site_step("s", self.shape, 0.0, True), WaitUntil)
        self.assertIsInstance(self.scheduler.site_step("s", self.shape, 0.01, False), Connect)

    def test_each_batch_starts_its_own_clock(self) -> None:
        """The clock starts with the first message that waits, not with the last
        batch: after a connection, the next message waits its whole time again."""
        self.offer(3)
        self.assertIsInstance(self.scheduler.site_step("s", self.shape, 0.0, True), Connect)
        self.scheduler.ready_queues.take("s", 3)
        self.assertIsNone(self.scheduler.site_step("s", self.shape, 0.02, True))
        self.offer()
        self.assertEqual(self.scheduler.site_step("s", self.shape, 0.03, True), WaitUntil(0.08))

    def test_target_capped_by_batch(self) -> None:
        """A target above what one connection takes (a paced site's small batch)
        counts as that batch."""
        paced = shape(initial=5, rate=6.0)  # batch_size: 2
        self.offer(2)
        self.assertIsInstance(self.scheduler.site_step("s", paced, 0.0, True), Connect)

    def test_off(self) -> None:
        scheduler: Scheduler[LeasedDelivery] = Scheduler(100, gather_wait=0.0, gather_target=20)
        scheduler.ready_queues.offer("s", "lane", delivery("a.test"))
        self.assertIsInstance(scheduler.site_step("s", self.shape, 0.0, True), Connect)

    @given(
        st.lists(st.tuples(st.floats(0, 0.2), st.booleans(), st.integers(0, 2)), max_size=30),
    )
    def test_never_waits_past_the_clock(self, steps: list[tuple[float, bool, int]]) -> None:
        """Whatever the arrivals and the clients do, no message waits longer than
        gather_wait after the first of its batch began to wait."""
        scheduler: Scheduler[LeasedDelivery] = Scheduler(1000, gather_wait=0.05, gather_target=5)
        s = shape(initial=1000)
        now, waiting_since = 0.0, None
        for gap, busy, arrivals in steps:
            now += gap
            for _ in range(arrivals):
                scheduler.ready_queues.offer("s", "lane", delivery("a.test"))
            step = scheduler.site_step("s", s, now, busy)
            if isinstance(step, WaitUntil):
                if waiting_since is None:
                    waiting_since = now
                self.assertLessEqual(step.when, waiting_since + 0.05 + 1e-9)
                self.assertGreater(step.when, now)
            else:
                waiting_since = None
                if isinstance(step, Connect):
                    scheduler.ready_queues.take("s", step.batch)

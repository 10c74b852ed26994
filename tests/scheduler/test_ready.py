"""Tests for sendarix.scheduler.ready: per-site ready queues, the fair split of the
window, the lease poll's skip list and parking; and a simulated 100 000-message burst
to one provider on a Clock."""

from __future__ import annotations

from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock, LoopingCall
from twisted.trial.unittest import SynchronousTestCase

from sendarix.routing.throttle import MemoryThrottle
from sendarix.scheduler.ready import MAX_PARK, MIN_PARK, ReadyQueues


class ReadyQueuesTests(SynchronousTestCase):
    """Bookkeeping of one node's ready queues."""

    def test_lone_site_keeps_reserve(self) -> None:
        """One site alone may hold the window less the reserve (a tenth)."""
        q: ReadyQueues[int] = ReadyQueues(100)
        accepted = sum(q.offer("gmail", "lane", i) for i in range(200))
        self.assertEqual(accepted, 90)
        self.assertEqual(q.held("gmail"), 90)
        self.assertEqual(q.room("yahoo"), 10)
        self.assertTrue(q.offer("yahoo", "lane", 1))

    def test_share_splits_among_active_sites(self) -> None:
        """With two sites holding mail each may hold half of what the reserve leaves; a
        site above its share takes nothing until it drained below it."""
        q: ReadyQueues[int] = ReadyQueues(100)
        for i in range(90):
            q.offer("gmail", "lane", i)
        q.offer("yahoo", "lane", 0)
        self.assertEqual(q.share("gmail"), 45)
        self.assertFalse(q.offer("gmail", "lane", 99))
        for _ in range(45):
            q.done("gmail", len(q.take("gmail", 1)))
        self.assertFalse(q.offer("gmail", "lane", 99))
        q.done("gmail", len(q.take("gmail", 1)))
        self.assertTrue(q.offer("gmail", "lane", 99))

    def test_take_one_lane_in_order(self) -> None:
        """A batch holds items of the first item's lane only, in queue order; the others
        keep their places."""
        q: ReadyQueues[str] = ReadyQueues(100)
        for lane, item in [("a", "a1"), ("b", "b1"), ("a", "a2"), ("b", "b2"), ("a", "a3")]:
            q.offer("site", lane, item)
        self.assertEqual(q.take("site", 2), ["a1", "a2"])
        self.assertEqual(q.take("site", 5), ["b1", "b2"])
        self.assertEqual(q.take("site", 5), ["a3"])
        self.assertEqual((q.queued("site"), q.held("site")), (0, 5))

    def test_put_back_first_in_line(self) -> None:
        """Items not sent go back to the head of the queue, in their order."""
        q: ReadyQueues[str] = ReadyQueues(100)
        for item in ["x1", "x2", "x3"]:
            q.offer("site", "x", item)
        batch = q.take("site", 2)
        q.put_back("site", "x", batch)
        self.assertEqual(q.take("site", 3), ["x1", "x2", "x3"])

    def test_done_more_than_taken(self) -> None:
        """Settling more than was taken is a bug, reported at once."""
        q: ReadyQueues[str] = ReadyQueues(10)
        q.offer("site", "x", "x1")
        q.take("site", 1)
        self.assertRaises(ValueError, q.done, "site", 2)

    def test_skip_domains(self) -> None:
        """Domains of full sites are skipped, others not; a domain moving to another
        site follows it."""
        q: ReadyQueues[int] = ReadyQueues(10)
        q.note_domain("gmail.com", "gmail")
        q.note_domain("Workspace.example", "gmail")
        q.note_domain("yahoo.com", "yahoo")
        self.assertEqual(q.skip_domains(), [])
        for i in range(9):
            q.offer("gmail", "lane", i)
        self.assertEqual(sorted(q.skip_domains()), ["gmail.com", "workspace.example"])
        q.note_domain("workspace.example", "mx:other")
        self.assertEqual(q.skip_domains(), ["gmail.com"])

    def test_poll_limit(self) -> None:
        """A poll takes no more than a hungry site has room for, nor more than a site
        seen before (holding nothing now) may hold; a site that is not hungry is left
        out of the poll instead."""
        q: ReadyQueues[int] = ReadyQueues(100)
        self.assertEqual(q.poll_limit(100), 100)
        q.note_domain("gmail.com", "gmail")
        self.assertEqual(q.poll_limit(100), 90)
        for i in range(60):
            q.offer("gmail", "lane", i)
        # gmail: room 30 (hungry); a new site would get 45.
        self.assertTrue(q.hungry("gmail"))
        self.assertEqual(q.poll_limit(40), 30)
        self.assertEqual(q.skip_domains(), [])
        for i in range(10):
            q.offer("gmail", "lane", i)
        # room 20 < 90 // 4: left out, so the poll may fill the rest with others.
        self.assertFalse(q.hungry("gmail"))
        self.assertEqual(q.skip_domains(), ["gmail.com"])
        self.assertEqual(q.poll_limit(30), 30)

    def test_poll_leaves_promised_room(self) -> None:
        """Room promised to fresh mail whose commit is under way is not the poll's: it
        counts against the site's poll limit and its hunger, never against what the
        site may queue."""
        promised: dict[str, int] = {}
        q: ReadyQueues[int] = ReadyQueues(100, promised=promised)
        for i in range(60):
            q.offer("gmail", "lane", i)
        self.assertEqual((q.room("gmail"), q.open_room("gmail")), (30, 30))
        self.assertEqual(q.poll_limit(100), 30)
        promised["gmail"] = 5
        self.assertEqual((q.room("gmail"), q.open_room("gmail")), (30, 25))
        self.assertEqual(q.poll_limit(100), 25)
        self.assertNotIn("gmail", q.full_sites())
        promised["gmail"] = 10  # room for 20 left: less than a quarter of the share
        self.assertIn("gmail", q.full_sites())
        self.assertEqual(q.skip_domains(), [])  # no domain of it known yet
        q.note_domain("gmail.com", "gmail")
        self.assertEqual(q.skip_domains(), ["gmail.com"])
        self.assertTrue(all(q.offer("gmail", "lane", i) for i in range(30)))

    def test_first_contact(self) -> None:
        """A site first met in a poll may take that poll's mail beyond its share
        (forced, within the window); from the next poll on it is known."""
        q: ReadyQueues[int] = ReadyQueues(10)
        self.assertFalse(q.knew("gmail", 1))
        q.note_domain("gmail.com", "gmail", 1)
        q.note_domain("googlemail.com", "gmail", 1)
        self.assertFalse(q.knew("gmail", 1))
        self.assertTrue(q.knew("gmail", 2))
        self.assertEqual(sum(q.offer("gmail", "lane", i, force=True) for i in range(12)), 10)
        self.assertFalse(q.offer("yahoo", "lane", 0, force=True))

    def test_domains_bounded(self) -> None:
        """Only the most recent ``max_domains`` domains are remembered."""
        q: ReadyQueues[int] = ReadyQueues(10, max_domains=3)
        for i in range(5):
            q.note_domain(f"d{i}.test", "site")
        q.offer("site", "lane", 0)
        q.reserve = 9  # the one item fills the site
        self.assertEqual(sorted(q.skip_domains()), ["d2.test", "d3.test", "d4.test"])

    def test_park_spread_at_site_pace(self) -> None:
        """Parked deliveries come back one interval apart, behind what the site holds,
        never sooner than MIN_PARK nor later than MAX_PARK."""
        q: ReadyQueues[int] = ReadyQueues(100)
        for i in range(20):
            q.offer("slow", "lane", i)
        times = [q.park_until("slow", 1000.0, 0.5) for _ in range(3)]
        self.assertEqual(times, [1010.0, 1010.5, 1011.0])
        self.assertEqual(q.park_until("fast", 1000.0, 0.0), 1000.0 + MIN_PARK)
        self.assertEqual(q.park_until("slower", 1000.0, 3600.0), 1000.0 + MIN_PARK)
        self.assertEqual(q.park_until("slower", 1000.0, 3600.0), 1000.0 + MAX_PARK)

    @given(st.integers(0, 200), st.floats(0.0, 100.0), st.integers(1, 50))
    def test_park_bounds(self, held: int, interval: float, count: int) -> None:
        """Park times stay between MIN_PARK and MAX_PARK from now, never go down, and
        are at least one interval apart until the cap."""
        q: ReadyQueues[int] = ReadyQueues(1000, reserve=0)
        for i in range(held):
            q.offer("site", "lane", i)
        times = [q.park_until("site", 500.0, interval) for _ in range(count)]
        for a, b in zip(times, times[1:], strict=False):
            self.assertTrue(b >= a)
            if b < 500.0 + MAX_PARK:
                self.assertAlmostEqual(b - a, interval, delta=1e-6 * max(1.0, interval))
        self.assertTrue(all(500.0 + MIN_PARK <= t <= 500.0 + MAX_PARK for t in times))

    def test_bad_sizes(self) -> None:
        """A window below one or a reserve not below the window is refused."""
        self.assertRaises(ValueError, ReadyQueues, 0)
        self.assertRaises(ValueError, ReadyQueues, 10, 10)

    @settings(max_examples=200, deadline=None)
    @given(
        st.integers(1, 50),
        st.lists(
            st.tuples(st.sampled_from(["offer", "take", "done", "back"]),
                      st.sampled_from(["a", "b", "c", "d"]), st.integers(1, 8)),
            max_size=200,
        ),
    )
    def test_never_above_window(self, window: int, ops: list[tuple[str, str, int]]) -> None:
        """Whatever happens, the node holds at most ``window`` entries, an offer is
        accepted exactly when the site has room, and a site holding nothing has room
        whenever the window is not full."""
        q: ReadyQueues[int] = ReadyQueues(window)
        taken: dict[str, list[int]] = {}
        for op, site, n in ops:
            if op == "offer":
                for i in range(n):
                    room = q.room(site)
                    if q.held(site) == 0:
                        self.assertEqual(room > 0, q.total() < window)
                    self.assertEqual(q.offer(site, "lane", i), room > 0)
            elif op == "take":
                taken.setdefault(site, []).extend(q.take(site, n))
            elif op == "done":
                mine = taken.get(site, [])
                count = min(n, len(mine))
                del mine[:count]
                q.done(site, count)
            else:
                mine = taken.get(site, [])
                q.put_back(site, "lane", mine[:n])
                del mine[:n]
            self.assertLessEqual(q.total(), window)
            self.assertEqual(
                q.total(), sum(q.held(s) for s in "abcd"),
            )


class BurstSimulationTests(SynchronousTestCase):
    """A 100 000-message burst to one paced provider, with mail to other sites arriving
    throughout, run on a Clock through the same bookkeeping the delivery agent uses."""

    def test_burst_paced_others_not_starved(self) -> None:
        """The provider never gets more than its rate (10/s), it is kept busy, other
        sites' mail leaves within a second of arriving, and the backlog is not leased
        again and again (churn)."""
        clock = Clock()
        throttle = MemoryThrottle()
        window, rate, period, poll = 100, 600.0, 60.0, 0.5
        queues: ReadyQueues[str] = ReadyQueues(window)
        # The spool: per domain, due items in order (all due at once: oldest first).
        spool: dict[str, deque[str]] = {"gmail.com": deque(f"g{i}" for i in range(100_000))}
        arrived: dict[str, float] = {}
        sent: dict[str, float] = {}
        leases: dict[str, int] = {}
        parked: list[tuple[float, str, str]] = []

        def site_of(domain: str) -> str:
            return "gmail" if domain == "gmail.com" else "mx:" + domain

        polls = 0

        def lease() -> None:
            nonlocal polls
            polls += 1
            now = clock.seconds()
            for entry in [p for p in parked if p[0] <= now]:
                parked.remove(entry)
                spool.setdefault(entry[1], deque()).appendleft(entry[2])
            free = queues.poll_limit(window - queues.total())
            skip = set(queues.skip_domains())
            for domain, items in list(spool.items()):
                if free <= 0:
                    break
                if domain in skip:
                    continue
                while items and free > 0:
                    item = items.popleft()
                    free -= 1
                    leases[item] = leases.get(item, 0) + 1
                    site = site_of(domain)
                    first = not queues.knew(site, polls)
                    queues.note_domain(domain, site, polls)
                    if not queues.offer(site, domain, item, first):
                        interval = period / rate if site == "gmail" else 0.0
                        parked.append((queues.park_until(site, now, interval), domain, item))
                if not items:
                    del spool[domain]
            self.assertLessEqual(queues.total(), window)

        def drain() -> None:
            now = clock.seconds()
            for site in queues.sites():
                while queues.queued(site):
                    if site == "gmail" and throttle.admit("rate:gmail", rate, period, now) > 0:
                        break
                    for item in queues.take(site, 1):
                        sent[item] = now
                    queues.done(site, 1)

        arrivals = 0

        def arrive() -> None:
            nonlocal arrivals
            domain = f"other{arrivals % 7}.test"
            for n in range(3):
                item = f"o{arrivals}-{n}"
                spool.setdefault(domain, deque()).append(item)
                arrived[item] = clock.seconds()
            arrivals += 1

        loops = [LoopingCall(lease), LoopingCall(drain), LoopingCall(arrive)]
        for loop, interval in zip(loops, (poll, 0.05, 2.3), strict=True):
            loop.clock = clock
            loop.start(interval, now=True)
        clock.pump([0.05] * int(600 / 0.05))
        for loop in loops:
            loop.stop()

        gmail = sorted(t for item, t in sent.items() if item.startswith("g"))
        gaps = [b - a for a, b in zip(gmail, gmail[1:], strict=False)]
        self.assertGreaterEqual(min(gaps), period / rate - 1e-6)
        # Paced, not idle: the provider got (nearly) its full rate for ten minutes.
        self.assertGreaterEqual(len(gmail), 600 * rate / period - 10)
        self.assertLessEqual(len(gmail), 600 * rate / period + 1)
        late = [item for item in arrived if item not in sent]
        self.assertLessEqual(len(late), 3)  # at most the very last arrival
        waits = [sent[item] - arrived[item] for item in arrived if item in sent]
        self.assertGreater(len(waits), 700)
        self.assertLessEqual(max(waits), 1.0 + 1e-6)
        # No churn: the first poll (before gmail was known) was kept whole, after
        # that the polls left gmail's backlog in the spool; nothing was leased twice.
        self.assertEqual(max(leases.values()), 1)
        self.assertEqual(parked, [])
        self.assertLessEqual(sum(leases.values()), len(sent) + window)

"""Tests for sendarix.egress.sources: tiers, warmup caps, deprioritization."""

from __future__ import annotations

import datetime
import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from sendarix.config.settings import EgressSourceConfig, WarmupConfig
from sendarix.egress.sources import Mark, TieredSelector
from sendarix.interfaces import IEgressSelector
from sendarix.stores.redis.connection import connect
from sendarix.stores.redis.selector import SharedTieredSelector
from tests.support.redisserver import redis_client

DAY0 = datetime.date(2024, 1, 1)


def _src(
    name: str, tier: int = 1, pool: str = "default", daily: tuple[int, ...] = ()
) -> EgressSourceConfig:
    warmup = WarmupConfig(start=DAY0, daily=daily) if daily else None
    return EgressSourceConfig(
        name=name, address=f"192.0.2.{len(name) + 1}", tier=tier, pool=pool, warmup=warmup
    )


def _tally(sel: TieredSelector, n: int, now: float, today: datetime.date, record: bool = True):
    counts: Counter[str | None] = Counter()
    for _ in range(n):
        s = sel.choose("default", "gmail", now, today)
        counts[s.name if s else None] += 1
        if s is not None and record:
            sel.record_send(s, "gmail", today)
    return counts


class TieredSelectorTests(SynchronousTestCase):
    """TieredSelector picks sources by tier, warmup budget and penalty."""

    def test_interface(self) -> None:
        """TieredSelector provides IEgressSelector."""
        self.assertTrue(verifyObject(IEgressSelector, TieredSelector(())))

    def test_tiers_respected(self) -> None:
        """The best tier takes all traffic while it can send."""
        sel = TieredSelector((_src("b", tier=2), _src("a", tier=1)), rng=random.Random(1))
        self.assertEqual(_tally(sel, 50, 0.0, DAY0), Counter({"a": 50}))

    def test_pool_filter(self) -> None:
        """Only sources of the requested pool are chosen."""
        sel = TieredSelector((_src("a", pool="other"),))
        self.assertIsNone(sel.choose("default", "gmail", 0.0, DAY0))
        self.assertEqual(sel.choose("other", "gmail", 0.0, DAY0).name, "a")  # type: ignore[union-attr]

    def test_same_tier_shares(self) -> None:
        """Sources of one tier share traffic."""
        sel = TieredSelector((_src("a"), _src("bb")), rng=random.Random(2))
        counts = _tally(sel, 400, 0.0, DAY0)
        self.assertGreater(counts["a"], 120)
        self.assertGreater(counts["bb"], 120)

    @settings(max_examples=30, deadline=None)
    @given(
        daily=st.lists(st.integers(1, 30), min_size=1, max_size=4),
        day=st.integers(0, 5),
        seed=st.integers(0, 1000),
    )
    def test_warmup_caps_hold(self, daily: list[int], day: int, seed: int) -> None:
        """A warming source never exceeds its daily cap per provider, even when it is
        the only tier-1 source and the others are worse or penalized (failover)."""
        sel = TieredSelector(
            (_src("warm"), _src("cold", daily=tuple(daily)), _src("backup", tier=2)),
            rng=random.Random(seed),
        )
        today = DAY0 + datetime.timedelta(days=day)
        sel.penalize("warm", "gmail", 0.0)
        counts = _tally(sel, 200, 0.0, today)
        cap = daily[day] if day < len(daily) else None
        if cap is not None:
            self.assertEqual(counts["cold"], min(cap, 200))
            self.assertEqual(sel.sent("cold", "gmail", today), counts["cold"])
        # The budget is per provider: another provider starts fresh.
        self.assertIsNotNone(sel.choose("default", "yahoo", 0.0, today))

    def test_cap_per_day(self) -> None:
        """The cap resets the next day and follows the schedule."""
        sel = TieredSelector((_src("cold", daily=(2, 5)),))
        self.assertEqual(_tally(sel, 10, 0.0, DAY0), Counter({"cold": 2, None: 8}))
        day1 = DAY0 + datetime.timedelta(days=1)
        self.assertEqual(_tally(sel, 10, 0.0, day1), Counter({"cold": 5, None: 5}))
        day2 = DAY0 + datetime.timedelta(days=2)
        self.assertEqual(_tally(sel, 10, 0.0, day2), Counter({"cold": 10}))

    def test_exhausted_tier_falls_to_next(self) -> None:
        """When every better-tier source is out of budget, a worse tier sends."""
        sel = TieredSelector((_src("cold", daily=(3,)), _src("b", tier=2)))
        self.assertEqual(_tally(sel, 10, 0.0, DAY0), Counter({"cold": 3, "b": 7}))

    def test_penalty_shifts_and_decays(self) -> None:
        """A penalized source loses its provider's traffic to its tier peer, only for
        that provider, and wins it back as the mark decays."""
        sel = TieredSelector((_src("a"), _src("bb")), half_life=3600.0, rng=random.Random(3))
        sel.penalize("a", "gmail", 0.0)
        self.assertEqual(_tally(sel, 100, 10.0, DAY0), Counter({"bb": 100}))
        self.assertEqual(sel.choose("default", "yahoo", 10.0, DAY0) is not None, True)
        other = Counter(
            sel.choose("default", "yahoo", 10.0, DAY0).name for _ in range(200)  # type: ignore[union-attr]
        )
        self.assertGreater(other["a"], 50)
        self.assertAlmostEqual(sel.penalty("a", "gmail", 3600.0), 0.5)
        later = 3600.0 * 5  # 1/32 < threshold 0.1
        counts = _tally(sel, 400, later, DAY0)
        self.assertGreater(counts["a"], 120)

    def test_whole_tier_penalized_stays_in_tier(self) -> None:
        """When every source of a tier is marked, the least-marked one sends rather
        than a worse tier."""
        sel = TieredSelector((_src("a"), _src("bb"), _src("c", tier=2)))
        sel.penalize("a", "gmail", 0.0)
        sel.penalize("a", "gmail", 0.0)
        sel.penalize("bb", "gmail", 0.0)
        self.assertEqual(_tally(sel, 20, 0.0, DAY0), Counter({"bb": 20}))

    def test_restore_after_restart(self) -> None:
        """A new selector restored from a snapshot keeps today's counts (so the warmup
        cap still holds) and the marks, decaying from when the snapshot was written;
        counts of another day and unknown sources are ignored."""
        day = DAY0 + datetime.timedelta(days=1)
        now = datetime.datetime.combine(day, datetime.time(12), datetime.UTC).timestamp()
        first = TieredSelector((_src("warm", daily=(5, 5)), _src("b")), half_life=3600.0)
        for _ in range(5):
            first.record_send("warm", "gmail", day)
        first.penalize("b", "gmail", now)
        snapshot = first.snapshot(now, day)
        snapshot.append({"name": "gone", "sent_today": {"gmail": 9}})
        second = TieredSelector((_src("warm", daily=(5, 5)), _src("b")), half_life=3600.0)
        self.assertEqual(second.restore(snapshot, now, day), 2)
        self.assertEqual(second.remaining(_src("warm", daily=(5, 5)), "gmail", day), 0)
        self.assertAlmostEqual(second.penalty("b", "gmail", now + 3600.0), 0.5)
        # Written yesterday: the counts are yesterday's, the warmup budget is whole.
        third = TieredSelector((_src("warm", daily=(5, 5)), _src("b")))
        third.restore(snapshot, now, day + datetime.timedelta(days=1))
        self.assertEqual(third.sent("warm", "gmail", day + datetime.timedelta(days=1)), 0)

    def test_duplicate_names(self) -> None:
        """Source names must be unique."""
        self.assertRaises(ValueError, TieredSelector, (_src("a"), _src("a")))

    def test_mark_halves_per_half_life(self) -> None:
        """A mark halves every half-life after it was set, and not before."""
        mark = Mark(2.0, 100.0)
        self.assertEqual(mark.at(50.0, 10.0), 2.0)
        self.assertEqual(mark.at(100.0, 10.0), 2.0)
        self.assertEqual(mark.at(120.0, 10.0), 0.5)

    def test_merge_sent_keeps_the_larger(self) -> None:
        """A count from elsewhere replaces ours only when larger."""
        sel = TieredSelector((_src("a"),))
        sel.record_send("a", "gmail", DAY0)
        sel.merge_sent("a", "gmail", DAY0, 4)
        sel.merge_sent("a", "gmail", DAY0, 2)
        self.assertEqual(sel.sent("a", "gmail", DAY0), 4)

    def test_merge_mark_keeps_the_higher_now(self) -> None:
        """A mark from elsewhere replaces ours when it is higher now, decayed from
        when it was set."""
        one = TieredSelector((_src("a"),), half_life=100.0)
        two = TieredSelector((_src("a"),), half_life=100.0)
        self.assertIsNone(one.mark("a", "gmail"))
        one.penalize("a", "gmail", 0.0)
        one.penalize("a", "gmail", 0.0)
        self.assertEqual(one.mark("a", "gmail"), Mark(2.0, 0.0))
        two.penalize("a", "gmail", 150.0)  # 1.0 at 150 beats 2.0 set at 0 (0.707)
        mark = two.mark("a", "gmail")
        assert mark is not None
        one.merge_mark("a", "gmail", mark, 150.0)
        self.assertEqual(one.mark("a", "gmail"), Mark(1.0, 150.0))
        one.merge_mark("a", "gmail", Mark(4.0, 0.0), 150.0)  # 4 at 0 is 1.41 at 150
        self.assertAlmostEqual(one.penalty("a", "gmail", 150.0), 4.0 * 0.5**1.5)
        one.merge_mark("a", "gmail", Mark(0.5, 150.0), 150.0)
        self.assertEqual(one.mark("a", "gmail"), Mark(4.0, 0.0))

    @given(st.lists(st.tuples(st.booleans(), st.floats(0, 1e5, allow_nan=False)),
                    max_size=30).map(lambda xs: sorted(xs, key=lambda x: x[1])))
    def test_exchanging_selectors_agree(self, events: list[tuple[bool, float]]) -> None:
        """Two selectors that pass each mark they set to the other see the same
        penalty at every moment after."""
        pair = (TieredSelector((_src("a"),)), TieredSelector((_src("a"),)))
        for first, now in events:
            sender, receiver = pair if first else pair[::-1]
            sender.penalize("a", "gmail", now)
            mark = sender.mark("a", "gmail")
            assert mark is not None
            receiver.merge_mark("a", "gmail", mark, now)
            self.assertEqual(receiver.penalty("a", "gmail", now + 60.0),
                             sender.penalty("a", "gmail", now + 60.0))


    @given(st.lists(st.tuples(st.sampled_from(["a1", "a2"]), st.floats(0, 7200)),
                    min_size=1, max_size=20),
           st.integers(0, 2**32 - 1))
    def test_pools_keep_their_marks(self, blocks: list[tuple[str, float]], seed: int) -> None:
        """Two tenants' pools: however often the destination blocks or rate-limits
        pool "acme"'s sources, "acme" sends only from its own sources and "globex"'s
        choice is what it was with no block at all (same random draws), its sources
        unmarked."""
        sources = (_src("a1", pool="acme"), _src("a2", pool="acme"),
                   _src("g1", pool="globex"), _src("gg2", pool="globex"))
        hit = TieredSelector(sources, rng=random.Random(seed))
        calm = TieredSelector(sources, rng=random.Random(seed))
        now = 0.0
        for name, at in sorted(blocks, key=lambda b: b[1]):
            now = at
            hit.penalize(name, "gmail", now)
        for _ in range(20):
            chosen = hit.choose("globex", "gmail", now, DAY0)
            expected = calm.choose("globex", "gmail", now, DAY0)
            assert chosen is not None and expected is not None
            self.assertEqual(chosen.name, expected.name)
            self.assertEqual(chosen.pool, "globex")
        for _ in range(20):
            acme = hit.choose("acme", "gmail", now, DAY0)
            assert acme is not None
            self.assertEqual(acme.pool, "acme")
        for name in ("g1", "gg2"):
            self.assertEqual(hit.penalty(name, "gmail", now), 0.0)
        # The least-blocked acme source is the one acme prefers while both are marked.
        marked = {n for n, _ in blocks}
        if marked == {"a1"}:
            self.assertEqual(hit.choose("acme", "gmail", now, DAY0).name, "a2")  # type: ignore[union-attr]


class SharedTieredSelectorTests(TestCase):
    """Two nodes' selectors on one Redis share warmup counts and marks."""

    async def two_nodes(self, *sources: EgressSourceConfig) -> list[SharedTieredSelector]:
        redis = await redis_client(self)
        other = connect(f"redis://127.0.0.1:{self.redis_port}/0", poolsize=1)  # type: ignore[attr-defined]
        self.addCleanup(other.disconnect)
        await other.wait_connected(reactor, 10.0)
        return [
            SharedTieredSelector.over(sources, redis=r, rng=random.Random(4), sync_interval=0.0)
            for r in (redis, other)
        ]

    async def test_interface(self) -> None:
        """SharedTieredSelector provides IEgressSelector."""
        one, _ = await self.two_nodes(_src("a"))
        self.assertTrue(verifyObject(IEgressSelector, one))

    async def test_warmup_cap_holds_for_the_cluster(self) -> None:
        """A warming source's daily cap counts the sends of every node."""
        one, two = await self.two_nodes(_src("cold", daily=(5,)))
        for _ in range(3):
            one.record_send("cold", "gmail", DAY0)
        await task.deferLater(reactor, 0.1, lambda: None)  # the writes are not waited for
        await two.sync(0.0, DAY0)
        self.assertEqual(two.remaining(_src("cold", daily=(5,)), "gmail", DAY0), 2)
        self.assertEqual(_tally(two, 10, 0.0, DAY0), Counter({"cold": 2, None: 8}))

    async def test_marks_are_shared(self) -> None:
        """A source marked on one node is avoided by the other, with the same decay."""
        one, two = await self.two_nodes(_src("a"), _src("bb"))
        one.penalize("a", "gmail", 100.0)
        await task.deferLater(reactor, 0.1, lambda: None)
        await two.sync(100.0, DAY0)
        self.assertAlmostEqual(two.penalty("a", "gmail", 100.0 + 3600.0), 0.5)
        self.assertEqual(_tally(two, 50, 110.0, DAY0, record=False), Counter({"bb": 50}))
        two.penalize("a", "gmail", 110.0)  # adds to the shared mark
        await task.deferLater(reactor, 0.1, lambda: None)
        await one.sync(110.0, DAY0)
        self.assertGreater(one.penalty("a", "gmail", 110.0), 1.9)

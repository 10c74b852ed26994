"""Tests for :obj:`sendarix.ingress.authlimit`: slowing and locking out failing AUTH clients."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sendarix.ingress.authlimit import AuthLimiter, ClientRecord, client_key
from sendarix.interfaces import IAuthLimiter

IP = "192.0.2.1"

# Gaps between consecutive failures, in seconds.
gaps = st.lists(st.floats(min_value=0, max_value=400, allow_nan=False), min_size=1, max_size=30)


def times_from(gap_list: list[float], start: float = 1000.0) -> list[float]:
    """Cumulative times from a list of gaps."""
    out, t = [], start
    for g in gap_list:
        t += g
        out.append(t)
    return out


class AuthLimiterTests(SynchronousTestCase):
    """AuthLimiter with the defaults: 5 failures in 5 minutes lock for 15."""

    def test_interface(self) -> None:
        """AuthLimiter provides IAuthLimiter."""
        self.assertTrue(verifyObject(IAuthLimiter, AuthLimiter()))

    def test_lock_and_unlock(self) -> None:
        """The fifth failure within the window locks the address for exactly the lockout."""
        lim = AuthLimiter()
        for i in range(4):
            lim.failed(IP, 100.0 + i)
            self.assertFalse(lim.is_locked(IP, 100.0 + i))
        lim.failed(IP, 104.0)
        self.assertTrue(lim.is_locked(IP, 104.0))
        self.assertTrue(lim.is_locked(IP, 104.0 + 899.9))
        self.assertFalse(lim.is_locked("192.0.2.2", 104.0))
        self.assertFalse(lim.is_locked(IP, 104.0 + 900.0))
        # After the lockout the count starts afresh.
        self.assertEqual(lim.delay_for(IP, 1004.0), 0.0)
        lim.failed(IP, 1005.0)
        self.assertFalse(lim.is_locked(IP, 1005.0))

    def test_window_forgets(self) -> None:
        """Failures older than the window no longer count."""
        lim = AuthLimiter()
        for i in range(4):
            lim.failed(IP, float(i))
        lim.failed(IP, 300.5)  # the first failure (t=0) is out of the window
        self.assertFalse(lim.is_locked(IP, 300.5))
        self.assertEqual(lim.failures(IP, 300.5), 4)
        self.assertEqual(lim.failures(IP, 1000.0), 0)

    def test_delays(self) -> None:
        """Delays double per failure from base_delay up to max_delay."""
        lim = AuthLimiter(max_failures=10)
        self.assertEqual(lim.delay_for(IP, 0.0), 0.0)
        seen = []
        for i in range(6):
            lim.failed(IP, float(i))
            seen.append(lim.delay_for(IP, float(i)))
        self.assertEqual(seen, [1.0, 2.0, 4.0, 8.0, 8.0, 8.0])

    def test_success_clears(self) -> None:
        """A success forgets the failures but does not lift a lockout in force."""
        lim = AuthLimiter()
        for i in range(4):
            lim.failed(IP, float(i))
        lim.succeeded(IP, 4.0)
        self.assertEqual(lim.failures(IP, 4.0), 0)
        self.assertEqual(lim.delay_for(IP, 4.0), 0.0)
        self.assertEqual(len(lim), 0)
        for i in range(5):
            lim.failed(IP, 10.0 + i)
        lim.succeeded(IP, 20.0)
        self.assertTrue(lim.is_locked(IP, 20.0))

    def test_ipv6_counts_per_64(self) -> None:
        """Addresses in one IPv6 /64 share a count; mapped IPv4 counts as IPv4."""
        self.assertEqual(client_key("2001:db8:1:2::1"), client_key("2001:db8:1:2:ffff::9"))
        self.assertNotEqual(client_key("2001:db8:1:2::1"), client_key("2001:db8:1:3::1"))
        self.assertEqual(client_key("::ffff:192.0.2.1"), "192.0.2.1")
        lim = AuthLimiter()
        for i in range(5):
            lim.failed(f"2001:db8::{i + 1}", float(i))
        self.assertTrue(lim.is_locked("2001:db8::abcd", 5.0))

    def test_memory_bounded(self) -> None:
        """At most max_tracked addresses are kept, and stale ones are pruned."""
        lim = AuthLimiter(max_tracked=100)
        for i in range(1000):
            lim.failed(f"10.0.{i // 256}.{i % 256}", 1.0)
        self.assertEqual(len(lim), 100)
        # The newest survive.
        self.assertEqual(lim.failures("10.0.3.231", 1.0), 1)
        lim.failed("192.0.2.99", 10_000.0)
        self.assertEqual(len(lim), 1)

    @given(gaps)
    def test_never_locked_below_max(self, gap_list: list[float]) -> None:
        """No address is locked while it has fewer than max_failures failures in the
        window, and it is locked as soon as it reaches that many."""
        lim = AuthLimiter()
        times = times_from(gap_list)
        locked_at = None
        for i, t in enumerate(times):
            if locked_at is not None and t < locked_at + lim.lockout:
                continue  # a locked client is not allowed to try
            lim.failed(IP, t)
            recent = [
                u
                for u in times[: i + 1]
                if u > t - lim.window and (locked_at is None or u >= locked_at + lim.lockout)
            ]
            if len(recent) >= lim.max_failures:
                self.assertTrue(lim.is_locked(IP, t))
                locked_at = t
            else:
                self.assertFalse(lim.is_locked(IP, t), (times[: i + 1], recent))

    @given(gaps)
    def test_unlocked_after_lockout(self, gap_list: list[float]) -> None:
        """Whatever happened before, an address is free lockout seconds after its
        last failure."""
        lim = AuthLimiter()
        times = times_from(gap_list)
        for t in times:
            lim.failed(IP, t)
        self.assertFalse(lim.is_locked(IP, times[-1] + lim.lockout))
        self.assertEqual(lim.delay_for(IP, times[-1] + lim.lockout), 0.0)

    @given(st.lists(st.floats(min_value=0, max_value=30, allow_nan=False), max_size=40))
    def test_delays_non_decreasing_and_bounded(self, gap_list: list[float]) -> None:
        """Within one window, each failure makes the delay no shorter, never above max."""
        lim = AuthLimiter()
        previous = 0.0
        for t in times_from(gap_list, start=0.0):
            if t >= lim.window:
                break
            lim.failed(IP, t)
            delay = lim.delay_for(IP, t)
            self.assertGreaterEqual(delay, previous)
            self.assertLessEqual(delay, lim.max_delay)
            previous = delay


class ExchangeTests(SynchronousTestCase):
    """What one process counted, another takes with ``record`` and ``merge``."""

    def test_record_and_merge(self) -> None:
        """A fresh limiter that merges another's record counts the same failures and
        the same lockout; an unknown address has an empty record."""
        one, two = AuthLimiter(), AuthLimiter()
        self.assertEqual(one.record(IP, 0.0), ClientRecord())
        for t in (10.0, 11.0):
            one.failed(IP, t)
        self.assertEqual(one.record(IP, 12.0), ClientRecord((10.0, 11.0), 0.0))
        two.merge(IP, one.record(IP, 12.0), 12.0)
        self.assertEqual(two.failures(IP, 12.0), 2)
        self.assertEqual(two.delay_for(IP, 12.0), one.delay_for(IP, 12.0))
        two.merge("192.0.2.9", ClientRecord(locked_until=100.0), 12.0)
        self.assertTrue(two.is_locked("192.0.2.9", 99.0))
        self.assertFalse(two.is_locked("192.0.2.9", 100.0))

    def test_record_times_in_order(self) -> None:
        """A record keeps its failure times oldest first, however they were given."""
        self.assertEqual(ClientRecord([3.0, 1.0, 2.0]).failures, (1.0, 2.0, 3.0))

    def test_merge_never_forgets(self) -> None:
        """A shorter list or an earlier lockout from elsewhere changes nothing here."""
        lim = AuthLimiter()
        for t in (10.0, 11.0, 12.0):
            lim.failed(IP, t)
        lim.merge(IP, ClientRecord((5.0,), 0.0), 13.0)
        self.assertEqual(lim.failures(IP, 13.0), 3)
        lim.merge(IP, ClientRecord((), 500.0), 13.0)
        lim.merge(IP, ClientRecord((), 400.0), 13.0)
        self.assertTrue(lim.is_locked(IP, 499.0))
        self.assertFalse(lim.is_locked(IP, 500.0))

    @given(gaps, st.lists(st.booleans(), min_size=30, max_size=30))
    def test_exchanging_limiters_agree(self, gap_list: list[float], who: list[bool]) -> None:
        """Two limiters that hand each other their record after every failure agree
        on the lockout, and the receiver counts at least the sender's failures."""
        pair = (AuthLimiter(), AuthLimiter())
        for t, first in zip(times_from(gap_list), who, strict=False):
            sender, receiver = pair if first else pair[::-1]
            sender.failed(IP, t)
            receiver.merge(IP, sender.record(IP, t), t)
            self.assertEqual(receiver.is_locked(IP, t), sender.is_locked(IP, t))
            self.assertGreaterEqual(receiver.failures(IP, t), sender.failures(IP, t))

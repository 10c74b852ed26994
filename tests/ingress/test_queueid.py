"""Queue ids: ordered by creation on one node, unique across nodes, readable time."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sendarix.ingress import queueid
from sendarix.ingress.queueid import QueueIdGenerator, is_queue_id, node_hash, queue_id_time

SHAPE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{20}$")
T0 = 1_700_000_000.0

# Clock steps in seconds: zero (same millisecond), sub-millisecond, ordinary, and
# backwards (an NTP step).
steps = st.one_of(
    st.just(0.0),
    st.floats(min_value=0.0, max_value=0.002),
    st.floats(min_value=0.0, max_value=3600.0),
    st.floats(min_value=-5.0, max_value=0.0),
)


def clock_at(t: float) -> Clock:
    clock = Clock()
    clock.rightNow = t
    return clock


class QueueIdGeneratorTests(SynchronousTestCase):
    """QueueIdGenerator and queue_id_time."""

    @given(st.lists(st.lists(steps, min_size=1, max_size=5), min_size=1, max_size=40))
    def test_strictly_increasing(self, bursts: list[list[float]]) -> None:
        """Ids from one generator increase strictly, however the clock moves."""
        clock = clock_at(T0)
        generator = QueueIdGenerator("node-a", clock)
        ids = []
        for burst in bursts:
            for step in burst:
                clock.rightNow += step
                ids.append(generator.next())
                ids.append(generator.next())
        self.assertEqual(ids, sorted(set(ids)))
        for qid in ids:
            self.assertRegex(qid, SHAPE)

    @given(st.lists(steps, min_size=1, max_size=60))
    def test_unique_across_nodes(self, moves: list[float]) -> None:
        """Two nodes on the same clock never make the same id."""
        clock = clock_at(T0)
        a = QueueIdGenerator("node-a", clock)
        b = QueueIdGenerator("node-b", clock)
        ids_a, ids_b = [], []
        for step in moves:
            clock.rightNow += step
            ids_a.append(a.next())
            ids_b.append(b.next())
        self.assertEqual(len(set(ids_a) | set(ids_b)), 2 * len(moves))

    def test_restart_in_same_millisecond(self) -> None:
        """A node restarting within one millisecond does not repeat its ids."""
        clock = clock_at(T0)
        before = {QueueIdGenerator("node-a", clock).next() for _ in range(200)}
        self.assertEqual(len(before), 200)

    @given(st.floats(min_value=0, max_value=2**40))
    def test_time_round_trip(self, t: float) -> None:
        """queue_id_time reads back the creation time to the millisecond."""
        qid = QueueIdGenerator("node-a", clock_at(t)).next()
        self.assertEqual(queue_id_time(qid), int(t * 1000) / 1000.0)

    def test_time_order_across_nodes(self) -> None:
        """An id made a millisecond later sorts later, whichever node made it."""
        clock = clock_at(T0)
        early = QueueIdGenerator("zzz", clock).next()
        clock.advance(0.001)
        late = QueueIdGenerator("aaa", clock).next()
        self.assertLess(early, late)

    def test_sequence_overflow_borrows_next_millisecond(self) -> None:
        """When a millisecond's sequence runs out, ids move on to the next one."""
        clock = clock_at(T0)
        generator = QueueIdGenerator("node-a", clock)
        first = generator.next()
        generator._seq = queueid._SEQ_LIMIT - 1
        second = generator.next()
        self.assertLess(first, second)
        self.assertEqual(queue_id_time(second), queue_id_time(first) + 0.001)

    def test_node_hash(self) -> None:
        """The node part is stable per name and differs between names."""
        self.assertEqual(node_hash("node-a"), node_hash("node-a"))
        self.assertNotEqual(node_hash("node-a"), node_hash("node-b"))
        qid = QueueIdGenerator("node-a", clock_at(T0)).next()
        self.assertEqual(qid[10:14], node_hash("node-a"))

    def test_shape_checks(self) -> None:
        """Malformed ids are recognised as such."""
        qid = QueueIdGenerator("node-a", clock_at(T0)).next()
        self.assertTrue(is_queue_id(qid))
        self.assertFalse(is_queue_id(qid.lower()))
        self.assertFalse(is_queue_id(qid[:-1]))
        self.assertFalse(is_queue_id(qid[:-1] + "U"))
        self.assertRaises(ValueError, queue_id_time, qid[:-1])
        self.assertRaises(ValueError, queue_id_time, "I" * 20)

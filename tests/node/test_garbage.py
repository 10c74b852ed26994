"""The node's garbage-collector settings (sendarix.node.garbage)."""

from __future__ import annotations

import gc

from twisted.application.service import IService
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sendarix.node import garbage
from sendarix.node.garbage import YOUNG_THRESHOLD, CollectorTuning


class CollectorTuningTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *self.before)
        self.addCleanup(gc.unfreeze)
        self.clock = Clock()
        self.service = CollectorTuning(self.clock)

    def test_interface(self) -> None:
        verifyObject(IService, self.service)

    def test_thresholds_while_running(self) -> None:
        """The youngest generation's threshold is raised; the older two are kept,
        and all three come back on stop."""
        self.service.startService()
        self.assertEqual(gc.get_threshold(), (YOUNG_THRESHOLD, *self.before[1:]))
        self.service.stopService()
        self.assertEqual(gc.get_threshold(), self.before)

    def test_freezes_after_the_first_pass(self) -> None:
        """Nothing is frozen while services start; after the reactor's first pass,
        what start-up left is, and a stop unfreezes it."""
        self.assertEqual(gc.get_freeze_count(), 0)
        self.service.startService()
        self.assertEqual(gc.get_freeze_count(), 0)
        self.clock.advance(0)
        self.assertGreater(gc.get_freeze_count(), 0)
        self.service.stopService()
        self.assertEqual(gc.get_freeze_count(), 0)

    def test_stop_before_the_first_pass(self) -> None:
        """Stopped before the reactor ran: the freeze is called off."""
        self.service.startService()
        self.service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1)
        self.assertEqual(gc.get_freeze_count(), 0)

    def test_other_collectors_left_alone(self) -> None:
        """A runtime whose collector has no freeze (PyPy's) is not touched."""

        class Collector:
            """No generations to set, no freeze."""

            def get_threshold(self) -> tuple[int, int, int]:
                raise AssertionError("asked for thresholds")

        self.patch(garbage, "gc", Collector())
        self.service.startService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.service.stopService()

    def test_cycles_are_still_collected(self) -> None:
        """Garbage made after the freeze is freed by a collection."""
        self.service.startService()
        self.clock.advance(0)

        class Node:
            other: object = None

        a, b = Node(), Node()
        a.other, b.other = b, a
        del a, b
        self.assertGreaterEqual(gc.collect(), 2)
        self.service.stopService()

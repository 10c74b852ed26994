"""Tests for :mod:`sendarix.egress.simulator`: the simulator's answers, without I/O."""

from __future__ import annotations

from twisted.trial import unittest

from sendarix.egress.simulator import SIMULATOR_MX, simulate, simulate_delivery
from sendarix.model.message import (
    Envelope,
    Lease,
    LeasedDelivery,
    MessageMeta,
    RecipientRecord,
    RecipientStatus,
)


class SimulateTests(unittest.SynchronousTestCase):
    """The simulator's replies by local part and attempt."""

    def test_outcomes(self) -> None:
        """Each documented local part gives its reply, and retries of defer and greylist
        succeed."""
        self.assertEqual(simulate("success", 1).code, 250)  # type: ignore[union-attr]
        self.assertEqual(simulate("bounce", 1).enhanced, "5.1.1")  # type: ignore[union-attr]
        self.assertEqual(simulate("defer", 1).code, 421)  # type: ignore[union-attr]
        self.assertEqual(simulate("defer", 2).code, 250)  # type: ignore[union-attr]
        self.assertEqual(simulate("Greylist", 1).code, 450)  # type: ignore[union-attr]
        self.assertEqual(simulate("greylist", 2).code, 250)  # type: ignore[union-attr]
        self.assertEqual(simulate("timeout", 3).code, 451)  # type: ignore[union-attr]
        self.assertIsNone(simulate("suppressed", 1))
        self.assertEqual(simulate("complaint", 1).code, 250)  # type: ignore[union-attr]

    def test_delivery(self) -> None:
        """One delivery: every recipient answered, ``suppressed`` ones set apart, and a
        complaint only for an accepted ``complaint`` recipient."""
        addresses = ("ok@sim.test", "complaint+x@sim.test", "suppressed@sim.test",
                     "bounce@sim.test")
        delivery = LeasedDelivery(
            "Q1", "sim.test", Envelope("a@x.test", addresses),
            MessageMeta(tenant="t", received_at=0.0),
            tuple(RecipientRecord(a, "sim.test", RecipientStatus.PENDING) for a in addresses),
            Lease("n", 300.0),
        )
        session = simulate_delivery(delivery)
        self.assertEqual([(a.record.address, a.reply.code, a.mx) for a in session.attempts],
                         [("ok@sim.test", 250, SIMULATOR_MX),
                          ("complaint+x@sim.test", 250, SIMULATOR_MX),
                          ("bounce@sim.test", 550, SIMULATOR_MX)])
        self.assertEqual([r.address for r in session.suppressed], ["suppressed@sim.test"])
        self.assertEqual([a.record.address for a in session.complaints],
                         ["complaint+x@sim.test"])

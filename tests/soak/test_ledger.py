"""Tests for the soak's accounts (tests/soak/ledger.py): the verdicts it must reach, so
that a soak that prints OK means what it says."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.soak.ledger import Kill, Receipt, Submission, Verdict, judge
from tests.soak.world import expected_outcome

A = Submission("Q1", "t1", ("u0-t1@good.test", "gone1-t1@bounce.test"), "smtp")
B = Submission("Q2", "t2", ("u0-t2@good.test",), "api")


def got(qid: str | None, token: str | None, rcpt: str, node: str = "a", at: float = 10.0
        ) -> Receipt:
    return Receipt(qid, token, rcpt, node, at)


class JudgeTests(SynchronousTestCase):
    def verdict(
        self,
        receipts: list[Receipt],
        bounced: set[tuple[str, str]] | None = None,
        kills: list[Kill] | None = None,
        queued: set[tuple[str, str]] | None = None,
    ) -> Verdict:
        return judge({"Q1": A, "Q2": B}, receipts, bounced or set(), expected_outcome,
                     kills or [], 10.0, queued or set())

    def test_expected(self) -> None:
        """A recipient at a gone* mailbox of bounce.test is refused there."""
        self.assertEqual(expected_outcome("gone1-x@bounce.test"), "bounced")
        self.assertEqual(expected_outcome("u1-x@bounce.test"), "delivered")
        self.assertEqual(expected_outcome("gone1-x@good.test"), "delivered")

    def test_all_well(self) -> None:
        """Delivered once and bounced as told: nothing fails."""
        v = self.verdict(
            [got("Q1", "t1", "u0-t1@good.test"), got(None, "t2", "u0-t2@good.test")],
            bounced={("Q1", "gone1-t1@bounce.test")},
        )
        self.assertFalse(v.failed)
        self.assertEqual((v.accepted_recipients, v.delivered, v.bounced), (3, 2, 1))

    def test_lost_and_queued(self) -> None:
        """Neither received nor bounced: still queued when the spool has it, else lost."""
        v = self.verdict([got("Q1", "t1", "u0-t1@good.test")],
                         queued={("Q2", "u0-t2@good.test")})
        self.assertTrue(v.failed)
        self.assertEqual(v.still_queued, ["Q2 u0-t2@good.test"])
        self.assertEqual(v.lost, ["Q1 gone1-t1@bounce.test"])

    def test_duplicate_explained_by_kill(self) -> None:
        """A second copy after the node that sent the first was SIGKILLed right after
        it is at-least-once delivery; the same without a kill, or with the first copy
        long before the kill, is not."""
        copies = [got("Q2", "t2", "u0-t2@good.test", "a", 100.0),
                  got("Q2", "t2", "u0-t2@good.test", "b", 130.0)]
        base = [got("Q1", "t1", "u0-t1@good.test")]
        bounced = {("Q1", "gone1-t1@bounce.test")}
        v = self.verdict(base + copies, bounced, [Kill("a", 101.0)])
        self.assertEqual((v.duplicated_explained, v.failed), (1, False))
        for kills in ([], [Kill("b", 101.0)], [Kill("a", 150.0)]):
            v = self.verdict(base + copies, bounced, kills)
            self.assertEqual(len(v.duplicated_unexplained), 1, kills)
            self.assertTrue(v.failed)

    def test_wrong_outcomes(self) -> None:
        """A refused recipient received, an accepted one bounced, or a copy whose
        Received id is another message's: each a failure."""
        for receipts, bounced in (
            ([got("Q1", "t1", "gone1-t1@bounce.test")], None),
            ([], {("Q2", "u0-t2@good.test")}),
            ([got("Q9", "t2", "u0-t2@good.test")], None),
        ):
            self.assertTrue(self.verdict(receipts, bounced).wrong, (receipts, bounced))

    def test_unheard(self) -> None:
        """A copy of a message whose 250 the submitter never heard is counted apart."""
        v = self.verdict([got("Q7", "t7", "u0-t7@good.test")])
        self.assertEqual(v.unheard, 1)

"""Reading ARF and DSN reports, and the message reference (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sendarix.cleanup.reference import header_line, make_reference, read_reference
from sendarix.ingress.reports import parse_report
from tests.support.reports import arf, dsn

KEY = b"k" * 32
ORIGINAL = (header_line(KEY, "4XQ2.A", "acme")
            + b"From: app@sender.test\r\nTo: User <user@example.org>\r\n"
            b"Message-ID: <abc@relay.test>\r\nSubject: hi\r\n\r\nbody\r\n")


class ReferenceTests(SynchronousTestCase):
    @given(st.text(alphabet="ABCDEFGHJKLMNPQRSTVWXYZ0123456789.", min_size=1, max_size=30),
           st.text(min_size=1, max_size=40))
    def test_round_trip_and_forgery(self, queue_id: str, tenant: str) -> None:
        ref = make_reference(KEY, queue_id, tenant)
        found = read_reference(KEY, ref)
        assert found is not None
        self.assertEqual((found.queue_id, found.tenant), (queue_id, tenant))
        self.assertIsNone(read_reference(b"x" * 32, ref))
        forged = make_reference(b"x" * 32, queue_id, tenant)
        self.assertIsNone(read_reference(KEY, forged))

    def test_garbage(self) -> None:
        for text in ("", "a.b", "a..c", "a.!!.c", "x" * 500):
            self.assertIsNone(read_reference(KEY, text))


class ReportTests(SynchronousTestCase):
    def test_arf_abuse(self) -> None:
        report = parse_report(arf(ORIGINAL, "user@example.org"))
        assert report is not None
        self.assertEqual((report.kind, report.feedback_type), ("complaint", "abuse"))
        self.assertEqual([r.address for r in report.recipients], ["user@example.org"])
        self.assertEqual(report.message_id, "abc@relay.test")
        found = read_reference(KEY, report.reference or "")
        self.assertEqual(found.queue_id if found else None, "4XQ2.A")

    def test_arf_redacted_recipient_uses_the_original_to(self) -> None:
        report = parse_report(arf(ORIGINAL, None))
        assert report is not None
        self.assertEqual([r.address for r in report.recipients], ["user@example.org"])

    def test_arf_other_feedback_type(self) -> None:
        report = parse_report(arf(ORIGINAL, "user@example.org", feedback_type="not-spam"))
        assert report is not None
        self.assertEqual(report.kind, "feedback")

    def test_dsn_failed_and_delayed(self) -> None:
        report = parse_report(dsn(ORIGINAL, "user@example.org"))
        assert report is not None
        (r,) = report.recipients
        self.assertEqual((report.kind, r.address, r.action, r.status),
                         ("dsn", "user@example.org", "failed", "5.1.1"))
        self.assertEqual(r.diagnostic, "550 5.1.1 user unknown")
        delayed = parse_report(dsn(ORIGINAL, "user@example.org", "delayed", "4.4.7",
                                   "smtp; 451 4.4.7 try later"))
        assert delayed is not None
        self.assertEqual(delayed.recipients[0].action, "delayed")

    def test_not_a_report(self) -> None:
        self.assertIsNone(parse_report(ORIGINAL))
        self.assertIsNone(parse_report(b"garbage"))

    @given(st.binary(max_size=2000))
    def test_any_bytes(self, data: bytes) -> None:
        """Whatever arrives, parsing returns a report or None, never raises."""
        parse_report(data)
        parse_report(b"Content-Type: multipart/report; report-type=feedback-report;"
                     b" boundary=x\r\n\r\n--x\r\n" + data)

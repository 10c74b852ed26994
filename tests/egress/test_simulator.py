"""Tests for :mod:`sendarix.egress.simulator`: the simulator's answers, its router and its
transport, on a :class:`task.Clock` (no I/O)."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from sendarix.cleanup.reference import HEADER as REFERENCE_HEADER
from sendarix.egress.simulator import (
    COMPLAINT_DELAY,
    SIMULATOR_HOP,
    SIMULATOR_MX,
    SimulatorRouter,
    SimulatorTransport,
    abuse_report,
    simulate,
)
from sendarix.ingress.reports import parse_report
from sendarix.interfaces import IRouter, ITransport
from sendarix.model.session import SIMULATOR_TRANSPORT, OutboundMessage, SessionOptions

BODY = (
    b"From: app@example.com\r\nTo: complaint@sim.test\r\nSubject: hello\r\n"
    b"Message-ID: <m1@example.com>\r\n" + REFERENCE_HEADER.encode() + b": ref-1\r\n"
    b"\r\nHello.\r\n"
)
OPTIONS = SessionOptions(helo="relay.test")


def message(*recipients: str, attempts: tuple[int, ...] = (), qid: str = "Q1") -> OutboundMessage:
    return OutboundMessage(qid, "bounces@example.com", recipients, BODY, attempts=attempts)


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


class SimulatorRouterTests(unittest.SynchronousTestCase):
    """Any domain routes to the simulator's one hop."""

    def test_route(self) -> None:
        router = SimulatorRouter()
        verifyObject(IRouter, router)
        route = self.successResultOf(router.route("anything.example"))
        self.assertIsNone(route.error)
        self.assertEqual(route.hops, (SIMULATOR_HOP,))
        self.assertEqual((SIMULATOR_HOP.host, SIMULATOR_HOP.transport),
                         (SIMULATOR_MX, SIMULATOR_TRANSPORT))


class _Reports:
    """Collects the reports the transport hands over (what the feedback handler reads)."""

    def __init__(self) -> None:
        self.got: list[bytes] = []

    def __call__(self, body: bytes, recipients: Sequence[str]) -> Deferred[str]:
        self.got.append(body)
        return succeed("read")


class SimulatorTransportTests(unittest.SynchronousTestCase):
    """One session to the simulator: every recipient answered at once, by local part."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.reports = _Reports()
        self.transport = SimulatorTransport(self.clock, self.reports)

    def test_provides(self) -> None:
        verifyObject(ITransport, self.transport)

    def test_replies_by_local_part(self) -> None:
        """Each recipient gets its local part's reply; the message is accepted when
        any recipient is; nothing was connected to."""
        rcpts = ("ok@sim.test", "bounce@sim.test", "defer+1@sim.test", "greylist@sim.test",
                 "timeout@sim.test", "suppressed@sim.test")
        result = self.successResultOf(
            self.transport.deliver(SIMULATOR_HOP, [message(*rcpts)], OPTIONS)
        )
        self.assertIsNone(result.connect_error)
        self.assertTrue(result.greeted)
        self.assertIsNone(result.mx_ip)
        self.assertIsNone(result.source_ip)
        (only,) = result.results
        self.assertEqual(only.queue_id, "Q1")
        self.assertEqual(
            [(r.address, r.reply.code) for r in only.recipients],
            list(zip(rcpts, [250, 550, 421, 450, 451, 550], strict=True)),
        )
        self.assertEqual(only.message_reply.code, 250)  # type: ignore[union-attr]

    def test_earlier_attempts(self) -> None:
        """A recipient's earlier attempts, carried in the message, decide defer and
        greylist: the second attempt is accepted."""
        msg = message("defer@sim.test", "greylist@sim.test", "timeout@sim.test",
                      attempts=(1, 1, 1))
        result = self.successResultOf(self.transport.deliver(SIMULATOR_HOP, [msg], OPTIONS))
        self.assertEqual([r.reply.code for r in result.results[0].recipients], [250, 250, 451])

    def test_all_refused(self) -> None:
        """A message every recipient refused has no deciding reply (as when every RCPT
        is refused), so the session never counts as refused by the site."""
        result = self.successResultOf(
            self.transport.deliver(SIMULATOR_HOP, [message("defer@sim.test")], OPTIONS)
        )
        self.assertIsNone(result.results[0].message_reply)

    def test_complaint_reported_later(self) -> None:
        """An accepted ``complaint`` recipient is reported as an ARF abuse report, a
        moment after delivery, with the original message's header."""
        msgs = [message("complaint+a@sim.test", "ok@sim.test"),
                message("complaint@sim.test", qid="Q2", attempts=(0,))]
        self.successResultOf(self.transport.deliver(SIMULATOR_HOP, msgs, OPTIONS))
        self.assertEqual(self.reports.got, [])
        self.clock.advance(COMPLAINT_DELAY)
        self.assertEqual(len(self.reports.got), 2)
        report = parse_report(self.reports.got[0])
        assert report is not None
        self.assertEqual((report.kind, report.feedback_type), ("complaint", "abuse"))
        self.assertEqual([r.address for r in report.recipients], ["complaint+a@sim.test"])
        self.assertEqual(report.message_id, "m1@example.com")
        self.assertEqual(report.reference, "ref-1")

    def test_no_reader_no_report(self) -> None:
        """Without a feedback reader no report is scheduled."""
        quiet = SimulatorTransport(self.clock)
        self.successResultOf(quiet.deliver(SIMULATOR_HOP, [message("complaint@sim.test")],
                                           OPTIONS))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class AbuseReportTests(unittest.SynchronousTestCase):
    """The report is a genuine RFC 5965 message."""

    def test_structure(self) -> None:
        from email import message_from_bytes, policy

        raw = abuse_report(message("complaint@sim.test"), "complaint@sim.test", 0.0)
        parsed = message_from_bytes(raw, policy=policy.default)
        self.assertEqual(parsed.get_content_type(), "multipart/report")
        self.assertEqual(parsed.get_param("report-type"), "feedback-report")
        parts = [p.get_content_type() for p in parsed.iter_parts()]  # type: ignore[attr-defined]
        self.assertEqual(parts, ["text/plain", "message/feedback-report",
                                 "text/rfc822-headers"])
        self.assertIn(b"Feedback-Type: abuse", raw)
        self.assertIn(b"Original-Rcpt-To: <complaint@sim.test>", raw)


class PacedSessionTests(unittest.SynchronousTestCase):
    def test_pace(self) -> None:
        """The site's pace is asked before each message, as over SMTP: what it holds
        back is listed unsent, with no result."""
        answers = iter([True, False])
        options = SessionOptions(helo="relay.test", pace=lambda: succeed(next(answers)))
        msgs = [message("a@sim.test", qid="Q1"), message("b@sim.test", qid="Q2"),
                message("c@sim.test", qid="Q3")]
        result = self.successResultOf(
            SimulatorTransport(Clock()).deliver(SIMULATOR_HOP, msgs, options)
        )
        self.assertEqual([m.queue_id for m in result.results], ["Q1"])
        self.assertEqual(result.unsent, ("Q2", "Q3"))


class CloseTests(unittest.SynchronousTestCase):
    def test_close_drops_pending_reports(self) -> None:
        """Closed as the node stops, the transport leaves no report pending."""
        clock, reports = Clock(), _Reports()
        transport = SimulatorTransport(clock, reports)
        self.successResultOf(
            transport.deliver(SIMULATOR_HOP, [message("complaint@sim.test")], OPTIONS)
        )
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.successResultOf(transport.close())
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(COMPLAINT_DELAY)
        self.assertEqual(reports.got, [])

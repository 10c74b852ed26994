"""Content filters: rspamd's answers as verdicts (pure), the rspamd client against a
real rspamd (GTUBE rejected, clean mail passed, rspamd stopped → ``on_error``) and
against a stand-in that answers what a test needs, and a relay node whose listener
and tenants name their filter chains."""

from __future__ import annotations

import json
import smtplib
from typing import Any

import treq
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface.verify import verifyObject

from sendarix.cleanup.filters import FilterChains
from sendarix.cleanup.filters.passthrough import PassFilter
from sendarix.cleanup.filters.rspamd import RspamdFilter, request_headers, verdict_of
from sendarix.cleanup.headers import amend
from sendarix.interfaces import IContentFilter
from sendarix.model.event import EventQuery
from sendarix.model.filtering import FilterContext
from sendarix.model.message import Envelope, Reply
from tests.support.relay import in_thread, start_relay
from tests.support.rspamdserver import GTUBE, start_rspamd

reactor: Any = _reactor

CONTEXT = FilterContext(
    queue_id="Q1", envelope=Envelope("app@acme.example", ("a@example.org", "b@example.org")),
    tenant="acme", client_ip="192.0.2.7", helo="client.example", user=None, listener="smtp",
)
AUTHENTICATED = FilterContext(
    queue_id="Q2", envelope=Envelope("app@acme.example", ("a@example.org",)),
    tenant="acme", client_ip="192.0.2.7", helo="client.example", user="app", listener="smtp",
)
CLEAN = b"From: app@acme.example\r\nTo: a@example.org\r\nSubject: hello\r\n\r\nhello there\r\n"
SPAM = b"From: app@acme.example\r\nTo: a@example.org\r\nSubject: hello\r\n\r\n" + GTUBE + b"\r\n"


class VerdictTests(unittest.SynchronousTestCase):
    """What each of rspamd's actions means (pure)."""

    def test_reject_is_550_with_rspamds_message(self) -> None:
        v = verdict_of({"action": "reject", "messages": {"smtp_message": "Gtube pattern"}},
                       CONTEXT)
        self.assertEqual(v.reply, Reply(550, "5.7.1", "Gtube pattern"))
        v = verdict_of({"action": "reject"}, CONTEXT)
        self.assertEqual(v.reply, Reply(550, "5.7.1", "Message rejected as spam"))

    def test_soft_reject_is_451(self) -> None:
        v = verdict_of({"action": "soft reject"}, CONTEXT)
        self.assertEqual((v.action, v.reply and v.reply.code, v.reply and v.reply.enhanced),
                         ("soft reject", 451, "4.7.1"))

    def test_greylist_accepts_authenticated_senders_only(self) -> None:
        self.assertIsNone(verdict_of({"action": "greylist"}, AUTHENTICATED).reply)
        v = verdict_of({"action": "greylist"}, CONTEXT)
        self.assertEqual(v.reply and (v.reply.code, v.reply.enhanced), (451, "4.7.1"))

    def test_add_header_and_milter_headers(self) -> None:
        v = verdict_of({"action": "add header", "milter": {"add_headers": {
            "X-Spamd-Result": {"value": "default: False [7.0 / 15.0]", "order": 0},
            "X-Rspamd-Queue-Id": "Q1", "Bad Name": "x", "X-Evil": "a\r\nBcc: b@x",
        }}}, CONTEXT)
        self.assertIsNone(v.reply)
        self.assertEqual(v.headers, (
            ("X-Spam", "Yes"), ("X-Spamd-Result", "default: False [7.0 / 15.0]"),
            ("X-Rspamd-Queue-Id", "Q1"), ("X-Evil", "a Bcc: b@x"),
        ))

    def test_rewrite_subject(self) -> None:
        v = verdict_of({"action": "rewrite subject", "subject": "*** SPAM *** hello"}, CONTEXT)
        self.assertEqual((v.reply, v.subject), (None, "*** SPAM *** hello"))

    def test_no_action(self) -> None:
        v = verdict_of({"action": "no action"}, CONTEXT)
        self.assertEqual((v.action, v.reply, v.headers, v.subject), ("no action", None, (), None))

    def test_request_headers_carry_the_session(self) -> None:
        h = request_headers(AUTHENTICATED)
        self.assertEqual(h.getRawHeaders("User"), ["app"])
        self.assertEqual(h.getRawHeaders("IP"), ["192.0.2.7"])
        self.assertEqual(h.getRawHeaders("Helo"), ["client.example"])
        self.assertEqual(h.getRawHeaders("Queue-Id"), ["Q2"])
        self.assertEqual(h.getRawHeaders("From"), ["app@acme.example"])
        h = request_headers(CONTEXT)
        self.assertIsNone(h.getRawHeaders("User"))
        self.assertEqual(h.getRawHeaders("Rcpt"), ["a@example.org", "b@example.org"])

    def test_chains_tenant_then_listener_then_default(self) -> None:
        a, b = PassFilter(), PassFilter()
        chains = FilterChains({"pass": a, "rspamd": b}, tenants={"acme": ["rspamd", "pass"]},
                              listeners={"smtp": []}, default=["pass"])
        self.assertEqual(chains.chain("acme", "smtp"), (b, a))
        self.assertEqual(chains.chain("other", "smtp"), ())
        self.assertEqual(chains.chain("other", "api"), (a,))

    def test_amend_adds_headers_after_received_and_replaces_subject(self) -> None:
        message = b"Received: by relay\r\nSubject: hello\r\nFrom: a@b\r\n\r\nSubject: body\r\n"
        self.assertEqual(
            amend(message, [("X-Spam", "Yes")], "*** SPAM *** hello"),
            b"Received: by relay\r\nX-Spam: Yes\r\nSubject: *** SPAM *** hello\r\n"
            b"From: a@b\r\n\r\nSubject: body\r\n",
        )
        self.assertIn(b"Subject: =?utf-8?", amend(message, [], "\u00e9t\u00e9"))


class _Canned(Resource):
    """A stand-in rspamd: answers each /checkv2 with ``answer`` (or never)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answer: dict[str, Any] | None = {"action": "no action"}
        self.requests: list[dict[str, Any]] = []

    def render_POST(self, request: Any) -> Any:  # noqa: N802 - twisted.web's name
        self.requests.append({
            "path": request.path, "body": request.content.read(),
            "headers": {k.decode(): [v.decode() for v in vs]
                        for k, vs in request.requestHeaders.getAllRawHeaders()},
        })
        if self.answer is None:
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.answer).encode()


class RealRspamdTests(unittest.TestCase):
    """The client against Debian's rspamd, started for these tests."""

    def setUp(self) -> None:
        self.port, self.stop = start_rspamd(self.mktemp())
        self.addCleanup(self.stop)

    def client(self, on_error: str = "accept") -> RspamdFilter:
        f = RspamdFilter(f"http://127.0.0.1:{self.port}", reactor, 5.0, on_error)
        verifyObject(IContentFilter, f)
        return f

    async def test_gtube_rejected_clean_passes(self) -> None:
        v = await self.client().check(CONTEXT, SPAM)
        self.assertEqual((v.action, v.reply and v.reply.code, v.reply and v.reply.enhanced),
                         ("reject", 550, "5.7.1"))
        v = await self.client().check(AUTHENTICATED, CLEAN)
        self.assertEqual((v.action, v.reply), ("no action", None))

    async def test_stopped_rspamd_follows_on_error(self) -> None:
        self.stop()
        v = await self.client("accept").check(CONTEXT, SPAM)
        self.assertEqual((v.action, v.reply), ("error", None))
        v = await self.client("defer").check(CONTEXT, SPAM)
        self.assertEqual((v.action, v.reply and v.reply.code), ("error", 451))

    async def test_relay_rejects_gtube_with_550(self) -> None:
        relay = await start_relay(self, [{
            "name": "smtp", "endpoint": "tcp:0:interface=127.0.0.1", "tls": "none",
            "auth": "none", "trusted_networks": ["127.0.0.0/8"], "tenant": "acme",
            "filters": ["rspamd"],
        }], rspamd={"url": f"http://127.0.0.1:{self.port}", "timeout": "5s",
                     "on_error": "defer"})
        port = relay.ports["smtp"]
        error = await in_thread(_send_expecting_refusal, port, SPAM)
        self.assertEqual(error.smtp_code, 550)
        self.assertIn(b"5.7.1 Gtube pattern", error.smtp_error)
        queue_id = await in_thread(_send, port, CLEAN)
        self.assertTrue(await relay.stores.spool.get(queue_id))
        page = await relay.stores.eventlog.search(EventQuery(type="rejected"))
        self.assertEqual([e.response and e.response.code for e in page.events], [550])
        counter = relay.service.metrics.filter_decisions
        self.assertEqual(counter.labels("rspamd", "reject")._value.get(), 1)
        self.assertEqual(counter.labels("rspamd", "no action")._value.get(), 1)
        # rspamd gone: on_error = "defer" answers 451 and nothing is queued.
        self.stop()
        error = await in_thread(_send_expecting_refusal, port, CLEAN)
        self.assertEqual(error.smtp_code, 451)
        self.assertEqual(counter.labels("rspamd", "error")._value.get(), 1)

    async def test_api_mail_is_filtered_by_default_chain(self) -> None:
        relay = await start_relay(self, [], filtering={"filters": ["rspamd"]},
                                  rspamd={"url": f"http://127.0.0.1:{self.port}"})
        key = await relay.add_credential("app", tenant="acme", scopes=["send"])
        code, answer = await _post(relay, key, GTUBE.decode())
        self.assertEqual((code, answer["error"]["code"]), (422, "content_rejected"), answer)
        code, answer = await _post(relay, key, "hello there")
        self.assertEqual(code, 202, answer)


async def _post(relay: Any, key: str, text: str) -> tuple[int, dict[str, Any]]:
    """POST a message over the HTTP API; its status and JSON answer."""
    response = await treq.post(
        f"http://127.0.0.1:{relay.api_port}/v1/messages",
        json={"from": "app@acme.example", "to": ["a@example.org"], "subject": "s",
              "text": text},
        headers={"Authorization": f"Bearer {key}"},
        pool=HTTPConnectionPool(reactor, persistent=False),
    )
    return response.code, json.loads(await response.text())


def _send(port: int, message: bytes) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example")
        client.mail("app@acme.example")
        client.rcpt("a@example.org")
        code, text = client.data(message)
        if code != 250:
            raise smtplib.SMTPDataError(code, text)
        return text.decode().rsplit(" ", 1)[-1]


def _send_expecting_refusal(port: int, message: bytes) -> smtplib.SMTPDataError:
    try:
        _send(port, message)
    except smtplib.SMTPDataError as e:
        return e
    raise AssertionError("the message was queued")


class StandInTests(unittest.TestCase):
    """Actions a minimal rspamd does not take, from a stand-in, through a relay."""

    async def asyncSetUp(self) -> None:
        self.canned = _Canned()
        port = reactor.listenTCP(0, Site(self.canned), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.relay = await start_relay(self, [
            {"name": "smtp", "endpoint": "tcp:0:interface=127.0.0.1", "tls": "none",
             "auth": "none", "trusted_networks": ["127.0.0.0/8"], "tenant": "acme"},
            {"name": "plain", "endpoint": "tcp:0:interface=127.0.0.1", "tls": "none",
             "auth": "none", "trusted_networks": ["127.0.0.0/8"], "tenant": "other",
             "filters": []},
        ], tenant={"acme": {"filters": ["pass", "rspamd"]}},
            filtering={"filters": ["rspamd"]},
            rspamd={"url": f"http://127.0.0.1:{port.getHost().port}/", "timeout": "2s"})

    def setUp(self) -> Deferred[None]:
        return ensureDeferred(self.asyncSetUp())

    async def test_headers_and_subject_applied_and_facts_sent(self) -> None:
        self.canned.answer = {
            "action": "rewrite subject", "subject": "*** SPAM *** hello",
            "milter": {"add_headers": {"X-Spamd-Result": "default: True [9.0 / 15.0]"}},
        }
        queue_id = await in_thread(_send, self.relay.ports["smtp"], CLEAN)
        body = await self.relay.stores.spool.body(queue_id)
        assert body is not None
        header = body.split(b"\r\n\r\n", 1)[0]
        self.assertIn(b"\r\nSubject: *** SPAM *** hello\r\n", header)
        self.assertNotIn(b"Subject: hello\r\n", header)
        self.assertIn(b"\r\nX-Spamd-Result: default: True [9.0 / 15.0]\r\n", header)
        [sent] = self.canned.requests
        self.assertEqual(sent["path"], b"/checkv2")
        self.assertEqual(sent["headers"]["Queue-Id"], [queue_id])
        self.assertEqual(sent["headers"]["Ip"], ["127.0.0.1"])
        self.assertEqual(sent["headers"]["Rcpt"], ["a@example.org"])
        self.assertIn(b"hello there", sent["body"])
        counter = self.relay.service.metrics.filter_decisions
        self.assertEqual(counter.labels("pass", "accept")._value.get(), 1)
        self.assertEqual(counter.labels("rspamd", "rewrite subject")._value.get(), 1)

    async def test_api_mail_goes_as_authenticated_and_is_not_greylisted(self) -> None:
        self.canned.answer = {"action": "greylist"}
        key = await self.relay.add_credential("app", tenant="acme", scopes=["send"])
        code, answer = await _post(self.relay, key, "hello there")
        self.assertEqual(code, 202, answer)
        [sent] = self.canned.requests
        self.assertEqual(sent["headers"]["User"], ["app"])
        # Unauthenticated mail is greylisted: 451 4.7.1.
        error = await in_thread(_send_expecting_refusal, self.relay.ports["smtp"], CLEAN)
        self.assertEqual((error.smtp_code, error.smtp_error[:5]), (451, b"4.7.1"))

    async def test_soft_reject_is_451_and_an_event(self) -> None:
        self.canned.answer = {"action": "soft reject",
                              "messages": {"smtp_message": "Try later"}}
        error = await in_thread(_send_expecting_refusal, self.relay.ports["smtp"], CLEAN)
        self.assertEqual((error.smtp_code, error.smtp_error), (451, b"4.7.1 Try later"))
        page = await self.relay.stores.eventlog.search(EventQuery(type="rejected"))
        self.assertEqual([(e.tenant, e.response) for e in page.events],
                         [("acme", Reply(451, "4.7.1", "Try later"))])

    async def test_slow_filter_stalls_only_its_session(self) -> None:
        """rspamd never answers: the filtered session waits for the timeout (then
        on_error = "accept" takes the message) while an unfiltered one is served."""
        self.canned.answer = None
        slow = in_thread(_send, self.relay.ports["smtp"], CLEAN)
        await in_thread(_send, self.relay.ports["plain"], CLEAN)
        self.assertFalse(slow.called)
        queue_id = await slow
        self.assertTrue(await self.relay.stores.spool.get(queue_id))
        counter = self.relay.service.metrics.filter_decisions
        self.assertEqual(counter.labels("rspamd", "error")._value.get(), 1)

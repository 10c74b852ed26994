"""Intake: the last step before the queue (cleanup, content filters, spool, events).

Both the SMTP server and the HTTP API hand finished messages here.  ``accept`` fires
with the queue id only once the spool has the message on stable storage; any failure
leaves nothing in the spool.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from attrs import define, evolve, field, frozen
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from sendarix.cleanup.dkim import SigningKey, sign_message
from sendarix.cleanup.filters import FilterChains
from sendarix.cleanup.headers import CleanedMessage, CleanupInfo, amend, cleanup
from sendarix.cleanup.keyring import DomainKeyring
from sendarix.cleanup.reference import header_line
from sendarix.ingress.queueid import QueueIdGenerator
from sendarix.interfaces import (
    IActiveQueue,
    IContentFilter,
    IEventSink,
    ILaterEventSink,
    ILeasedEnqueue,
    ISpool,
)
from sendarix.model.address import domain_of
from sendarix.model.credential import Credential
from sendarix.model.event import Event
from sendarix.model.filtering import FilterContext
from sendarix.model.message import Envelope, MessageMeta, NewMessage, Reply, TLSInfo

log = Logger()


def after_reply(clock: IReactorTime, work: Callable[..., object], *args: Any,
                sent_at_once: bool = False) -> None:
    """Run ``work(*args)`` once the reply written now has been sent.

    A plain listener's connection sends a reply at once (``node/transport.py``;
    ``sent_at_once``): the work then runs after the code that writes the reply and
    before the reactor looks at its sockets again, as long as this is called from a
    database thread's result or a socket's read (the spools' results come so).  A
    message then reaches delivery before the session's next command is read (most
    often QUIT, whose answer and close would otherwise come first).

    A connection under TLS, like Twisted's own transports (the HTTP API's), holds a
    reply until the reactor next looks at its sockets, and a timed call made now
    runs before that: each pass of the reactor runs its due timed calls first.  A
    timed call made from within a timed call waits for the next pass, so the work
    is scheduled from one, and the reply leaves first either way.
    """
    if sent_at_once:
        clock.callLater(0, work, *args)
    else:
        clock.callLater(0, clock.callLater, 0, work, *args)


def _nothing() -> None:
    return None


class Refused(Exception):  # noqa: N818 - reads as "raise Refused(reply)"
    """A message (or command) is refused with an SMTP reply."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.code} {reply.enhanced} {reply.text}")
        self.reply = reply


@frozen
class Submission:
    """A message as a client handed it over, before cleanup."""

    queue_id: str
    envelope: Envelope
    body: bytes = field(repr=lambda b: f"<{len(b)} bytes>")
    tenant: str
    client_ip: str = ""
    helo: str = ""
    listener: str = ""
    protocol: str = "ESMTP"
    tls: TLSInfo | None = None
    credential: Credential | None = None
    #: A scheduled send: not delivered before this time (POSIX seconds).
    not_before: float | None = None


@frozen
class Accepted:
    """A message on stable storage: its queue id and Message-ID."""

    queue_id: str
    message_id: str


@define
class Intake:
    """Turns submissions into spooled messages and ``accepted`` events."""

    spool: ISpool
    events: IEventSink
    clock: IReactorTime
    node: str
    hostname: str
    #: The content filters of every message, unless ``chains`` chooses them.
    filters: Sequence[IContentFilter] = ()
    #: Each message's filters by its tenant and listener (docs/filtering.md).
    chains: FilterChains | None = None
    #: Called with a filter's name and its action for each decision (a metric).
    on_filtered: Callable[[str, str], None] | None = None
    expose_auth: bool = False
    _ids: QueueIdGenerator | None = None
    #: Sending domains: DKIM keys for verified header From domains (None: no signing).
    keyring: DomainKeyring | None = None
    #: Refuse (550 5.7.1) mail whose header From domain is not verified.
    require_verified_domains: bool = False
    #: Runs the signing function off the reactor thread (a test may run it inline).
    in_thread: Any = deferToThread
    #: Called with each message spooled without being handed to delivery (the node
    #: wakes its delivery loop when a poll would take it).
    on_queued: Callable[[NewMessage], None] | None = None
    #: The delivery agent, taking fresh mail in memory at its commit when the spool
    #: can lease it in the same commit (None: every message waits for a lease poll).
    active_queue: IActiveQueue | None = None
    #: The key of the reference each message carries (None: no reference).
    reference_key: bytes | None = None
    #: Reads reports sent to feedback addresses (None: there are none).
    feedback: Any = None
    #: Is this recipient a feedback address (its mail is a report, never relayed)?
    is_feedback: Callable[[str], bool] = lambda address: False
    #: Called with the listener's name and the tenant of each message spooled.
    on_received: Callable[[str, str], None] | None = None
    #: Messages durable and answered whose hand-over and event are still to come.
    _unsettled: int = field(default=0, init=False)
    _settled_waiters: list[Deferred[None]] = field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        if self._ids is None:
            self._ids = QueueIdGenerator(self.node, self.clock)

    def settled(self) -> Deferred[None]:
        """Fires once every message accepted so far has been handed to delivery and
        its ``accepted`` event emitted (at once when none is waiting): a node that
        stops waits for it before it stops delivery and closes the stores."""
        if not self._unsettled:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._settled_waiters.append(d)
        return d

    def new_queue_id(self) -> str:
        """A fresh queue id (assigned when a transaction starts, as in Received)."""
        assert self._ids is not None
        return self._ids.next()

    def accept(self, sub: Submission, *, reply_sent_at_once: bool = False) -> Deferred[str]:
        """Clean up, filter and spool ``sub``; fires with its queue id once durable.

        Fails with :obj:`Refused` for a policy or content refusal; any other failure means
        the spool did not take the message (answer 451 4.3.0).  ``reply_sent_at_once``:
        the caller's answer, written when this fires, leaves at once (see
        :func:`after_reply`).
        """
        return ensureDeferred(self._accept(sub, reply_sent_at_once)).addCallback(
            lambda taken: taken.queue_id
        )

    def accept_message(self, sub: Submission) -> Deferred[Accepted]:
        """As :meth:`accept`, firing with the queue id and the Message-ID."""
        return ensureDeferred(self._accept(sub))

    async def _accept(self, sub: Submission, reply_sent_at_once: bool = False) -> Accepted:
        if self.feedback is not None:
            reports = [r for r in sub.envelope.recipients if self.is_feedback(r)]
            if reports:
                # A report is read, never relayed; other recipients go on as usual.
                await self._read_report(sub, reports)
                rest = tuple(r for r in sub.envelope.recipients if r not in reports)
                if not rest:
                    return Accepted(sub.queue_id, "")
                sub = evolve(sub, envelope=evolve(sub.envelope, recipients=rest))
        now = self.clock.seconds()
        cred = sub.credential
        cleaned = cleanup(
            sub.body,
            CleanupInfo(
                hostname=self.hostname,
                queue_id=sub.queue_id,
                helo=sub.helo,
                client_ip=sub.client_ip,
                client_name=None,
                protocol=sub.protocol,
                tls_version=sub.tls.version if sub.tls else None,
                tls_cipher=sub.tls.cipher if sub.tls else None,
                recipients=sub.envelope.recipients,
                authenticated_as=cred.name if cred else None,
                expose_auth=self.expose_auth,
                now=now,
                message_id_domain=self.hostname,
            ),
        )
        if cred is not None and cred.domains:
            hdr_domain = domain_of(cleaned.header_from) if cleaned.header_from else ""
            if not cred.allows_sender_domain(hdr_domain):
                raise Refused(
                    Reply(550, "5.7.1", "Header From address not allowed for this credential")
                )
        keys = await self._signing_keys(cleaned.header_from, sub.tenant)
        body = await self._filter(sub, cleaned.body)
        end = body.find(b"\r\n\r\n")
        if self.reference_key is not None and end >= 0:
            # At the end of the header, before signing: reports quote it back to us.
            end += 2
            body = body[:end] + header_line(self.reference_key, sub.queue_id, sub.tenant) + (
                body[end:]
            )
        if keys:
            # Hashing a large body and the RSA operation belong off the reactor thread.
            body = await self.in_thread(sign_message, body, keys, int(now))
        tenant = sub.tenant
        meta = MessageMeta(
            tenant=tenant,
            received_at=now,
            client_ip=sub.client_ip,
            helo=sub.helo,
            credential=cred.name if cred else None,
            listener=sub.listener,
            tls=sub.tls,
            message_id=cleaned.message_id,
            tags=cleaned.tags,
            stream=cleaned.stream,
            node=self.node,
            sandbox=bool(cred and cred.sandbox),
        )
        message = NewMessage(
            queue_id=sub.queue_id, envelope=sub.envelope, meta=meta, body=body,
            not_before=sub.not_before,
        )
        hand_over = await self._spool(message)
        # Durable: the caller answers now.  Handing the message to delivery, counting
        # it and its event wait until that answer has left (see after_reply), so the
        # client is not kept waiting for bookkeeping it does not need.
        self._unsettled += 1
        after_reply(self.clock, self._accepted, hand_over, sub, cleaned,
                    sent_at_once=reply_sent_at_once)
        return Accepted(sub.queue_id, cleaned.message_id)

    def _accepted(self, hand_over: Callable[[], None], sub: Submission,
                  cleaned: CleanedMessage) -> None:
        """After the reply to ``sub``: start its delivery, count it, log its event
        (on the reactor's next pass where the event sink can hold it, so the
        delivery's first step is not kept waiting for it)."""
        handed: Deferred[None] | None = None
        try:
            try:
                hand_over()
            except Exception:
                # Durable (leased to us, or due in the spool): a later poll delivers it.
                log.failure("handing {queue_id} to delivery failed", queue_id=sub.queue_id)
            if self.on_received is not None:
                try:
                    self.on_received(sub.listener, sub.tenant)
                except Exception:
                    # Durable already: a counting error must not lose the event.
                    log.failure("counting a received message failed")
            handed = self._emit(
                "accepted",
                later=True,
                queue_id=sub.queue_id,
                message_id=cleaned.message_id,
                tenant=sub.tenant,
                sender=sub.envelope.sender,
                recipients=sub.envelope.recipients,
                tags=cleaned.tags,
                tls=sub.tls,
            )
        finally:
            if handed is None:
                self._settle()
            else:
                handed.addBoth(lambda _: self._settle())

    def _settle(self) -> None:
        """One accepted message less whose hand-over or event is still to come (the
        event counts once it is handed to the sinks, as a plain ``emit`` does)."""
        self._unsettled -= 1
        if not self._unsettled:
            waiters, self._settled_waiters = self._settled_waiters, []
            for d in waiters:
                d.callback(None)

    async def _spool(self, message: NewMessage) -> Callable[[], None]:
        """Commit ``message``; what hands it to delivery once the client has its answer.

        With room in the active queue, the commit leases it to this node and the
        hand-over gives it to delivery from memory (no poll, no read back); otherwise
        the hand-over tells delivery that mail is due in the spool."""
        active = self.active_queue
        lease = None
        if active is not None and ILeasedEnqueue.providedBy(self.spool):
            lease = active.reserve(message)
        if lease is None or active is None:
            await self.spool.enqueue(message)
            on_queued = self.on_queued
            return (lambda: on_queued(message)) if on_queued is not None else _nothing
        try:
            deliveries = await self.spool.enqueue_leased(  # type: ignore[attr-defined]
                message, lease.node, lease.expires
            )
        except BaseException:
            active.cancel(message)
            raise
        return lambda: active.take(message, deliveries)

    async def _filter(self, sub: Submission, body: bytes) -> bytes:
        """Run the message's filter chain over ``body``; the body with the headers
        (and Subject) the filters asked for, or Refused by the first that refuses."""
        chain = self.chains.chain(sub.tenant, sub.listener) if self.chains else self.filters
        if not chain:
            return body
        context = FilterContext(
            queue_id=sub.queue_id, envelope=sub.envelope, tenant=sub.tenant,
            client_ip=sub.client_ip, helo=sub.helo, listener=sub.listener,
            user=sub.credential.name if sub.credential else None,
        )
        for content_filter in chain:
            verdict = await content_filter.check(context, body)
            if self.on_filtered is not None:
                try:
                    self.on_filtered(content_filter.name, verdict.action)
                except Exception:
                    log.failure("counting a filter decision failed")
            if verdict.reply is not None:
                raise Refused(verdict.reply)
            body = amend(body, verdict.headers, verdict.subject)
        return body

    async def _signing_keys(self, header_from: str | None, tenant: str) -> tuple[SigningKey, ...]:
        """The DKIM keys for the header From domain: its verified keys, when it belongs
        to ``tenant`` or to no tenant; Refused when verified domains are required and
        it has no verified key."""
        if self.keyring is None:
            return ()
        domain = domain_of(header_from) if header_from else ""
        sd = await self.keyring.lookup(domain) if domain else None
        usable = sd is not None and sd.usable and sd.tenant in (None, tenant)
        if not usable:
            if self.require_verified_domains:
                what = f"domain {domain}" if domain else "address"
                raise Refused(Reply(
                    550, "5.7.1", f"Header From {what} is not a verified sending domain"
                ))
            return ()
        try:
            return await self.keyring.signing_keys(domain)
        except Exception:
            # Never send unsigned what should be signed: the client gets 451 and retries.
            log.failure("cannot load the DKIM keys of {domain}", domain=domain)
            raise

    async def _read_report(self, sub: Submission, recipients: list[str]) -> None:
        try:
            outcome = await self.feedback.handle(sub.body, recipients)
        except Exception:
            # The sender gets its 250 anyway: a report we cannot use is not an error
            # it could fix, and a retry would not help.
            log.failure("feedback report {queue_id} could not be read", queue_id=sub.queue_id)
            return
        log.info("feedback report {queue_id} from {ip}: {outcome}", queue_id=sub.queue_id,
                 ip=sub.client_ip, outcome=outcome)

    def rejected(
        self,
        reply: Reply,
        *,
        tenant: str,
        sender: str | None,
        recipients: Sequence[str] = (),
        queue_id: str | None = None,
    ) -> None:
        """Record a ``rejected`` event for a refused transaction (or command)."""
        self._emit(
            "rejected",
            queue_id=queue_id,
            tenant=tenant,
            sender=sender,
            recipient=recipients[0] if len(recipients) == 1 else None,
            recipients=tuple(recipients),
            response=reply,
        )

    def suppressed(self, recipient: str, *, tenant: str, sender: str | None) -> None:
        """Record a ``suppressed`` event: RCPT to a suppressed address was refused."""
        self._emit(
            "suppressed",
            tenant=tenant,
            sender=sender,
            recipient=recipient,
            response=Reply(550, "5.1.1", "recipient suppressed"),
        )

    def _emit(self, type: str, *, later: bool = False, **fields: Any) -> Deferred[None] | None:
        """Record an event of ``type`` stamped now, from this node; ``later``: on the
        reactor's next pass, where the sink can (:class:`ILaterEventSink`).  Returns
        what fires once the event has been handed to the sinks, or None when it has
        been already."""
        event = Event.make(type, self.clock.seconds(), node=self.node, **fields)
        # The message is already durable; a lost log line must not fail the 250.
        try:
            if later and ILaterEventSink.providedBy(self.events):
                return self.events.emit_later(event).addErrback(
                    lambda f: log.failure("event sink failed", f)
                )
            d = self.events.emit(event)
        except Exception:
            log.failure("event sink failed for {type}", type=event.type)
            return None
        if isinstance(d, Deferred):
            d.addErrback(lambda f: log.failure("event sink failed", f))
        return None

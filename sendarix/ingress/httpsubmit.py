"""The HTTP door: a message composed from an API request goes through the checks a
session makes at MAIL and RCPT (the same functions of :mod:`sendarix.ingress.policy`),
then into the same :class:`~sendarix.cleanup.intake.Intake` as SMTP mail.

What differs from SMTP is only the shape of the answer: every recipient gets a status
(``queued`` or ``suppressed``) and a refusal carries an API error code beside the SMTP
reply that policy chose, so the HTTP layer can pick a status code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from sendarix.cleanup.intake import Intake, Refused, Submission
from sendarix.cleanup.keyring import DomainKeyring
from sendarix.config.settings import LimitsConfig
from sendarix.ingress import policy
from sendarix.ingress.compose import ComposedMessage
from sendarix.interfaces import IRateLimiter, ISuppressionStore
from sendarix.model.credential import Credential
from sendarix.model.message import Envelope, Reply


class SubmitRefused(Exception):  # noqa: N818 - reads as "raise SubmitRefused(...)"
    """The message is refused: ``code`` is the API's error code, ``reply`` what an SMTP
    client would have been told."""

    def __init__(self, code: str, reply: Reply) -> None:
        super().__init__(reply.text)
        self.code = code
        self.reply = reply


@frozen
class RecipientResult:
    address: str
    status: str  # "queued" or "suppressed"


@frozen
class SubmitResult:
    """A message taken: its queue id (the API's message id), Message-ID header value,
    and each recipient's status."""

    queue_id: str
    message_id: str | None
    recipients: tuple[RecipientResult, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.queue_id,
            "message_id": self.message_id,
            "recipients": [{"address": r.address, "status": r.status} for r in self.recipients],
        }


#: API error codes for the refusals policy can return (by SMTP reply).
_CODES: dict[Reply, str] = {
    policy.SENDER_NOT_ALLOWED: "sender_not_allowed",
    policy.MESSAGE_RATE: "rate_limited",
    policy.TENANT_RATE: "rate_limited",
    policy.RECIPIENT_RATE: "rate_limited",
    policy.TOO_MANY_RECIPIENTS: "too_many_recipients",
    policy.TENANT_QUOTA: "quota_exceeded",
    policy.CREDENTIAL_VOID: "unauthorized",
}


def _refused(reply: Reply, default: str = "message_refused") -> SubmitRefused:
    return SubmitRefused(_CODES.get(reply, default), reply)


@frozen
class HTTPSubmission:
    """Everything the HTTP door shares with the SMTP listeners' policy."""

    intake: Intake
    clock: IReactorTime
    limits: LimitsConfig
    rate_limiter: IRateLimiter
    suppressions: ISuppressionStore | None = None
    keyring: DomainKeyring | None = None
    require_verified_domains: bool = False
    tenant_rates: Mapping[str, tuple[float, float]] = {}
    tenant_quotas: Mapping[str, int] = {}
    #: The simulator's domain (its ``suppressed`` address is refused as suppressed).
    simulator_domain: str | None = None

    def submit(
        self, credential: Credential, client_ip: str, message: ComposedMessage,
        not_before: float | None = None,
    ) -> Deferred[SubmitResult]:
        """Check, clean up, sign and spool ``message`` for ``credential``; fires once
        the spool has it, or fails with :obj:`SubmitRefused` (nothing queued).
        ``not_before`` holds it in the spool until then (a scheduled send)."""
        return Deferred.fromCoroutine(self._submit(credential, client_ip, message, not_before))

    async def _submit(
        self, cred: Credential, client_ip: str, message: ComposedMessage,
        not_before: float | None,
    ) -> SubmitResult:
        now = self.clock.seconds()
        tenant = cred.tenant
        sender = message.sender
        if not cred.allows_ip(client_ip):
            raise SubmitRefused(
                "forbidden_ip", Reply(550, "5.7.1", f"Client address {client_ip} not allowed")
            )
        if len(message.body) > self.limits.max_message_size:
            raise SubmitRefused(
                "message_too_large",
                Reply(552, "5.3.4", f"Message larger than {self.limits.max_message_size} bytes"),
            )
        if len(message.recipients) > self.limits.max_recipients:
            raise _refused(policy.TOO_MANY_RECIPIENTS)
        refusal = (
            policy.sender_refusal(cred, sender, self.rate_limiter, now)
            or policy.tenant_rate_refusal(tenant, self.tenant_rates, self.rate_limiter, now)
            or policy.tenant_quota_refusal(tenant, self.tenant_quotas, self.rate_limiter, now)
        )
        if refusal is not None:
            self._rejected(refusal, tenant, sender, message.recipients)
            raise _refused(refusal)
        if self.keyring is not None and policy.needs_verified_domain(
            self.require_verified_domains, sender
        ):
            domain = policy.domain_of(sender)
            found = await self.keyring.lookup(domain)
            refusal = policy.verified_domain_refusal(domain, found, tenant)
            if refusal is not None:
                self._rejected(refusal, tenant, sender, message.recipients)
                raise _refused(refusal, "unverified_domain")
        results: list[RecipientResult] = []
        accepted: list[str] = []
        for address in message.recipients:
            refusal = policy.recipient_rate_refusal(
                cred, self.limits.recipient_rate, self.rate_limiter, now
            )
            if refusal is not None:
                self._rejected(refusal, tenant, sender, (address,))
                raise _refused(refusal)
            entry = None
            simulated = policy.simulator_suppressed(
                address, self.simulator_domain, cred.sandbox
            )
            if self.suppressions is not None and not simulated:
                entry = await self.suppressions.is_suppressed(tenant, address)
            if policy.suppression_refusal(entry, simulated) is not None:
                self.intake.suppressed(address, tenant=tenant, sender=sender)
                results.append(RecipientResult(address, "suppressed"))
            else:
                accepted.append(address)
                results.append(RecipientResult(address, "queued"))
        if not accepted:
            raise SubmitRefused(
                "all_recipients_suppressed",
                Reply(550, "5.1.1", "Every recipient is on the suppression list"),
            )
        eight_bit = any(b > 0x7F for b in message.body)
        submission = Submission(
            queue_id=self.intake.new_queue_id(),
            envelope=Envelope(
                sender=sender, recipients=tuple(accepted),
                body="8BITMIME" if eight_bit else None, smtputf8=message.smtputf8,
            ),
            body=message.body,
            tenant=tenant,
            client_ip=client_ip,
            listener="api",
            protocol="HTTP",
            credential=cred,
            not_before=not_before,
        )
        try:
            taken = await self.intake.accept_message(submission)
        except Refused as e:
            self._rejected(e.reply, tenant, sender, tuple(accepted), submission.queue_id)
            code = "content_rejected" if e.reply.code >= 500 else "message_refused"
            if "Header From" in e.reply.text:
                code = "unverified_domain" if "verified" in e.reply.text else "sender_not_allowed"
            raise SubmitRefused(code, e.reply) from None
        return SubmitResult(taken.queue_id, taken.message_id, tuple(results))

    def _rejected(
        self, reply: Reply, tenant: str, sender: str, recipients: tuple[str, ...],
        queue_id: str | None = None,
    ) -> None:
        self.intake.rejected(
            reply, tenant=tenant, sender=sender, recipients=recipients, queue_id=queue_id
        )

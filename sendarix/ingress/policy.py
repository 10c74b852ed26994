"""Who may send what through a listener: the relay policy, beside the session that asks
it (as Postfix keeps smtpd_check beside smtpd).

Each check is a function of plain values (the session's facts, what a store lookup
returned, a rate limiter with time passed in) and returns the refusal to answer, or
None to go on.  The SMTP server does the lookups, calls these at MAIL and RCPT, and
sends what they return; the wording and codes of every refusal live here.
"""

from __future__ import annotations

from collections.abc import Mapping

from attrs import frozen

from sendarix.interfaces import IRateLimiter
from sendarix.model import simulation
from sendarix.model.credential import Credential
from sendarix.model.domain import SendingDomain
from sendarix.model.message import Reply

RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
CREDENTIAL_VOID = Reply(530, "5.7.0", "Credential no longer valid, authenticate again")
SENDER_NOT_ALLOWED = Reply(550, "5.7.1", "Sender address not allowed for this credential")
MESSAGE_RATE = Reply(450, "4.7.1", "Message rate limit exceeded, try again later")
TENANT_RATE = Reply(450, "4.7.1", "Tenant message rate limit exceeded, try again later")
RECIPIENT_RATE = Reply(450, "4.7.1", "Recipient rate limit exceeded, try again later")
TENANT_QUOTA = Reply(450, "4.7.1", "Tenant daily quota reached, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
SUPPRESSED = Reply(550, "5.1.1", "recipient suppressed")


@frozen
class Client:
    """What the policy knows of the client at a check: its address, whether that
    address is in the listener's trusted networks, and its credential (None before a
    successful AUTH)."""

    ip: str
    trusted: bool
    credential: Credential | None


def domain_of(sender: str) -> str:
    """The lowercased domain of a reverse-path ("" for the null sender)."""
    return sender.rpartition("@")[2].lower() if sender else ""


def relay_refusal(auth_mode: str, client: Client) -> Reply | None:
    """May this client start a transaction at all?  ``auth_mode`` is the listener's
    ``auth`` (``required``, ``optional`` for trusted networks, ``none``).

    On an ``auth = "none"`` listener every client may start one: an untrusted client
    is refused at RCPT instead (:func:`recipient_relay_refusal`), because the same
    client may be a mailbox provider delivering a report to a feedback address.
    """
    if client.credential is not None:
        return None
    if auth_mode == "optional" and client.trusted:
        return None
    if auth_mode == "none":
        return None
    return AUTH_REQUIRED


def recipient_relay_refusal(auth_mode: str, client: Client) -> Reply | None:
    """A recipient from a client that may not relay: 554 5.7.1 (an untrusted client of
    an ``auth = "none"`` listener; addresses the node itself handles are not relayed
    and are checked before this)."""
    if auth_mode == "none" and not client.trusted and client.credential is None:
        return RELAY_DENIED
    return None


def credential_refusal(presented: Credential, current: Credential | None, ip: str) -> Reply | None:
    """The credential the client authenticated with, read again at MAIL: revoked,
    rotated (another secret) or no longer allowed from ``ip`` ends its use at once."""
    if (
        current is None
        or not current.active
        or current.secret_hash != presented.secret_hash
        or not current.allows_ip(ip)
    ):
        return CREDENTIAL_VOID
    return None


def sender_refusal(
    credential: Credential, sender: str, limiter: IRateLimiter, now: float
) -> Reply | None:
    """The credential's sender domains and its own message rate (counted when the
    message is allowed)."""
    if credential.domains and not credential.allows_sender_domain(domain_of(sender)):
        return SENDER_NOT_ALLOWED
    if credential.rate_per_minute is not None and not limiter.allow(
        "cred:" + credential.name, credential.rate_per_minute, 60.0, now
    ):
        return MESSAGE_RATE
    return None


def tenant_rate_refusal(
    tenant: str,
    tenant_rates: Mapping[str, tuple[float, float]],
    limiter: IRateLimiter,
    now: float,
) -> Reply | None:
    """The tenant's ``rate`` (messages per period, every credential and listener of
    the tenant together)."""
    limit = tenant_rates.get(tenant)
    if limit is None:
        return None
    count, period = limit
    if limiter.allow("tenant:" + tenant, count, period, now):
        return None
    return TENANT_RATE


def tenant_quota_refusal(
    tenant: str, quotas: Mapping[str, int], limiter: IRateLimiter, now: float
) -> Reply | None:
    """The tenant's daily ``quota`` (messages over a rolling day, every credential and
    listener together)."""
    quota = quotas.get(tenant)
    if quota is None or limiter.allow("quota:" + tenant, quota, 86400.0, now):
        return None
    return TENANT_QUOTA


def needs_verified_domain(required: bool, sender: str) -> bool:
    """Must the sender's domain be looked up as a verified sending domain?"""
    return required and bool(sender)


def verified_domain_refusal(
    domain: str, found: SendingDomain | None, tenant: str
) -> Reply | None:
    """The sender's domain, when verified sending domains are required: it must be a
    usable (verified) domain of this tenant, or of no tenant in particular."""
    if found is None or not found.usable or found.tenant not in (None, tenant):
        return Reply(550, "5.7.1", f"Sender domain {domain} is not a verified sending domain")
    return None


def recipient_count_refusal(accepted: int, max_recipients: int) -> Reply | None:
    """One more recipient after ``accepted`` of them."""
    return TOO_MANY_RECIPIENTS if accepted >= max_recipients else None


def recipient_rate_refusal(
    credential: Credential | None,
    recipient_rate: tuple[float, float] | None,
    limiter: IRateLimiter,
    now: float,
) -> Reply | None:
    """The per-credential recipient rate of ``[limits] recipient_rate``."""
    if recipient_rate is None or credential is None:
        return None
    if limiter.allow("rcpt:" + credential.name, *recipient_rate, now):
        return None
    return RECIPIENT_RATE


def simulator_suppressed(address: str, simulator_domain: str | None, sandbox: bool) -> bool:
    """True when ``address`` is one the simulator keeps on every suppression list: the
    local part ``suppressed`` (or ``suppressed+anything``) at the simulator domain, or
    at any domain for a sandbox credential, whose mail all goes to the simulator
    (docs/delivery.md, "The simulator")."""
    local, at, domain = address.rpartition("@")
    if not at or simulation.simulated_kind(local) != simulation.SUPPRESSED:
        return False
    if sandbox:
        return True
    return simulator_domain is not None and (
        domain.lower().rstrip(".") == simulator_domain.lower().rstrip(".")
    )


def suppression_refusal(entry: object | None, simulated: bool = False) -> Reply | None:
    """A recipient on the tenant's suppression list (``entry`` is what the list
    returned for it, None when not listed; ``simulated``: the simulator's
    :func:`simulator_suppressed` address)."""
    return None if entry is None and not simulated else SUPPRESSED

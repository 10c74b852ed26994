"""Dashboard login sessions as values: a :class:`Session`, the rules that end one
(:class:`SessionRules`: idle time, lifetime, how many are kept), the random tokens
and the key a session is stored under.  Pure: time is passed in."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from attrs import field, frozen


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def same_token(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a submitted token with the expected one."""
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def session_key(session_id: str) -> str:
    """The name a session is stored under: the SHA-256 (hex) of its id.

    The id is what the browser's cookie holds, so whoever could read it from the
    stores (a copy of the database, a Redis replica, a backup) could log in as the
    operator; its hash is of no use to them.  The id is 256 random bits, so a plain
    hash cannot be reversed or guessed: no salt or key is needed, and every node and
    worker finds the session from the cookie alone.
    """
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()


@frozen
class Session:
    """One logged-in browser.

    ``id`` is the cookie's value; the stores keep only :func:`session_key` of it.
    The form token (``csrf``) and the credential's secret hash are kept as they are:
    every request compares them, and neither logs anyone in by itself.
    """

    id: str
    #: The credential that logged in, and its secret hash then (a rotation ends it).
    credential: str
    secret_hash: str = field(repr=False)
    tenant: str
    operator: bool
    created: float
    #: The last request (the idle time counts from here).
    seen: float
    csrf: str = field(factory=new_token, repr=False)
    #: One message for the next page (what the last action did), shown once.
    flash: str | None = None


@frozen
class SessionRules:
    """When a session ends: ``idle`` seconds without a request or ``lifetime``
    seconds after the login; and the most sessions kept (``limit``; beyond it the
    least recently seen goes first)."""

    idle: float = 1800.0
    lifetime: float = 8 * 3600.0
    limit: int = 1000

    def new(
        self, credential: str, secret_hash: str, tenant: str, operator: bool, now: float
    ) -> Session:
        """A session for a login at ``now`` (a fresh random id and form token)."""
        return Session(new_token(), credential, secret_hash, tenant, operator, now, now)

    def ends(self, session: Session) -> float:
        """When ``session`` ends unless another request comes first."""
        return min(session.seen + self.idle, session.created + self.lifetime)

    def live(self, session: Session, now: float) -> bool:
        """Whether ``session`` is still good at ``now``."""
        return now - session.seen <= self.idle and now - session.created <= self.lifetime

    def left(self, session: Session, now: float) -> float:
        """Seconds ``session`` has left at ``now`` (0 once it has ended)."""
        return max(0.0, self.ends(session) - now) if self.live(session, now) else 0.0

"""Dashboard sessions: kept in this process's memory, named by a random id that the
browser holds in a cookie (``HttpOnly``, ``SameSite=Strict``, ``Secure`` over TLS).

A session ends after ``idle`` seconds without a request, ``lifetime`` seconds after
the login, at logout, or when the process restarts.  Each carries its own token for
the forms that change something (cross-site request forgery), and remembers which
credential logged in, so the credential is checked again on every request.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

from attrs import define, field

#: The session cookie's name.
COOKIE = "sendarix_session"
#: The cookie of the login form's token (before there is a session).
LOGIN_COOKIE = "sendarix_login"


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def same_token(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a submitted token with the expected one."""
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


@define
class Session:
    """One logged-in browser."""

    id: str
    #: The credential that logged in, and its secret hash then (a rotation ends it).
    credential: str
    secret_hash: str = field(repr=False)
    tenant: str
    operator: bool
    created: float
    seen: float
    csrf: str = field(factory=new_token, repr=False)
    #: One message for the next page (what the last action did).
    flash: str | None = None

    def take_flash(self) -> str | None:
        message, self.flash = self.flash, None
        return message


@define
class SessionStore:
    """The sessions of this process."""

    clock: Any
    idle: float = 1800.0
    lifetime: float = 8 * 3600.0
    #: The most sessions kept; the least recently used goes first beyond it.
    limit: int = 1000
    _sessions: dict[str, Session] = field(factory=dict, init=False)

    def create(self, credential: str, secret_hash: str, tenant: str, operator: bool) -> Session:
        now = self.clock.seconds()
        self._expire(now)
        while len(self._sessions) >= self.limit:
            oldest = min(self._sessions.values(), key=lambda s: s.seen)
            del self._sessions[oldest.id]
        session = Session(new_token(), credential, secret_hash, tenant, operator, now, now)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session ``session_id`` names (its idle time starts again), or None."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self.clock.seconds()
        if now - session.seen > self.idle or now - session.created > self.lifetime:
            del self._sessions[session_id]
            return None
        session.seen = now
        return session

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def _expire(self, now: float) -> None:
        for sid, s in list(self._sessions.items()):
            if now - s.seen > self.idle or now - s.created > self.lifetime:
                del self._sessions[sid]

    def __len__(self) -> int:
        return len(self._sessions)

"""Server-side SASL mechanisms for SMTP AUTH (RFC 4954): PLAIN and LOGIN.

Each mechanism is a small state machine fed the decoded client responses; when it is
done it holds a username and password (an ``IUsernamePassword`` for twisted.cred).
"""

from __future__ import annotations

from twisted.cred.credentials import IUsernamePassword
from zope.interface import implementer


class SASLError(Exception):
    """The client's SASL response is malformed."""


@implementer(IUsernamePassword)
class _Credentials:
    username: bytes
    password: bytes

    def __init__(self) -> None:
        self.username = b""
        self.password = b""

    def checkPassword(self, password: bytes) -> bool:
        # Secrets are stored hashed; checkers compare ``self.password`` themselves.
        return False


class PlainMechanism(_Credentials):
    """RFC 4616: one response ``authzid NUL authcid NUL passwd``."""

    name = b"PLAIN"

    def __init__(self) -> None:
        super().__init__()
        self.done = False

    def challenge(self) -> bytes:
        return b""

    def respond(self, data: bytes) -> None:
        parts = data.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise SASLError("PLAIN response must be authzid NUL authcid NUL password")
        authzid, authcid, passwd = parts
        if authzid and authzid != authcid:
            # Acting for another identity is not offered.
            raise SASLError("authorization identity must match the authentication identity")
        self.username, self.password = authcid, passwd
        self.done = True


class LoginMechanism(_Credentials):
    """The widespread LOGIN mechanism: username, then password, each prompted."""

    name = b"LOGIN"

    def __init__(self) -> None:
        super().__init__()
        self._step = 0
        self.done = False

    def challenge(self) -> bytes:
        return b"Username:" if self._step == 0 else b"Password:"

    def respond(self, data: bytes) -> None:
        if not data:
            raise SASLError("empty LOGIN response")
        if self._step == 0:
            self.username = data
            self._step = 1
        else:
            self.password = data
            self.done = True


MECHANISMS: dict[bytes, type[PlainMechanism] | type[LoginMechanism]] = {
    b"PLAIN": PlainMechanism,
    b"LOGIN": LoginMechanism,
}

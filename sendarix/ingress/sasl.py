"""Server-side SASL mechanisms for SMTP AUTH (RFC 4954): PLAIN, LOGIN and XOAUTH2.

Each mechanism is a small state machine fed the decoded client responses; when it is
done it holds twisted.cred credentials: a username and password
(``IUsernamePassword``) for PLAIN and LOGIN, a username and bearer token
(``IBearerToken``) for XOAUTH2.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.cred.credentials import IUsernamePassword
from zope.interface import implementer

from sendarix.ingress.xoauth2 import parse_xoauth2
from sendarix.interfaces import IBearerToken


class SASLError(Exception):
    """The client's SASL response is malformed."""


@implementer(IUsernamePassword)
class _Credentials:
    username: bytes
    password: bytes
    #: What the portal needs a checker for, to offer this mechanism.
    credential_interface = IUsernamePassword

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


@implementer(IBearerToken)
class XOAuth2Mechanism:
    """XOAUTH2: one response ``user=NAME ^A auth=Bearer TOKEN ^A ^A``.  When the token
    is refused, the server first sends an error challenge (a JSON status) and answers
    535 after the client's (empty) reply."""

    name = b"XOAUTH2"
    credential_interface = IBearerToken
    #: The error challenge sent when the token is refused.
    ERROR = json.dumps({"status": "401", "schemes": "bearer"}).encode()

    def __init__(self) -> None:
        self.username = b""
        self.token = b""
        self.done = False

    def challenge(self) -> bytes:
        return b""

    def respond(self, data: bytes) -> None:
        try:
            self.username, self.token = parse_xoauth2(data)
        except ValueError as e:
            raise SASLError(str(e)) from None
        self.done = True


MECHANISMS: dict[bytes, Any] = {
    b"PLAIN": PlainMechanism,
    b"LOGIN": LoginMechanism,
    b"XOAUTH2": XOAuth2Mechanism,
}

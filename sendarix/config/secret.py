"""The node secret: the value of the environment variable named by ``[node]
secret_key_env`` (default ``SENDARIX_SECRET_KEY``).

Every node of a cluster, and the ``sendarix`` command, must see the same secret.  It
never appears in a file, a log line or an event.  Independent keys are derived from
it with HKDF-SHA256, one per purpose:

- ``"dkim-keys"``: a Fernet key that encrypts DKIM private keys at rest;
- ``"xoauth2"``: the HMAC key of the built-in XOAUTH2 bearer tokens;
- ``"idempotent-answers"``: a Fernet key that encrypts the API answers kept for an
  ``Idempotency-Key`` when they hold a secret (a new API key or webhook secret).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping

from attrs import field, frozen
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["MIN_SECRET_LENGTH", "NodeSecret", "SecretError", "node_secret_from_env"]

#: A shorter secret is refused: it could be guessed offline from an encrypted key.
MIN_SECRET_LENGTH = 16


class SecretError(ValueError):
    """The node secret is missing, too short, or does not open what it should."""


@frozen
class NodeSecret:
    """The node secret and the keys derived from it (``repr`` never shows it)."""

    value: bytes = field(repr=False)
    env_name: str = "SENDARIX_SECRET_KEY"

    def __attrs_post_init__(self) -> None:
        if len(self.value) < MIN_SECRET_LENGTH:
            raise SecretError(
                f"${self.env_name} is too short: use at least {MIN_SECRET_LENGTH} random "
                "characters (for example: python3 -c 'import secrets; "
                "print(secrets.token_urlsafe(32))')"
            )

    def derive(self, purpose: str, length: int = 32) -> bytes:
        """A key for ``purpose``, independent of the keys for other purposes."""
        hkdf = HKDF(
            algorithm=hashes.SHA256(), length=length, salt=b"sendarix node secret",
            info=purpose.encode("utf-8"),
        )
        return hkdf.derive(self.value)

    def _fernet(self, purpose: str) -> Fernet:
        return Fernet(base64.urlsafe_b64encode(self.derive(purpose)))

    def encrypt(self, plaintext: bytes, purpose: str = "dkim-keys") -> str:
        """``plaintext`` encrypted and authenticated (a Fernet token, ASCII) with the
        key for ``purpose``."""
        return self._fernet(purpose).encrypt(plaintext).decode("ascii")

    def decrypt(self, token: str, purpose: str = "dkim-keys") -> bytes:
        """The plaintext of ``token``; SecretError when this secret (and ``purpose``)
        did not make it."""
        try:
            return self._fernet(purpose).decrypt(token.encode("ascii"))
        except (InvalidToken, ValueError):
            raise SecretError(
                f"${self.env_name} does not decrypt the stored keys: it is not the "
                "secret they were encrypted with"
            ) from None


def node_secret_from_env(
    env_name: str, environ: Mapping[str, str] | None = None
) -> NodeSecret | None:
    """The node secret from ``environ`` (default ``os.environ``), or None when unset
    or empty.  SecretError when it is set but too short."""
    env = os.environ if environ is None else environ
    value = env.get(env_name, "")
    if not value:
        return None
    return NodeSecret(value.encode("utf-8"), env_name)

"""Standard Webhooks signatures: ``whsec_`` secrets, the HMAC-SHA256 signature of
``"<id>.<timestamp>.<body>"`` and the three headers a POST carries (pure).

During a secret rotation an endpoint has several secrets; the POST then carries one
``v1,`` signature per secret, separated by spaces, and a receiver that knows any one
of them accepts it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

PREFIX = "whsec_"
#: Key length of generated secrets (bytes); Standard Webhooks allows 24 to 64.
KEY_BYTES = 32


class BadSecret(ValueError):  # noqa: N818
    """A webhook secret is not ``whsec_`` followed by base64 of 24 to 64 bytes."""


def generate_secret() -> str:
    """A new random secret: ``whsec_`` and the base64 of 32 random bytes."""
    return PREFIX + base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def parse_secret(secret: str) -> bytes:
    """The key bytes of a ``whsec_<base64>`` secret (the prefix may be left out)."""
    text = secret.strip().removeprefix(PREFIX)
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadSecret("a webhook secret is whsec_ followed by base64") from e
    if not 24 <= len(key) <= 64:
        raise BadSecret(f"a webhook secret's key is 24 to 64 bytes, not {len(key)}")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """One signature: ``v1,`` and the base64 HMAC-SHA256 of ``id.timestamp.body``."""
    signed = f"{msg_id}.{int(timestamp)}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def headers(keys: list[bytes], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` headers of a
    POST of ``body`` at ``timestamp`` (unix seconds), signed with every key."""
    if not keys:
        raise ValueError("at least one key signs a webhook")
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": " ".join(sign(k, msg_id, timestamp, body) for k in keys),
    }


def verify(keys: list[bytes], header_values: dict[str, str], body: bytes) -> bool:
    """True when one of the signatures in ``header_values`` is that of one of ``keys``
    (what a receiver checks; the timestamp's age is the receiver's own policy)."""
    msg_id = header_values["webhook-id"]
    timestamp = int(header_values["webhook-timestamp"])
    offered = header_values["webhook-signature"].split()
    for key in keys:
        expected = sign(key, msg_id, timestamp, body)
        if any(hmac.compare_digest(expected, s) for s in offered):
            return True
    return False

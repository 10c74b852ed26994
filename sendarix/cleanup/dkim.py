"""DKIM signing (RFC 6376, RFC 8463) with OpenSSL through ``cryptography``.

dkimpy parses the message, canonicalizes (relaxed/relaxed) and picks the signed
header fields; the signature itself is made here with ``cryptography``, because
dkimpy's RSA is pure Python (~140 signatures/s, holding the GIL) where OpenSSL does
thousands.  An Ed25519 signature is made over the SHA-256 hash of the header data,
as RFC 8463 specifies.  Signing is pure: ``now`` is passed in.

Signed header fields: the RFC 6376 recommended set that is present in the message;
``From`` and the other single-instance fields present (Subject, Date, Message-ID,
To, Cc, Reply-To, ...) are over-signed (listed once more than they occur), so no
second instance can be added after signing without breaking the signature.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

import dkim
from attrs import field, frozen
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy

__all__ = ["SIGNED_HEADERS", "SigningKey", "dkim_signatures", "load_signing_key", "sign_message"]

#: Header fields signed when present (lowercase), in this order.
SIGNED_HEADERS: tuple[bytes, ...] = (
    b"from", b"sender", b"reply-to", b"subject", b"date", b"message-id", b"to", b"cc",
    b"mime-version", b"content-type", b"content-transfer-encoding", b"content-id",
    b"content-description", b"in-reply-to", b"references", b"list-id", b"list-help",
    b"list-unsubscribe", b"list-unsubscribe-post", b"list-subscribe", b"list-post",
    b"list-owner", b"list-archive", b"feedback-id",
)
#: Fields signed once more than they occur (an extra instance breaks the signature).
OVERSIGNED: frozenset[bytes] = frozenset({
    b"from", b"sender", b"reply-to", b"subject", b"date", b"message-id", b"to", b"cc",
    b"in-reply-to", b"references", b"list-unsubscribe", b"list-unsubscribe-post",
})

_CANON = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")


@frozen
class SigningKey:
    """One DKIM key ready to sign: ``d=domain``, ``s=selector``, key type ``rsa`` or
    ``ed25519`` and the loaded private key."""

    domain: str
    selector: str
    key_type: str
    private_key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = field(repr=False)

    @property
    def algorithm(self) -> bytes:
        return b"rsa-sha256" if self.key_type == "rsa" else b"ed25519-sha256"

    def sign_digest(self, digest: bytes) -> bytes:
        """The signature of a SHA-256 ``digest`` (the header hash)."""
        key = self.private_key
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        return key.sign(digest)


def load_signing_key(domain: str, selector: str, key_type: str, private_pem: bytes) -> SigningKey:
    """A :obj:`SigningKey` from a PKCS#8 PEM private key; ValueError if it is not of
    ``key_type``."""
    key = serialization.load_pem_private_key(private_pem, password=None)
    if key_type == "rsa" and isinstance(key, rsa.RSAPrivateKey):
        return SigningKey(domain, selector, key_type, key)
    if key_type == "ed25519" and isinstance(key, ed25519.Ed25519PrivateKey):
        return SigningKey(domain, selector, key_type, key)
    raise ValueError(f"the stored key for {selector}._domainkey.{domain} is not {key_type}")


def _include_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
    counts: dict[bytes, int] = {}
    for name, _ in headers:
        lower = name.lower()
        counts[lower] = counts.get(lower, 0) + 1
    include: list[bytes] = []
    for name in SIGNED_HEADERS:
        n = counts.get(name, 0)
        if name == b"from" or n:
            include.extend([name] * (n + (1 if name in OVERSIGNED else 0)))
    return include


def dkim_signatures(message: bytes, keys: Sequence[SigningKey], now: int) -> bytes:
    """The ``DKIM-Signature:`` fields (CRLF-terminated, folded) for ``message``, one
    per key, to be put on top of it.  ``now`` is the ``t=`` time."""
    if not keys:
        return b""
    headers, body = dkim.rfc822_parse(message)
    include = _include_headers(headers)
    body_hash = base64.b64encode(hashlib.sha256(_CANON.canonicalize_body(body)).digest())
    canonical = _CANON.canonicalize_headers(headers)
    out = []
    for key in keys:
        domain = key.domain.encode("ascii")
        fields = [
            (b"v", b"1"),
            (b"a", key.algorithm),
            (b"c", b"relaxed/relaxed"),
            (b"d", domain),
            (b"s", key.selector.encode("ascii")),
            (b"t", str(int(now)).encode("ascii")),
            (b"h", b":".join(include)),
            (b"bh", body_hash),
            (b"b", b""),
        ]
        unsigned = dkim.fold(
            b"; ".join(b"=".join(f) for f in fields), namelen=len(b"DKIM-Signature")
        )
        hasher = hashlib.sha256()
        dkim.hash_headers(
            hasher, _CANON, canonical, list(include), (b"DKIM-Signature", b" " + unsigned), {}
        )
        signature = base64.b64encode(key.sign_digest(hasher.digest()))
        # b= is last and empty in ``unsigned``: append the value, folded on its own.
        value = unsigned + _fold_b64(signature)
        out.append(b"DKIM-Signature: " + value + b"\r\n")
    return b"".join(out)


def _fold_b64(data: bytes, width: int = 72) -> bytes:
    """Base64 folded into continuation lines (white space in b= is ignored)."""
    lines = [data[i : i + width] for i in range(0, len(data), width)]
    return b"\r\n\t" + b"\r\n\t".join(lines)


def sign_message(message: bytes, keys: Sequence[SigningKey], now: int) -> bytes:
    """``message`` with one DKIM signature per key on top."""
    return dkim_signatures(message, keys, now) + message

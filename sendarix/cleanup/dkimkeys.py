"""DKIM keys and their DNS records (RFC 6376 section 3.6, RFC 8463).

Key pairs are generated with ``cryptography``: RSA 2048 (``k=rsa``, the public key
as a base64 SubjectPublicKeyInfo) and Ed25519 (``k=ed25519``, the raw 32-byte public
key in base64).  The TXT value is ``v=DKIM1; k=<type>; p=<key>``; an RSA value is
longer than one DNS character-string (255 bytes), so it is published as several
quoted strings that resolvers join back together.
"""

from __future__ import annotations

import base64
import re

from attrs import field, frozen
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

__all__ = [
    "ALGORITHMS",
    "KEY_TYPES",
    "KeyPair",
    "check_record",
    "dns_name",
    "generate_key",
    "record_line",
    "record_value",
    "split_txt",
]

#: ``--algorithm`` choices -> the key types they create ("dual" = one of each).
ALGORITHMS: dict[str, tuple[str, ...]] = {
    "rsa-2048": ("rsa",),
    "ed25519": ("ed25519",),
    "dual": ("rsa", "ed25519"),
}
#: Key type (the record's k= tag) -> the DKIM signature algorithm (a= tag).
KEY_TYPES = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}

_SELECTOR = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*")


def check_selector(selector: str) -> str:
    """``selector`` lowercased; ValueError unless it is one or more DNS labels."""
    s = selector.strip().lower()
    if not _SELECTOR.fullmatch(s) or len(s) > 200:
        raise ValueError(
            f"bad selector {selector!r}: letters, digits and '-', dot-separated labels"
        )
    return s


@frozen
class KeyPair:
    """A new key pair: PKCS#8 PEM private key and the record's ``p=`` value."""

    key_type: str
    private_pem: bytes = field(repr=False)
    public_b64: str


def generate_key(key_type: str) -> KeyPair:
    """A fresh ``"rsa"`` (2048-bit) or ``"ed25519"`` key pair."""
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if key_type == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    elif key_type == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
        public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    else:
        raise ValueError(f"unknown key type {key_type!r} (rsa or ed25519)")
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return KeyPair(key_type, pem, base64.b64encode(public).decode("ascii"))


def dns_name(selector: str, domain: str) -> str:
    """Where the key is published: ``<selector>._domainkey.<domain>``."""
    return f"{selector}._domainkey.{domain}"


def record_value(key_type: str, public_b64: str) -> str:
    """The TXT record value for a public key."""
    return f"v=DKIM1; k={key_type}; p={public_b64}"


def split_txt(value: str, limit: int = 255) -> list[str]:
    """``value`` cut into DNS character-strings of at most ``limit`` bytes."""
    data = value.encode("ascii")
    return [data[i : i + limit].decode("ascii") for i in range(0, len(data), limit)] or [""]


def record_line(selector: str, domain: str, key_type: str, public_b64: str) -> str:
    """``record: <selector>._domainkey.<domain> TXT "<value>"`` (quoted strings of at
    most 255 bytes, space-separated): the line ``domains add`` prints."""
    strings = " ".join(f'"{s}"' for s in split_txt(record_value(key_type, public_b64)))
    return f"record: {dns_name(selector, domain)} TXT {strings}"


def parse_tags(text: str) -> dict[str, str]:
    """A DKIM tag list (``a=b; c=d``) as a dict; white space inside values removed.
    ValueError for a malformed list or a repeated tag."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or not name:
            raise ValueError(f"malformed tag {part.strip()!r}")
        if name in tags:
            raise ValueError(f"tag {name!r} appears twice")
        tags[name] = re.sub(r"\s+", "", value)
    return tags


def check_record(published: list[str], key_type: str, public_b64: str) -> str | None:
    """Why the TXT records ``published`` at a key's name do not publish this key, or
    None when one of them does.  Each record is the joined text of its strings."""
    if not published:
        return "no TXT record is published there"
    reasons = []
    for text in published:
        try:
            tags = parse_tags(text)
        except ValueError as e:
            reasons.append(f"the record is malformed ({e})")
            continue
        if tags.get("v", "DKIM1") != "DKIM1":
            reasons.append(f"v={tags['v']} (expected DKIM1)")
        elif tags.get("k", "rsa") != key_type:
            reasons.append(f"k={tags.get('k', 'rsa')} (expected k={key_type})")
        elif not tags.get("p"):
            reasons.append("p= is empty (the key is revoked)")
        elif tags["p"] != public_b64:
            reasons.append("p= holds a different public key")
        else:
            return None
    if len(published) > 1:
        return f"{len(published)} TXT records, none matches: " + "; ".join(reasons)
    return reasons[0]

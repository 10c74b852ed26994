"""The reference every outgoing message carries, so that a report about it (an ARF
complaint, a late bounce) can be traced back to its queue id and tenant.

The reference is ``<queue id>.<tenant, base64url>.<MAC>``, in the header field
``X-Sendarix-Ref``; the MAC (HMAC-SHA256 with a key derived from the node secret,
truncated to 128 bits) makes it unforgeable: a report that names another message or
tenant is ignored.  The field is added before DKIM signing, and clients cannot set it
(cleanup removes every ``X-Sendarix-`` field they send).  Pure: no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from attrs import frozen

HEADER = "X-Sendarix-Ref"

#: The purpose the node secret's key for references is derived for.
KEY_PURPOSE = "sendarix message reference v1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@frozen
class Reference:
    """What a reference names."""

    queue_id: str
    tenant: str


def _mac(key: bytes, queue_id: str, tenant: str) -> bytes:
    data = queue_id.encode() + b"\x00" + tenant.encode()
    return hmac.new(key, data, hashlib.sha256).digest()[:16]


def make_reference(key: bytes, queue_id: str, tenant: str) -> str:
    """The reference of message ``queue_id`` of ``tenant``."""
    return f"{queue_id}.{_b64(tenant.encode())}.{_b64(_mac(key, queue_id, tenant))}"


def read_reference(key: bytes, text: str) -> Reference | None:
    """What ``text`` names, or None when it is not a reference made with ``key``."""
    parts = text.strip().rsplit(".", 2)  # the queue id may hold dots itself
    if len(parts) != 3 or not all(parts):
        return None
    queue_id, tenant_b64, mac_b64 = parts
    try:
        tenant = _unb64(tenant_b64).decode("utf-8")
        mac = _unb64(mac_b64)
    except (ValueError, UnicodeDecodeError):
        return None
    if not hmac.compare_digest(mac, _mac(key, queue_id, tenant)):
        return None
    return Reference(queue_id, tenant)


def header_line(key: bytes, queue_id: str, tenant: str) -> bytes:
    """The header field to prepend to the message (CR LF ended)."""
    return f"{HEADER}: {make_reference(key, queue_id, tenant)}\r\n".encode("ascii")


# -- VERP return paths ----------------------------------------------------------------


def verp_address(key: bytes, queue_id: str, domain: str) -> str:
    """The envelope sender for message ``queue_id`` at a tenant's return-path
    ``domain``: ``b-<queue id>-<MAC>@domain``, so a bounce sent to it names the message
    (and nobody can make one that names another)."""
    mac = hmac.new(key, b"verp\x00" + queue_id.encode(), hashlib.sha256).hexdigest()[:20]
    return f"b-{queue_id}-{mac}@{domain}"


def read_verp(key: bytes, address: str) -> str | None:
    """The queue id a VERP address made with ``key`` names, or None."""
    local = address.rpartition("@")[0]
    if not local.lower().startswith("b-") or "-" not in local[2:]:
        return None
    queue_id, _, mac = local[2:].rpartition("-")
    expected = hmac.new(key, b"verp\x00" + queue_id.encode(), hashlib.sha256).hexdigest()[:20]
    return queue_id if queue_id and hmac.compare_digest(mac.lower(), expected) else None

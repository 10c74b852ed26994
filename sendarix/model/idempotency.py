"""Idempotency keys: the first answer to a POST, kept so that a retry gets it again.

A client that sends ``Idempotency-Key`` and does not hear back (a timeout, a dropped
connection) sends the same request again with the same key; it must get the first
answer and nothing must be queued twice.  The same key with a different body is a
client error.  Records live 24 hours.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from attrs import frozen

#: How long a key and its answer are kept (seconds).
KEY_LIFETIME = 24 * 3600.0

#: The longest key accepted (the header is the client's, so it is bounded).
MAX_KEY_LENGTH = 255


@frozen
class IdempotencyRecord:
    """What is stored under one key: the request's fingerprint and, once the first
    request finished, its answer (``status`` None while it is still running)."""

    fingerprint: str
    created_at: float
    status: int | None = None
    body: str | None = None

    @property
    def finished(self) -> bool:
        return self.status is not None

    def to_json(self) -> str:
        return json.dumps({
            "v": 1, "fingerprint": self.fingerprint, "created_at": self.created_at,
            "status": self.status, "body": self.body,
        })  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> IdempotencyRecord:
        d: dict[str, Any] = json.loads(text)
        return cls(d["fingerprint"], float(d["created_at"]), d.get("status"), d.get("body"))


def fingerprint(method: str, path: str, body: bytes) -> str:
    """What makes two requests "the same": method, path and body bytes."""
    h = hashlib.sha256()
    for part in (method.encode(), path.encode(), body):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()

"""Paging through store listings, the same way in every backend: where a suppression
listing resumes, and the opaque cursors of delivery-log searches."""

from __future__ import annotations

import base64
import binascii


def page_start(
    tenant: str | None, after: str | tuple[str, str] | None
) -> tuple[str, str] | None:
    """Where a listing of ``tenant``'s entries (all tenants' when None) pages on from:
    ``after`` as a ``(tenant, lowercased address)`` pair, or None for the start.

    ``after`` is the last address seen (which needs ``tenant``: ValueError without
    it) or the last ``(tenant, address)`` pair.
    """
    if isinstance(after, str):
        if tenant is None:
            raise ValueError("an address as 'after' needs a tenant")
        after = (tenant, after)
    if after is None:
        return None
    return after[0], after[1].strip().lower()


def encode_cursor(seq: int) -> str:
    """An opaque cursor for "events older than ``seq``"."""
    return base64.urlsafe_b64encode(f"v1:{seq}".encode()).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The ``seq`` inside a cursor; ValueError when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        version, _, seq = raw.partition(":")
        if version != "v1" or not seq.isdigit():
            raise ValueError(cursor)
        return int(seq)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError(f"bad cursor {cursor!r}") from None

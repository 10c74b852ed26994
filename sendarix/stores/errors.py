"""Errors every ISpool backend raises the same way, so callers need not know which one runs."""

from __future__ import annotations


class SpoolError(Exception):
    """Base class of the spool's own errors."""


class DuplicateQueueId(SpoolError):  # noqa: N818 - reads as what happened
    """``enqueue`` was given a queue id that is already spooled; nothing was stored."""


class LeaseLost(SpoolError):  # noqa: N818 - the name the spool contract uses
    """The node no longer holds the lease on this delivery (expired and taken over,
    released, reclaimed, or the message was deleted)."""

"""Errors every store backend raises the same way, so callers need not know which one runs."""

from __future__ import annotations


class SpoolError(Exception):
    """Base class of the spool's own errors."""


class DuplicateQueueId(SpoolError):  # noqa: N818 - reads as what happened
    """``enqueue`` was given a queue id that is already spooled; nothing was stored."""


class LeaseLost(SpoolError):  # noqa: N818 - the name the spool contract uses
    """The node no longer holds the lease on this delivery (expired and taken over,
    released, reclaimed, or the message was deleted)."""


class StoreUnavailable(Exception):  # noqa: N818 - reads as the state of the store
    """The backend cannot be reached right now (Redis down, the database file locked or
    gone); the operation did nothing and may be tried again later.

    Every backend raises this one type, so that protocol code, the delivery agent and
    the command line can answer an outage without knowing which backend runs.
    """

"""Content-filter values: what a filter is told about a message (:class:`FilterContext`)
and what it decides (:class:`FilterVerdict`: accept, accept with headers added or a new
Subject, or refuse with a reply)."""

from __future__ import annotations

from attrs import frozen

from sendarix.model.message import Envelope, Reply


@frozen
class FilterContext:
    """The envelope and the session facts a content filter judges a message by."""

    queue_id: str
    envelope: Envelope
    tenant: str
    client_ip: str = ""
    helo: str = ""
    #: The credential's name for an authenticated client (its mail is outbound).
    user: str | None = None
    listener: str = ""


@frozen
class FilterVerdict:
    """One filter's decision.

    ``action`` is the filter's own word for it (rspamd's ``"no action"``,
    ``"add header"``, ``"reject"``...; ``"error"`` when the filter could not answer),
    counted in ``sendarix_filter_decisions_total``.  ``reply`` refuses the message;
    otherwise ``headers`` are added and ``subject`` (when set) replaces the Subject.
    """

    action: str
    reply: Reply | None = None
    headers: tuple[tuple[str, str], ...] = ()
    subject: str | None = None

    @property
    def refused(self) -> bool:
        """True when the message is refused with :attr:`reply`."""
        return self.reply is not None


#: The verdict of a filter with nothing to say.
ACCEPT = FilterVerdict("accept")

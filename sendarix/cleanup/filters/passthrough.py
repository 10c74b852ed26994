"""The ``pass`` content filter: accepts every message (the filter of a chain that
should do nothing, e.g. a tenant exempt from the node's default chain)."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from sendarix.interfaces import IContentFilter
from sendarix.model.filtering import FilterContext, FilterVerdict


@implementer(IContentFilter)
class PassFilter:
    """Accepts everything, at once."""

    name = "pass"

    def check(self, context: FilterContext, body: bytes) -> Deferred[FilterVerdict]:
        """Accept."""
        return succeed(FilterVerdict("accept"))

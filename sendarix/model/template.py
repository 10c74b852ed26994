"""A message template: named, versioned, per tenant (subject, text and HTML parts).

Saving a template under a name that exists makes a new version; a send names the
template (its newest version, or one given) and the variables to render it with.
"""

from __future__ import annotations

import json
import re
from typing import Any

from attrs import frozen

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

#: The largest part (subject, text or HTML) a template may have, in characters.
MAX_PART = 512 * 1024


@frozen
class Template:
    """One version of a tenant's template."""

    tenant: str
    name: str
    version: int
    subject: str | None
    text: str | None
    html: str | None
    created_at: float

    def to_json(self) -> str:
        return json.dumps({
            "v": 1, "tenant": self.tenant, "name": self.name, "version": self.version,
            "subject": self.subject, "text": self.text, "html": self.html,
            "created_at": self.created_at,
        })  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> Template:
        d: dict[str, Any] = json.loads(text)
        return cls(d["tenant"], d["name"], int(d["version"]), d.get("subject"), d.get("text"),
                   d.get("html"), float(d["created_at"]))

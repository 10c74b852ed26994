"""HTML with escaping by default: :class:`Html` marks text that is already markup,
and :func:`html` fills a :class:`string.Template` escaping every value that is not.

Everything that reaches a page from a store, a request or a configuration goes
through :func:`escape`; only this module's output and the package's own templates are
trusted as markup.
"""

from __future__ import annotations

import html as _html
import os
from collections.abc import Iterable
from functools import cache
from string import Template
from typing import Any

TEMPLATE_DIR = os.path.join(os.path.dirname(__file__), "templates")


class Html(str):
    """A string that is markup already (never escaped again)."""

    __slots__ = ()


def escape(value: Any) -> Html:
    """``value`` as markup: :class:`Html` unchanged, None as empty, anything else as
    escaped text (quotes too, so it is safe in attributes)."""
    if isinstance(value, Html):
        return value
    if value is None:
        return Html("")
    return Html(_html.escape(str(value), quote=True))


def html(template: str, **values: Any) -> Html:
    """``template`` (``$name`` placeholders) with each value escaped."""
    return Html(Template(template).substitute({k: escape(v) for k, v in values.items()}))


def join(parts: Iterable[Any], sep: str = "") -> Html:
    """Markup of each part (escaped unless markup), joined by ``sep`` (markup)."""
    return Html(sep.join(escape(p) for p in parts))


@cache
def _template(name: str) -> Template:
    with open(os.path.join(TEMPLATE_DIR, name), encoding="utf-8") as f:
        return Template(f.read())


def load_templates() -> None:
    """Read every template now (at start), so no page waits for the disk."""
    for name in sorted(os.listdir(TEMPLATE_DIR)):
        if name.endswith(".html"):
            _template(name)


def render(name: str, **values: Any) -> Html:
    """The package template ``name`` (from ``templates/``) with each value escaped."""
    return Html(_template(name).substitute({k: escape(v) for k, v in values.items()}))


def table(headers: Iterable[str], rows: Iterable[Iterable[Any]], empty: str = "none") -> Html:
    """A table: every cell escaped unless it is :class:`Html`; ``empty`` in place of
    a table without rows."""
    body = [Html("<tr>" + join(html("<td>$c</td>", c=c) for c in row) + "</tr>")
            for row in rows]
    if not body:
        return html('<p class="empty">$e</p>', e=empty)
    head = join(html("<th>$h</th>", h=h) for h in headers)
    return Html(f"<table><thead><tr>{head}</tr></thead><tbody>{join(body)}</tbody></table>")

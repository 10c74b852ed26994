"""Parsing of SMTP replies into :class:`~sendarix.model.message.Reply` values.

A reply as the egress client sees it is a three-digit code and one or more text lines,
each of which may start with an RFC 3463 enhanced status code ("5.1.1").  Big providers
repeat both the code and the enhanced code on every line of a multi-line reply::

    550-5.1.1 The email account that you tried to reach does not exist. Please try
    550-5.1.1 double-checking the recipient's email address for typos or
    550 5.1.1 unnecessary spaces.

which becomes ``Reply(550, "5.1.1", "The email account ... unnecessary spaces.")``: the
enhanced code once, and the text of all lines joined by single spaces, so events and the
bounce rule table see one clean sentence.
"""

from __future__ import annotations

import re
from functools import lru_cache

from sendarix.model.message import Reply

__all__ = ["ENHANCED_CODE", "parse_reply", "parse_reply_lines"]

#: An RFC 3463 enhanced status code: class (2, 4 or 5), subject and detail (1-3 digits).
ENHANCED_CODE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")

# An enhanced code at the start of a line, followed by whitespace or the end of the line.
# Some Exchange versions write it as "#5.1.0"; the "#" is dropped with the code.
_LEADING_ENHANCED = re.compile(r"#?([245]\.\d{1,3}\.\d{1,3})(?=\s|$)")

# The reply code and separator at the start of a raw reply line ("250-", "550 ", "250").
_LINE_CODE = re.compile(r"(\d{3})(?:[ -]|$)")


def _decode(text: str | bytes) -> str:
    # Replies are ASCII, or UTF-8 after SMTPUTF8; never fail on a broken server's bytes.
    if isinstance(text, bytes):
        return text.decode("utf-8", errors="replace")
    return text


def _strip_code(line: str, code: str) -> str:
    """``line`` without a leading ``"<code>-"`` / ``"<code> "`` of this very reply."""
    m = _LINE_CODE.match(line)
    if m and m.group(1) == code:
        return line[m.end() :]
    return line


def parse_reply(code: int, text: str | bytes) -> Reply:
    """The :class:`Reply` for ``code`` and its text (one or several lines).

    Lines may still carry the reply code (``"550-5.1.1 ..."``) or not (Twisted's client
    strips it).  The enhanced code is taken from the start of the first line when its
    class digit matches the reply code's first digit; the same enhanced code is then
    also removed from later lines.  A mismatching one ("250 5.1.1") is left in the text.
    """
    code_text = f"{code:03d}"
    lines = [_strip_code(line.strip(), code_text).strip() for line in _decode(text).splitlines()]
    lines = [line for line in lines if line]
    enhanced: str | None = None
    if lines:
        m = _LEADING_ENHANCED.match(lines[0])
        if m and m.group(1)[0] == code_text[0]:
            enhanced = m.group(1)
            cleaned = []
            for line in lines:
                m = _LEADING_ENHANCED.match(line)
                if m and m.group(1) == enhanced:
                    line = line[m.end() :].strip()
                if line:
                    cleaned.append(line)
            lines = cleaned
    return Reply(code=code, enhanced=enhanced, text=" ".join(lines))


def parse_reply_lines(lines: list[bytes]) -> Reply:
    """The :class:`Reply` made of raw reply lines such as ``[b"250-a", b"250 b"]``.

    The code is the one on the last line (the line that ends the reply); a line
    ending (CRLF) may be present.  Raises ValueError when there is no line or the
    last line does not start with a three-digit code.
    """
    return _parse_lines(tuple(lines))


# Servers repeat the same replies ("250 2.0.0 Ok", their EHLO list, "354 ...") on
# every session: parsing each distinct reply once saves the regular expressions on
# most replies.  Reply values are immutable, so a cached one can be handed out again.
@lru_cache(maxsize=512)
def _parse_lines(lines: tuple[bytes, ...]) -> Reply:
    if not lines:
        raise ValueError("an SMTP reply has at least one line")
    last = _decode(lines[-1]).strip()
    m = _LINE_CODE.match(last)
    if m is None:
        raise ValueError(f"not an SMTP reply line: {last[:80]!r}")
    code = int(m.group(1))
    text = "\n".join(_decode(line).strip() for line in lines)
    return parse_reply(code, text)

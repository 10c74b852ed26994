"""The sink's faults: the ``--fault SPEC`` strings parsed into values."""

from __future__ import annotations

import enum
import fnmatch
import re

from attrs import frozen

from sendarix.model.message import Reply


class FaultSpecError(ValueError):
    """A ``--fault`` specification could not be parsed; the message says why."""


class FaultKind(enum.Enum):
    """The kinds of fault the sink can inject."""

    REFUSE = "refuse"
    CONNECT = "connect"
    RCPT = "rcpt"
    FIRST = "first"
    DATA = "data"
    STALL = "stall"
    STALL_DATA = "stall-data"
    DROP_AFTER_EHLO = "drop-after-ehlo"


@frozen
class Fault:
    """One parsed fault.

    ``reply`` is set for the kinds that answer (connect, rcpt, first, data);
    ``pattern`` for rcpt; ``count`` for first; ``seconds`` for the stalls (None: for ever).
    """

    kind: FaultKind
    reply: Reply | None = None
    pattern: str | None = None
    count: int | None = None
    seconds: float | None = None

    def matches(self, address: str) -> bool:
        """True when the rcpt fault's glob matches ``address`` (case-insensitive)."""
        return self.pattern is not None and fnmatch.fnmatchcase(
            address.lower(), self.pattern.lower()
        )


_SYNTAX = (
    "refuse | connect:CODE[:ENH][:TEXT] | rcpt:CODE[:ENH]:PATTERN[:TEXT] | "
    "first:N:CODE[:ENH][:TEXT] | data:CODE[:ENH][:TEXT] | stall[:SECONDS] | "
    "stall-data[:SECONDS] | drop-after-ehlo"
)
_CODE_RE = re.compile(r"^[45]\d\d$")
_ENH_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")

# Default enhanced status code per fault kind and reply class (4 or 5).
_DEFAULT_ENHANCED: dict[tuple[FaultKind, int], str] = {
    (FaultKind.CONNECT, 4): "4.3.2",
    (FaultKind.CONNECT, 5): "5.3.2",
    (FaultKind.RCPT, 4): "4.2.0",
    (FaultKind.RCPT, 5): "5.1.1",
    (FaultKind.FIRST, 4): "4.2.0",
    (FaultKind.FIRST, 5): "5.7.1",
    (FaultKind.DATA, 4): "4.3.0",
    (FaultKind.DATA, 5): "5.7.1",
}
_DEFAULT_TEXT: dict[tuple[FaultKind, int], str] = {
    (FaultKind.CONNECT, 4): "Service not available, closing transmission channel",
    (FaultKind.CONNECT, 5): "No SMTP service here",
    (FaultKind.RCPT, 4): "Mailbox temporarily unavailable",
    (FaultKind.RCPT, 5): "No such user here",
    (FaultKind.FIRST, 4): "Temporarily deferred, try again later",
    (FaultKind.FIRST, 5): "Transaction refused",
    (FaultKind.DATA, 4): "Temporary failure, try again later",
    (FaultKind.DATA, 5): "Message rejected",
}
_GREYLIST_TEXT = "Greylisted, try again in 60 seconds"


def _bad(spec: str, why: str) -> FaultSpecError:
    return FaultSpecError(f"bad fault {spec!r}: {why}; expected one of: {_SYNTAX}")


def _parse_reply(spec: str, kind: FaultKind, fields: list[str]) -> tuple[Reply, list[str]]:
    """Take ``CODE[:ENH]`` off the front of ``fields``; return the reply and the rest.

    The reply text is filled in with the default; callers replace it when given.
    """
    if not fields or not fields[0]:
        raise _bad(spec, "a reply code is required")
    code_s, rest = fields[0], fields[1:]
    if not _CODE_RE.match(code_s):
        raise _bad(spec, f"reply code {code_s!r} is not a 4xx or 5xx code")
    code = int(code_s)
    klass = code // 100
    enhanced = _DEFAULT_ENHANCED[(kind, klass)]
    if rest and _ENH_RE.match(rest[0]):
        enhanced, rest = rest[0], rest[1:]
        if int(enhanced[0]) != klass:
            raise _bad(spec, f"enhanced code {enhanced} does not match reply code {code}")
    text = _DEFAULT_TEXT[(kind, klass)]
    if kind is FaultKind.FIRST and code in (450, 451):
        text = _GREYLIST_TEXT
    return Reply(code=code, enhanced=enhanced, text=text), rest


def _with_text(reply: Reply, rest: list[str]) -> Reply:
    """Use the remaining fields (colons kept) as the reply text, when there are any."""
    text = ":".join(rest).strip()
    return Reply(reply.code, reply.enhanced, text) if text else reply


def _parse_seconds(spec: str, fields: list[str]) -> float | None:
    if not fields:
        return None
    if len(fields) > 1:
        raise _bad(spec, "takes at most one field, SECONDS")
    try:
        seconds = float(fields[0])
    except ValueError:
        raise _bad(spec, f"SECONDS {fields[0]!r} is not a number") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise _bad(spec, "SECONDS must be a finite number >= 0")
    return seconds


def parse_fault(spec: str) -> Fault:
    """Parse one ``--fault`` specification (see the module docstring).

    Raises :class:`FaultSpecError`, whose message names the spec and the syntax.
    """
    text = spec.strip()
    head, sep, tail = text.partition(":")
    fields = tail.split(":") if sep else []
    try:
        kind = FaultKind(head.strip().lower())
    except ValueError:
        raise _bad(spec, f"unknown fault kind {head!r}") from None

    if kind in (FaultKind.REFUSE, FaultKind.DROP_AFTER_EHLO):
        if sep:
            raise _bad(spec, f"{kind.value} takes no fields")
        return Fault(kind)
    if kind in (FaultKind.STALL, FaultKind.STALL_DATA):
        return Fault(kind, seconds=_parse_seconds(spec, fields))
    if kind is FaultKind.FIRST:
        if not fields:
            raise _bad(spec, "first needs N and a reply code")
        try:
            count = int(fields[0])
        except ValueError:
            raise _bad(spec, f"N {fields[0]!r} is not an integer") from None
        if count < 1:
            raise _bad(spec, "N must be at least 1")
        reply, rest = _parse_reply(spec, kind, fields[1:])
        return Fault(kind, reply=_with_text(reply, rest), count=count)
    reply, rest = _parse_reply(spec, kind, fields)
    if kind is FaultKind.RCPT:
        if not rest or not rest[0].strip():
            raise _bad(spec, "rcpt needs a PATTERN (a glob such as bad*@*)")
        pattern, rest = rest[0].strip(), rest[1:]
        return Fault(kind, reply=_with_text(reply, rest), pattern=pattern)
    return Fault(kind, reply=_with_text(reply, rest))



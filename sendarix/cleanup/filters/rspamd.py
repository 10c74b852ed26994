"""The rspamd content filter: each message is POSTed to rspamd's ``/checkv2`` with the
envelope and the session facts as request headers, and rspamd's action becomes a
:class:`~sendarix.model.filtering.FilterVerdict` (docs/filtering.md).

The request is asynchronous (treq) and bounded by ``timeout`` as a whole, so a slow
rspamd delays only the transaction that waits for it; when rspamd cannot answer,
``on_error`` decides: ``"accept"`` the message or ``"defer"`` it with a 451.
"""

from __future__ import annotations

import json
import re
from typing import Any

import treq
import treq.client
from attrs import define, field
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from zope.interface import implementer

from sendarix.interfaces import IContentFilter
from sendarix.model.filtering import FilterContext, FilterVerdict
from sendarix.model.message import Reply

log = Logger()

#: The longest answer read from rspamd (its JSON is a few kilobytes).
MAX_ANSWER = 1024 * 1024
#: ``on_error`` values.
ON_ERROR = ("accept", "defer")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_HEADER_NAME = re.compile(r"[!-9;-~]+")


class _NoAnswerError(Exception):
    """rspamd gave no usable answer."""


def _text(value: Any, limit: int = 400) -> str:
    """``value`` as one line of safe header or reply text."""
    return _CONTROL.sub(" ", str(value)).strip()[:limit]


def milter_headers(answer: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The headers rspamd's ``milter.add_headers`` asks for, as ``(name, value)``
    pairs (a value may be a string, ``{"value": ...}`` or a list of either)."""
    milter = answer.get("milter")
    add = milter.get("add_headers") if isinstance(milter, dict) else None
    if not isinstance(add, dict):
        return ()
    out: list[tuple[str, str]] = []
    for name, spec in add.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            continue
        for item in spec if isinstance(spec, list) else [spec]:
            value = item.get("value") if isinstance(item, dict) else item
            if isinstance(value, str):
                out.append((name, _text(value, 998 - len(name))))
    return tuple(out)


def verdict_of(answer: dict[str, Any], context: FilterContext) -> FilterVerdict:
    """What rspamd's ``/checkv2`` answer means for the message (pure)."""
    action = answer.get("action")
    if not isinstance(action, str):
        raise _NoAnswerError("no action in the answer")
    messages = answer.get("messages")
    said = messages.get("smtp_message") if isinstance(messages, dict) else None
    said = _text(said) if isinstance(said, str) and said.strip() else None
    if action == "reject":
        return FilterVerdict(action, Reply(550, "5.7.1", said or "Message rejected as spam"))
    if action == "soft reject":
        return FilterVerdict(action, Reply(451, "4.7.1", said or "Try again later"))
    if action == "greylist" and context.user is None:
        return FilterVerdict(action, Reply(451, "4.7.1", said or "Greylisted, try again later"))
    # An authenticated sender's mail is not greylisted: it would only come back to us.
    headers = milter_headers(answer)
    subject = None
    if action == "add header" and not any(n.lower() == "x-spam" for n, _ in headers):
        headers = (("X-Spam", "Yes"), *headers)
    elif action == "rewrite subject":
        new = answer.get("subject")
        subject = _text(new, 900) if isinstance(new, str) and new.strip() else None
    return FilterVerdict(action, headers=headers, subject=subject)


def request_headers(context: FilterContext) -> Headers:
    """The envelope and session facts in rspamd's request headers."""
    env = context.envelope
    raw: dict[str, list[str]] = {
        "From": [env.sender or "<>"],
        "Rcpt": list(env.recipients),
        "Queue-Id": [context.queue_id],
    }
    if context.client_ip:
        raw["IP"] = [context.client_ip]
    if context.helo:
        raw["Helo"] = [context.helo]
    if context.user is not None:
        # rspamd judges authenticated mail as outbound (no greylisting, no SPF of
        # the client, DKIM signing checks).
        raw["User"] = [context.user]
    return Headers({k: [_text(v, 998) for v in vs] for k, vs in raw.items()})


@implementer(IContentFilter)
@define
class RspamdFilter:
    """An rspamd client: one ``/checkv2`` request per message."""

    url: str
    reactor: Any
    timeout: float = 10.0
    on_error: str = "accept"
    #: Connections are not kept: loopback connects are cheap, and nothing lingers at stop.
    _pool: HTTPConnectionPool = field(init=False)
    name: str = field(init=False, default="rspamd")

    def __attrs_post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, not {self.on_error!r}")
        self._pool = HTTPConnectionPool(self.reactor, persistent=False)

    @property
    def check_url(self) -> str:
        """The ``/checkv2`` URL under ``url``."""
        return self.url.rstrip("/") + "/checkv2"

    def check(self, context: FilterContext, body: bytes) -> Deferred[FilterVerdict]:
        """Ask rspamd; on no answer within ``timeout``, decide by ``on_error``."""
        d = ensureDeferred(self._ask(context, body))
        clock: IReactorTime = self.reactor
        d.addTimeout(self.timeout, clock)
        return d.addErrback(self._unanswered, context)

    async def _ask(self, context: FilterContext, body: bytes) -> FilterVerdict:
        client = treq.client.HTTPClient(Agent(self.reactor, pool=self._pool))
        response = await client.post(
            self.check_url, data=body, headers=request_headers(context),
            allow_redirects=False, reactor=self.reactor,
        )
        seen: list[bytes] = []
        size = 0

        def chunk(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > MAX_ANSWER:
                raise _NoAnswerError("answer too long")
            seen.append(data)

        await treq.collect(response, chunk)
        if response.code != 200:
            raise _NoAnswerError(f"HTTP {response.code}: {_text(b''.join(seen)[:200])}")
        try:
            answer = json.loads(b"".join(seen))
        except ValueError as e:
            raise _NoAnswerError(f"not JSON: {e}") from None
        if not isinstance(answer, dict):
            raise _NoAnswerError("not a JSON object")
        return verdict_of(answer, context)

    def _unanswered(self, failure: Any, context: FilterContext) -> FilterVerdict:
        log.warn(
            "rspamd at {url} did not judge {queue_id} ({why}); on_error = {on_error}",
            url=self.check_url, queue_id=context.queue_id, why=failure.getErrorMessage()
            or failure.type.__name__, on_error=self.on_error,
        )
        if self.on_error == "defer":
            return FilterVerdict(
                "error", Reply(451, "4.3.0", "Content check unavailable, try again later")
            )
        return FilterVerdict("error")

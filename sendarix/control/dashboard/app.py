"""The dashboard's routes (Klein): the login, the pages and the operator's actions.

Every page needs a session: a random id the browser holds in a cookie (``HttpOnly``,
``SameSite=Strict``, ``Secure`` over TLS), kept in the stores
(:class:`~sendarix.interfaces.IDashboardSessions`) so that whichever worker or node
answers the next request knows it.  The credential behind it is read again on each
request, so revoking or rotating the key ends the session at once; a session the
stores cannot be asked about is a ``503`` page, never a login.  Every POST
must carry the session's token and, when the browser names an ``Origin``, come from
this site; anything else is ``403``.  Pages are read from the same stores, with the
same tenant rules, as the ``/v1`` API; nothing blocks the reactor (the stores answer
with Deferreds, the key check runs in a thread).
"""

from __future__ import annotations

import mimetypes
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from attrs import define, field, frozen
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from werkzeug.exceptions import MethodNotAllowed, NotFound

from sendarix.control.api.auth import ApiKeys
from sendarix.control.api.errors import ApiError
from sendarix.control.api.status import message_status
from sendarix.control.dashboard import pages
from sendarix.control.dashboard.figures import (
    DAY,
    HOUR,
    provider_rates,
    queue_ages,
    series,
)
from sendarix.control.dashboard.markup import Html, html, load_templates, render
from sendarix.interfaces import (
    ICredentialStore,
    IDashboardSessions,
    IDestinationControl,
    IEventLog,
    ISpool,
    ISuppressionStore,
)
from sendarix.model.dashboard import Session, SessionRules, new_token, same_token
from sendarix.model.event import EVENT_TYPES, MAX_LIMIT, Event, EventQuery
from sendarix.model.message import RecipientStatus, StoredMessage
from sendarix.stores.errors import StoreUnavailable

log = Logger()

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")

#: The session cookie's name.
COOKIE = "sendarix_session"
#: The cookie of the login form's token (before there is a session).
LOGIN_COOKIE = "sendarix_login"

#: The first path segments the dashboard answers (everything else is the API's).
SEGMENTS: frozenset[str] = frozenset({
    "", "login", "logout", "events", "messages", "suppressions", "sites", "static",
})  # fmt: skip
#: The most events the charts read (the newest first).
CHART_EVENTS = 10 * MAX_LIMIT
#: Queued messages read for the age of the queue per domain (the oldest first).
AGE_SAMPLE = 500
#: Events on the overview and on one page of a search.
RECENT_EVENTS = 20
PAGE_EVENTS = 50
#: A destination (site) name the suspend form accepts.
SITE_PATTERN = re.compile(r"[A-Za-z0-9:._@/-]{1,255}")

#: Sent with every dashboard answer.
SECURITY_HEADERS: dict[bytes, bytes] = {
    b"content-security-policy": (
        b"default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        b"frame-ancestors 'none'; base-uri 'none'"
    ),
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"same-origin",
    b"cache-control": b"no-store",
}


@frozen
class Redirect:
    """Answer ``303 See Other`` to ``location`` (a path of this site)."""

    location: str


class PageError(Exception):
    """An answer other than the page: ``status`` and a message for people."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.message = message


def forbidden(message: str) -> PageError:
    return PageError(403, "Forbidden", message)


def not_found(message: str) -> PageError:
    return PageError(404, "Not found", message)


#: A page: (request, session, **path parameters) -> (title, body) or a redirect.
Handler = Callable[..., Awaitable["tuple[str, Html] | Redirect"]]


def _arg(request: Any, name: str) -> str | None:
    """A query or form field (the first when repeated), None when absent or not UTF-8."""
    values = request.args.get(name.encode())
    if not values:
        return None
    try:
        text = values[0].decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return text or None


def _load_static() -> dict[str, tuple[bytes, bytes]]:
    """The static files by name with their content type (read once, at start)."""
    out: dict[str, tuple[bytes, bytes]] = {}
    for name in sorted(os.listdir(STATIC_DIR)):
        path = os.path.join(STATIC_DIR, name)
        if os.path.isfile(path) and not name.startswith("."):
            with open(path, "rb") as f:
                ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
                if ctype.startswith("text/"):
                    ctype += "; charset=utf-8"
                out[name] = (f.read(), ctype.encode())
    return out


@define
class Dashboard:
    """The dashboard's routes over the node's stores; ``resource()`` mounts them.

    ``sessions`` keeps the logins (the node's stores); ``rules`` makes new ones.
    ``delivery`` is the node's delivery agent (None: no destination figures or
    suspensions, as in a process that does not deliver).
    """

    keys: ApiKeys
    credentials: ICredentialStore
    spool: ISpool
    eventlog: IEventLog
    suppressions: ISuppressionStore
    clock: Any
    sessions: IDashboardSessions
    delivery: IDestinationControl | None = None
    rules: SessionRules = field(factory=SessionRules)
    app: Klein = field(factory=Klein, init=False)
    _static: dict[str, tuple[bytes, bytes]] = field(factory=_load_static, init=False)

    def __attrs_post_init__(self) -> None:
        load_templates()
        route = self.app.route
        route("/login", methods=["GET"])(self._plain(self.login_form))
        route("/login", methods=["POST"])(self._plain(self.login))
        route("/logout", methods=["POST"])(self._wrap(self.logout, post=True))
        route("/", methods=["GET"])(self._wrap(self.overview))
        route("/events", methods=["GET"])(self._wrap(self.events))
        route("/messages/<string:queue_id>", methods=["GET"])(self._wrap(self.message))
        route("/messages/<string:queue_id>/retry", methods=["POST"])(
            self._wrap(self.retry, post=True)
        )
        route("/messages/<string:queue_id>/delete", methods=["POST"])(
            self._wrap(self.delete, post=True)
        )
        route("/suppressions", methods=["GET"])(self._wrap(self.suppression_list))
        route("/suppressions/remove", methods=["POST"])(
            self._wrap(self.remove_suppression, post=True)
        )
        route("/sites/suspend", methods=["POST"])(self._wrap(self.suspend, post=True))
        route("/sites/resume", methods=["POST"])(self._wrap(self.resume, post=True))
        route("/static/<string:name>", methods=["GET"])(self.static)
        self.app.handle_errors(NotFound)(self._not_found)
        self.app.handle_errors(MethodNotAllowed)(self._not_allowed)

    def resource(self) -> Any:
        return self.app.resource()

    # -- plumbing ----------------------------------------------------------------

    def _wrap(self, handler: Handler, post: bool = False) -> Callable[..., Deferred[bytes]]:
        def route(request: Any, **params: Any) -> Deferred[bytes]:
            return Deferred.fromCoroutine(self._serve(handler, request, params, post))

        route.__name__ = f"page_{handler.__name__}"
        return route

    def _plain(self, handler: Callable[[Any], Awaitable[bytes]]) -> Callable[..., Deferred[bytes]]:
        def route(request: Any) -> Deferred[bytes]:
            return Deferred.fromCoroutine(self._serve_plain(handler, request))

        route.__name__ = f"page_{handler.__name__}"
        return route

    async def _serve_plain(self, handler: Callable[[Any], Awaitable[bytes]], request: Any) -> bytes:
        return await self._answered(request, handler(request))

    async def _answered(self, request: Any, page: Awaitable[bytes]) -> bytes:
        """``page``'s bytes, or the error page that says what went wrong."""
        _secure_headers(request)
        try:
            return await page
        except PageError as e:
            return _error(request, e)
        except StoreUnavailable:
            return _error(request, _unavailable())
        except Exception:
            log.failure("dashboard request {path} failed", path=request.path)
            return _error(request, PageError(500, "Internal error", "Something went wrong."))

    async def _serve(
        self, handler: Handler, request: Any, params: dict[str, Any], post: bool
    ) -> bytes:
        return await self._answered(request, self._page(handler, request, params, post))

    async def _page(
        self, handler: Handler, request: Any, params: dict[str, Any], post: bool
    ) -> bytes:
        session = await self._session(request)
        if session is None:
            if post:
                raise forbidden("Your session has ended: log in again.")
            return _redirect(request, "/login")
        if post:
            self._check_post(request, session)
        result = await handler(request, session, **params)
        if isinstance(result, Redirect):
            return _redirect(request, result.location)
        title, body = result
        return await self._layout(session, title, body)

    async def _session(self, request: Any) -> Session | None:
        """The request's live session whose credential still holds, else None (and a
        session whose key was revoked or rotated is ended)."""
        raw = request.getCookie(COOKIE.encode())
        if not raw:
            return None
        session = await self._stored(self.sessions.get(raw.decode("latin-1"),
                                                       self.clock.seconds()))
        if session is None:
            return None
        credential = await self.credentials.get(session.credential)
        if (credential is None or not credential.active
                or credential.secret_hash != session.secret_hash
                or not credential.has_scope("admin")):
            await self._stored(self.sessions.end(session.id))
            return None
        return session

    async def _stored(self, answer: Awaitable[Any]) -> Any:
        """What the session store answers; a failure is the ``503`` page (whatever
        the store raised), so no request goes on without knowing its session."""
        try:
            return await answer
        except StoreUnavailable as e:  # expected while Redis is down: no traceback
            log.warn("dashboard sessions: the stores do not answer ({why})", why=e)
            raise _unavailable() from None
        except Exception:
            log.failure("the dashboard's session store failed")
            raise _unavailable() from None

    async def _flash(self, session: Session, message: str) -> None:
        """Keep ``message`` for the session's next page.  The action it reports is
        done already: a store that fails now costs the message, not the redirect."""
        try:
            await self.sessions.set_flash(session.id, message)
        except StoreUnavailable as e:
            log.warn("dashboard sessions: the stores do not answer ({why})", why=e)
        except Exception:
            log.failure("could not keep the dashboard's message for the next page")

    def _check_post(self, request: Any, session: Session) -> None:
        """403 unless the form carries the session's token and any ``Origin`` the
        browser names is this site."""
        _same_origin(request)
        if not same_token(_arg(request, "csrf"), session.csrf):
            raise forbidden("The form is out of date or did not come from this dashboard.")

    async def _layout(self, session: Session, title: str, body: Html) -> bytes:
        who = "operator" if session.operator else f"tenant {session.tenant}"
        # Taken (read and cleared at once) only when there is one: most pages cost
        # no second round trip.
        flash = None
        if session.flash is not None:
            flash = await self._stored(self.sessions.take_flash(session.id))
        page = render(
            "layout.html", title=title, body=body, csrf=session.csrf,
            who=f"{session.credential} ({who})", flash=pages.flash(flash),
        )
        return page.encode("utf-8")

    def _not_found(self, request: Any, failure: Any) -> bytes:
        _secure_headers(request)
        return _error(request, not_found("No such page."))

    def _not_allowed(self, request: Any, failure: Any) -> bytes:
        _secure_headers(request)
        return _error(request, PageError(405, "Not allowed", "Not allowed on this page."))

    def static(self, request: Any, name: str) -> bytes:
        _secure_headers(request)
        found = self._static.get(name)
        if found is None:
            return _error(request, not_found("No such file."))
        body, ctype = found
        request.setHeader(b"content-type", ctype)
        request.setHeader(b"cache-control", b"max-age=3600")
        return body

    # -- login -------------------------------------------------------------------

    async def login_form(self, request: Any, problem: str | None = None) -> bytes:
        if problem is None and await self._session(request) is not None:
            return _redirect(request, "/")
        token = new_token()
        request.addCookie(
            LOGIN_COOKIE.encode(), token.encode(), path=b"/login", httpOnly=True,
            secure=request.isSecure(), sameSite="strict", max_age=b"3600",
        )
        shown = Html("") if problem is None else html(
            '<p class="problem" id="problem">$p</p>', p=problem
        )
        return render("login.html", csrf=token, problem=shown).encode("utf-8")

    async def login(self, request: Any) -> bytes:
        _same_origin(request)
        cookie = request.getCookie(LOGIN_COOKIE.encode())
        if cookie is None or not same_token(_arg(request, "csrf"), cookie.decode("latin-1")):
            raise forbidden("The login form is out of date: load it again.")
        key = _arg(request, "key") or ""
        try:
            principal = await self.keys.from_key(key)
        except ApiError:
            request.setResponseCode(401)
            return await self.login_form(request, "That is not a valid API key.")
        credential = principal.credential
        if not credential.has_scope("admin"):
            request.setResponseCode(403)
            return await self.login_form(
                request, "This key has no admin scope: the dashboard needs an admin key."
            )
        session = self.rules.new(credential.name, credential.secret_hash, credential.tenant,
                                 principal.operator, self.clock.seconds())
        # The cookie is set only once the stores hold the session: a failure here is
        # the 503 page and no login.
        await self._stored(self.sessions.create(session))
        request.addCookie(
            COOKIE.encode(), session.id.encode(), path=b"/", httpOnly=True,
            secure=request.isSecure(), sameSite="strict",
        )
        request.addCookie(LOGIN_COOKIE.encode(), b"", path=b"/login", httpOnly=True,
                          secure=request.isSecure(), sameSite="strict", max_age=b"0")
        log.info("dashboard login by {name} (tenant {tenant})", name=credential.name,
                 tenant=credential.tenant)
        return _redirect(request, "/")

    async def logout(self, request: Any, session: Session) -> Redirect:
        await self._stored(self.sessions.end(session.id))
        request.addCookie(COOKIE.encode(), b"", path=b"/", httpOnly=True,
                          secure=request.isSecure(), sameSite="strict", max_age=b"0")
        return Redirect("/login")

    # -- pages -------------------------------------------------------------------

    async def overview(self, request: Any, session: Session) -> tuple[str, Html]:
        now = self.clock.seconds()
        tenant = None if session.operator else session.tenant
        events, partial = await self._events_since(now - DAY.seconds, tenant)
        recent = await self.eventlog.search(EventQuery(tenant=tenant, limit=RECENT_EVENTS))
        queue = sites = Html("")
        if session.operator:
            stats = await self.spool.stats()
            waiting = await self._waiting()
            queue = pages.queue_section(stats, queue_ages(waiting, now))
            if self.delivery is not None:
                sites = pages.sites_section(self.delivery.routing_state(), now, session.csrf)
        body = pages.overview(
            queue=queue,
            charts=pages.charts_section(series(events, HOUR, now), series(events, DAY, now),
                                        partial),
            rates=pages.rates_section(provider_rates(events)),
            sites=sites, recent=recent.events,
        )
        return "Overview", body

    async def _events_since(self, since: float, tenant: str | None) -> tuple[list[Event], bool]:
        """The events since ``since`` (newest first, at most ``CHART_EVENTS``) and
        whether there were more."""
        out: list[Event] = []
        cursor: str | None = None
        while True:
            page = await self.eventlog.search(
                EventQuery(tenant=tenant, since=since, limit=MAX_LIMIT, cursor=cursor)
            )
            out.extend(page.events)
            cursor = page.next_cursor
            if cursor is None:
                return out, False
            if len(out) >= CHART_EVENTS:
                return out, True

    async def _waiting(self) -> list[StoredMessage]:
        """The oldest queued messages (pending or deferred recipients)."""
        found: dict[str, StoredMessage] = {}
        for state in (RecipientStatus.PENDING, RecipientStatus.DEFERRED):
            for message in await self.spool.list_messages(status=state, limit=AGE_SAMPLE):
                found[message.queue_id] = message
        return list(found.values())

    async def events(self, request: Any, session: Session) -> tuple[str, Html]:
        values = {name: _arg(request, name) for name, _ in pages.SEARCH_FIELDS}
        kind = _arg(request, "type")
        values["type"] = kind if kind in EVENT_TYPES else None
        query = EventQuery(
            recipient=values["recipient"], sender=values["sender"],
            queue_id=values["queue_id"], message_id=_strip_brackets(values["message_id"]),
            type=values["type"], tenant=None if session.operator else session.tenant,
            limit=PAGE_EVENTS, cursor=_arg(request, "cursor"),
        )
        try:
            page = await self.eventlog.search(query)
        except ValueError:
            raise PageError(400, "Bad request", "That page link is not valid.") from None
        return "Events", pages.events_page(values, page.events, page.next_cursor)

    async def _message(self, queue_id: str, session: Session) -> tuple[dict[str, Any], bool]:
        stored = await self.spool.get(queue_id)
        page = await self.eventlog.search(EventQuery(queue_id=queue_id, limit=MAX_LIMIT))
        events = sorted(page.events, key=lambda e: (e.timestamp, e.id))
        tenant = stored.meta.tenant if stored is not None else (
            events[0].tenant if events else None
        )
        if (stored is None and not events) or not _sees(session, tenant):
            raise not_found(f"No message {queue_id}.")
        return message_status(queue_id, stored, events), stored is not None

    async def message(self, request: Any, session: Session, queue_id: str) -> tuple[str, Html]:
        found, queued = await self._message(queue_id, session)
        return f"Message {queue_id}", pages.message_page(found, queued, session.csrf)

    async def suppression_list(self, request: Any, session: Session) -> tuple[str, Html]:
        tenant = None if session.operator else session.tenant
        cursor = _arg(request, "cursor")
        start: Any = None
        if cursor is not None:
            t, _, address = cursor.partition(" ")
            start = address if tenant is not None else (t, address)
        entries = await self.suppressions.list(tenant, 101, start)
        more = None
        if len(entries) > 100:
            entries = entries[:100]
            more = quote(f"{entries[-1].tenant} {entries[-1].address}", safe="")
        return "Suppressions", pages.suppressions_page(entries, session.csrf, session.operator,
                                                       more)

    # -- actions -----------------------------------------------------------------

    async def retry(self, request: Any, session: Session, queue_id: str) -> Redirect:
        await self._queued(queue_id, session)
        count = await self.spool.retry(queue_id, self.clock.seconds())
        await self._flash(session, f"{count} recipient(s) of {queue_id} are due now.")
        return Redirect(_message_path(queue_id))

    async def delete(self, request: Any, session: Session, queue_id: str) -> Redirect:
        await self._queued(queue_id, session)
        deleted = await self.spool.delete(queue_id)
        await self._flash(session, f"{queue_id} was deleted from the queue." if deleted
                          else f"{queue_id} had already left the queue.")
        log.info("dashboard: {name} deleted {queue_id}", name=session.credential,
                 queue_id=queue_id)
        return Redirect("/")

    async def _queued(self, queue_id: str, session: Session) -> None:
        stored = await self.spool.get(queue_id)
        if stored is None or not _sees(session, stored.meta.tenant):
            raise not_found(f"{queue_id} is not in the queue.")

    async def remove_suppression(self, request: Any, session: Session) -> Redirect:
        address = _arg(request, "address")
        tenant = _arg(request, "tenant") if session.operator else session.tenant
        if not address or not tenant:
            raise PageError(400, "Bad request", "Name the address (and the tenant).")
        if not _sees(session, tenant):
            raise forbidden("You see only your own tenant.")
        removed = await self.suppressions.remove(tenant, address)
        await self._flash(session, f"{address} is no longer suppressed for {tenant}."
                          if removed else f"{address} was not suppressed for {tenant}.")
        return Redirect("/suppressions")

    async def suspend(self, request: Any, session: Session) -> Redirect:
        control = self._control(session)
        site = _arg(request, "site") or ""
        seconds = _arg(request, "for") or ""
        allowed = {str(s) for s, _ in pages.SUSPEND_CHOICES}
        if not SITE_PATTERN.fullmatch(site) or seconds not in allowed:
            raise PageError(400, "Bad request", "Name a destination and a duration.")
        control.suspend(site, self.clock.seconds() + int(seconds))
        log.info("dashboard: {name} suspended {site} for {seconds} s",
                 name=session.credential, site=site, seconds=seconds)
        await self._flash(session,
                          f"{site} is suspended: its mail is deferred until it is resumed.")
        return Redirect("/")

    async def resume(self, request: Any, session: Session) -> Redirect:
        control = self._control(session)
        site = _arg(request, "site") or ""
        resumed = control.resume(site)
        await self._flash(session,
                          f"{site} is resumed." if resumed else f"{site} was not suspended.")
        return Redirect("/")

    def _control(self, session: Session) -> IDestinationControl:
        if not session.operator:
            raise forbidden("Suspending a destination needs an operator key.")
        if self.delivery is None:
            raise PageError(409, "Not here", "This process does not deliver mail.")
        return self.delivery


def _sees(session: Session, tenant: str | None) -> bool:
    return session.operator or tenant == session.tenant


def _strip_brackets(message_id: str | None) -> str | None:
    if message_id is None:
        return None
    return message_id.strip().removeprefix("<").removesuffix(">") or None


def _message_path(queue_id: str) -> str:
    return "/messages/" + quote(queue_id, safe="")


def _secure_headers(request: Any) -> None:
    for name, value in SECURITY_HEADERS.items():
        request.setHeader(name, value)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")


def _same_origin(request: Any) -> None:
    """403 when the browser says the form came from another origin."""
    origin = request.getHeader(b"origin")
    if origin is None:
        return
    host = request.getHeader(b"host") or b""
    scheme = b"https" if request.isSecure() else b"http"
    if origin != scheme + b"://" + host:
        raise forbidden("The form did not come from this dashboard.")


def _redirect(request: Any, location: str) -> bytes:
    request.setResponseCode(303)
    request.setHeader(b"location", location.encode("utf-8"))
    return b""


def _unavailable() -> PageError:
    return PageError(503, "Stores unavailable", "The stores do not answer; try again shortly.")


def _error(request: Any, error: PageError) -> bytes:
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    return render("error.html", title=error.title, message=error.message).encode("utf-8")

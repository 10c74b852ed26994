"""The ``/v1`` routes: JSON in, JSON out, one error envelope.

Each route authenticates the caller, checks the scope, restricts what it reads and
changes to the caller's tenant, and calls the same store functions as the command
line.  Every POST honours ``Idempotency-Key``.  Nothing here blocks the reactor: the
stores answer with Deferreds and the slow secret check runs in a thread.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

from attrs import define, field
from klein import Klein
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from werkzeug.exceptions import MethodNotAllowed, NotFound

from sendarix.config.secret import NodeSecret, SecretError
from sendarix.config.units import parse_duration
from sendarix.control.api.admin import AdminRoutes
from sendarix.control.api.auth import ApiKeys, Principal
from sendarix.control.api.body import json_body
from sendarix.control.api.errors import (
    STORE_UNAVAILABLE,
    ApiError,
    invalid,
    json_bytes,
    not_found,
)
from sendarix.control.api.status import message_status
from sendarix.events.stats import hour_of
from sendarix.ingress.compose import InvalidField, compose
from sendarix.ingress.httpsubmit import HTTPSubmission, SubmitRefused
from sendarix.ingress.render import RenderError, render
from sendarix.ingress.render import check as check_template
from sendarix.interfaces import (
    IDestinationControl,
    IEventLog,
    IIdempotencyStore,
    ISpool,
    ISuppressionStore,
    ITemplateStore,
)
from sendarix.model.event import (
    EVENT_TYPES,
    MAX_LIMIT,
    Event,
    EventQuery,
    format_timestamp,
    parse_timestamp,
)
from sendarix.model.idempotency import MAX_KEY_LENGTH, fingerprint
from sendarix.model.suppression import Suppression
from sendarix.model.template import MAX_PART, Template
from sendarix.model.template import NAME_PATTERN as TEMPLATE_NAME
from sendarix.stores.errors import StoreUnavailable

log = Logger()

#: How a kept answer that holds a secret starts (the rest is its encrypted text).
SEALED_ANSWER = "sealed:"
#: The node-secret key purpose that encrypts such answers.
ANSWER_PURPOSE = "idempotent-answers"

#: HTTP status for each refusal code of the HTTP door.
_REFUSAL_STATUS = {
    "forbidden_ip": 403,
    "sender_not_allowed": 403,
    "unverified_domain": 403,
    "rate_limited": 429,
    "quota_exceeded": 429,
    "too_many_recipients": 422,
    "all_recipients_suppressed": 422,
    "message_too_large": 413,
    "content_rejected": 422,
    "message_refused": 422,
    "unauthorized": 401,
}

#: Most messages in one batch request.
MAX_BATCH = 500

#: How far ahead ``send_at`` may be (seconds).
MAX_SCHEDULE = 72 * 3600.0

OPENAPI_PATH = os.path.join(os.path.dirname(__file__), "openapi.yaml")


def load_openapi() -> dict[str, Any]:
    """The OpenAPI document served at ``/v1/openapi.json``."""
    import yaml

    with open(OPENAPI_PATH, encoding="utf-8") as f:
        document: dict[str, Any] = yaml.safe_load(f)
    return document


def _arg(request: Any, name: str) -> str | None:
    values = request.args.get(name.encode())
    if not values:
        return None
    if len(values) > 1:
        raise invalid(name, "given more than once")
    try:
        return str(values[0].decode("utf-8"))
    except UnicodeDecodeError:
        raise invalid(name, "is not UTF-8") from None


def _time_arg(request: Any, name: str) -> float | None:
    text = _arg(request, name)
    if text is None:
        return None
    try:
        return parse_timestamp(float(text) if text.replace(".", "", 1).isdigit() else text)
    except (ValueError, OverflowError):
        raise invalid(name, "must be an RFC 3339 time or POSIX seconds") from None


def _limit_arg(request: Any, default: int = 50) -> int:
    text = _arg(request, "limit")
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise invalid("limit", f"must be an integer from 1 to {MAX_LIMIT}")
    return int(text)


#: A route: (request, principal, **path parameters) -> (status, JSON value).
Handler = Callable[..., Awaitable[tuple[int, Any]]]


@define
class ApiApp(AdminRoutes):
    """The routes of ``/v1``; ``resource()`` mounts them in twisted.web."""

    keys: ApiKeys
    submission: HTTPSubmission
    spool: ISpool
    eventlog: IEventLog
    suppressions: ISuppressionStore
    idempotency: IIdempotencyStore
    templates: ITemplateStore
    clock: Any
    #: Every store (the administration routes' operations take them together).
    stores: Any = None
    #: The node secret, which encrypts new DKIM keys (None: domains cannot be added).
    secret: NodeSecret | None = None
    #: The delivery agent's destinations (None: a node without one).
    delivery: IDestinationControl | None = None
    #: Called with (route, status) after every request (metrics).
    on_request: Callable[[str, int], None] | None = None
    app: Klein = field(factory=Klein, init=False)

    def __attrs_post_init__(self) -> None:
        route = self.app.route
        route("/v1/messages", methods=["POST"])(self._wrap("messages", self.send, "send"))
        route("/v1/messages/batch", methods=["POST"])(
            self._wrap("messages_batch", self.send_batch, "send")
        )
        route("/v1/messages/<string:queue_id>/cancel", methods=["POST"])(
            self._wrap("message_cancel", self.cancel, "send")
        )
        route("/v1/messages/<string:queue_id>", methods=["GET"])(
            self._wrap("message", self.get_message, "read")
        )
        route("/v1/events", methods=["GET"])(self._wrap("events", self.events, "read"))
        route("/v1/suppressions", methods=["GET"])(
            self._wrap("suppressions", self.list_suppressions, "read")
        )
        route("/v1/suppressions", methods=["POST"])(
            self._wrap("suppressions", self.add_suppression, "send")
        )
        route("/v1/suppressions/<string:address>", methods=["DELETE"])(
            self._wrap("suppression", self.remove_suppression, "send")
        )
        route("/v1/templates", methods=["GET"])(
            self._wrap("templates", self.list_templates, "read")
        )
        route("/v1/templates", methods=["POST"])(
            self._wrap("templates", self.create_template, "send")
        )
        route("/v1/templates/<string:name>", methods=["GET"])(
            self._wrap("template", self.get_template, "read")
        )
        route("/v1/templates/<string:name>", methods=["PUT"])(
            self._wrap("template", self.put_template, "send")
        )
        route("/v1/templates/<string:name>", methods=["DELETE"])(
            self._wrap("template", self.delete_template, "send")
        )
        for path, method, handler in (
            ("/v1/credentials", "GET", self.list_credentials),
            ("/v1/credentials", "POST", self.add_credential),
            ("/v1/credentials/<string:name>", "DELETE", self.revoke_credential),
            ("/v1/credentials/<string:name>/rotate", "POST", self.rotate_credential),
            ("/v1/domains", "GET", self.list_domains),
            ("/v1/domains", "POST", self.add_domain),
            ("/v1/domains/<string:domain>/verify", "POST", self.verify_domain),
            ("/v1/domains/<string:domain>/check", "GET", self.check_domain),
            ("/v1/webhooks", "GET", self.list_webhooks),
            ("/v1/webhooks", "POST", self.add_webhook),
            ("/v1/webhooks/<string:name>", "DELETE", self.remove_webhook),
            ("/v1/webhooks/<string:name>/test", "POST", self.test_webhook),
            ("/v1/webhooks/<string:name>/replay", "POST", self.replay_webhook),
            ("/v1/webhooks/<string:name>/enable", "POST", self.enable_webhook),
            ("/v1/tenants", "GET", self.list_tenants),
            ("/v1/tenants/<string:name>", "GET", self.get_tenant),
            ("/v1/tenants/<string:name>/resume", "POST", self.release_tenant),
        ):
            scope = "read" if method == "GET" and not path.startswith(
                ("/v1/credentials", "/v1/tenants")
            ) else "admin"
            name = path.split("/")[2]
            route(path, methods=[method])(self._wrap(name, handler, scope))
        route("/v1/queue/messages/<string:queue_id>/retry", methods=["POST"])(
            self._wrap("queue_retry", self.queue_retry, "admin")
        )
        route("/v1/queue/messages/<string:queue_id>", methods=["DELETE"])(
            self._wrap("queue_delete", self.queue_delete, "admin")
        )
        route("/v1/queue/destinations", methods=["GET"])(
            self._wrap("destinations", self.destinations, "admin")
        )
        route("/v1/queue/destinations/<string:site>/suspend", methods=["POST"])(
            self._wrap("destination_suspend", self.suspend, "admin")
        )
        route("/v1/queue/destinations/<string:site>/resume", methods=["POST"])(
            self._wrap("destination_resume", self.resume, "admin")
        )
        route("/v1/stats", methods=["GET"])(self._wrap("stats", self.stats, "read"))
        route("/v1/queue", methods=["GET"])(self._wrap("queue", self.queue, "read"))
        route("/v1/openapi.json", methods=["GET"])(self.openapi)
        self.app.handle_errors(NotFound)(self._not_found)
        self.app.handle_errors(MethodNotAllowed)(self._not_allowed)

    def resource(self) -> Any:
        return self.app.resource()

    # -- plumbing ----------------------------------------------------------------

    def _wrap(self, name: str, handler: Handler, scope: str) -> Callable[..., Deferred[bytes]]:
        def route(request: Any, **params: Any) -> Deferred[bytes]:
            return Deferred.fromCoroutine(self._serve(name, handler, scope, request, params))

        route.__name__ = f"route_{name}_{handler.__name__}"
        return route

    async def _serve(
        self, name: str, handler: Handler, scope: str, request: Any, params: dict[str, Any]
    ) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        try:
            principal = await self.keys.principal(request)
            principal.require(scope)
            if request.method == b"POST":
                status, body = await self._idempotent(request, principal, handler, params)
            else:
                status, value = await handler(request, principal, **params)
                body = json_bytes(value)
        except ApiError as e:
            status, body = e.status, e.body()
            for header, value in e.headers.items():
                request.setHeader(header.encode(), value.encode())
        except StoreUnavailable:
            status, body = STORE_UNAVAILABLE.status, STORE_UNAVAILABLE.body()
            request.setHeader(b"retry-after", b"5")
        except Exception:
            log.failure("API request {method} {path} failed", method=request.method,
                        path=request.path)
            status, body = 500, ApiError(500, "internal_error", "internal error").body()
        request.setResponseCode(status)
        if self.on_request is not None:
            self.on_request(name, status)
        return body

    async def _idempotent(
        self, request: Any, principal: Principal, handler: Handler, params: dict[str, Any]
    ) -> tuple[int, bytes]:
        """Run a POST once per ``Idempotency-Key``: a repeat with the same body gets
        the first answer (``Idempotent-Replayed: true``), another body 409."""
        value: Any
        raw_key = request.getHeader(b"idempotency-key")
        if raw_key is None:
            status, value = await handler(request, principal, **params)
            return status, json_bytes(value)
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            raise invalid("Idempotency-Key", "is not UTF-8") from None
        if not key or len(key) > MAX_KEY_LENGTH or "\x00" in key:
            raise invalid("Idempotency-Key", f"must be 1-{MAX_KEY_LENGTH} characters")
        content = request.content.read() if request.content is not None else b""
        request.content.seek(0)
        fp = fingerprint("POST", request.path.decode("latin-1"), content)
        scope = principal.credential.tenant
        found = await self.idempotency.claim(scope, key, fp, self.clock.seconds())
        if found is not None:
            if found.fingerprint != fp:
                raise ApiError(409, "idempotency_key_reused",
                               "this Idempotency-Key was used with another request")
            if not found.finished:
                raise ApiError(409, "request_in_progress",
                               "a request with this Idempotency-Key is still running",
                               {"Retry-After": "1"})
            request.setHeader(b"idempotent-replayed", b"true")
            return int(found.status or 200), self._open_answer(found.body or "")
        value = None
        try:
            status, value = await handler(request, principal, **params)
            body = json_bytes(value)
        except ApiError as e:
            if e.status >= 500 or e.status == 429:
                await self.idempotency.release(scope, key)  # worth retrying as new
                raise
            status, body = e.status, e.body()
        except BaseException:
            await self.idempotency.release(scope, key)
            raise
        if isinstance(value, dict) and "secret" in value:
            # A new API key or webhook secret is kept only encrypted; without a node
            # secret it is not kept at all, and a repeat runs as a new request.
            if self.secret is None:
                await self.idempotency.release(scope, key)
                return status, body
            kept = SEALED_ANSWER + self.secret.encrypt(body, ANSWER_PURPOSE)
        else:
            kept = body.decode("utf-8")
        await self.idempotency.finish(scope, key, status, kept)
        return status, body

    def _open_answer(self, kept: str) -> bytes:
        """A kept answer as first sent (decrypted when it holds a secret)."""
        if not kept.startswith(SEALED_ANSWER):
            return kept.encode("utf-8")
        try:
            if self.secret is None:
                raise SecretError("no node secret")
            return self.secret.decrypt(kept[len(SEALED_ANSWER):], ANSWER_PURPOSE)
        except SecretError:
            raise ApiError(
                409, "idempotency_key_reused",
                "the first answer to this Idempotency-Key holds a secret this node "
                "cannot decrypt (another node secret): rotate the credential or remove "
                "the endpoint and add it again",
            ) from None

    def _not_found(self, request: Any, failure: Any) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        return ApiError(404, "not_found", "no such path").body()

    def _not_allowed(self, request: Any, failure: Any) -> bytes:
        request.setResponseCode(405)
        request.setHeader(b"content-type", b"application/json")
        return ApiError(405, "method_not_allowed", "method not allowed on this path").body()

    def openapi(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json_bytes(load_openapi())

    # -- messages ----------------------------------------------------------------

    async def send(self, request: Any, principal: Principal) -> tuple[int, Any]:
        body = json_body(request)
        return 202, await self._send_one(request, principal, body, "")

    async def send_batch(self, request: Any, principal: Principal) -> tuple[int, Any]:
        """Up to ``MAX_BATCH`` messages, each checked and queued on its own: one bad
        message does not stop the others, and each result says what happened."""
        body = json_body(request)
        unknown = set(body) - {"messages"}
        if unknown:
            raise invalid(sorted(unknown)[0], "is not a known field")
        messages = body.get("messages")
        if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_BATCH:
            raise invalid("messages", f"must be a list of 1 to {MAX_BATCH} messages")
        results: list[dict[str, Any]] = []
        for i, item in enumerate(messages):
            try:
                if not isinstance(item, dict):
                    raise invalid(f"messages[{i}]", "must be an object")
                sent = await self._send_one(request, principal, item, f"messages[{i}].")
                results.append({"status": 202, **sent})
            except ApiError as e:
                results.append({"status": e.status, "error": {"code": e.code,
                                                              "message": e.message}})
        return 200, {"results": results}

    async def _send_one(
        self, request: Any, principal: Principal, body: dict[str, Any], where: str
    ) -> dict[str, Any]:
        """Compose, check and queue one message; its 202 body, or ApiError."""
        if body.get("template") is not None:
            body = await self._rendered(principal, body, where)
        elif body.get("variables") is not None or body.get("template_version") is not None:
            raise invalid(where + "template", "is required with variables or template_version")
        not_before = self._send_at(body.get("send_at"), where)
        try:
            message = compose(body)
        except InvalidField as e:
            raise invalid(where + e.field, e.why) from None
        client = request.getClientAddress()
        client_ip = getattr(client, "host", "")
        try:
            result = await self.submission.submit(
                principal.credential, client_ip, message, not_before=not_before
            )
        except SubmitRefused as e:
            status = _REFUSAL_STATUS.get(e.code, 422)
            headers = {"Retry-After": "60"} if status == 429 else None
            raise ApiError(status, e.code, e.reply.text, headers) from None
        answer = result.to_json()
        if not_before is not None:
            answer["send_at"] = format_timestamp(not_before)
        return answer

    async def _rendered(
        self, principal: Principal, body: dict[str, Any], where: str
    ) -> dict[str, Any]:
        """``body`` with its template rendered into subject, text and html (422
        ``template_error`` naming the template, line and variable)."""
        name = body["template"]
        if not isinstance(name, str) or not TEMPLATE_NAME.fullmatch(name):
            raise invalid(where + "template", "must be a template name")
        version = body.get("template_version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)
                                    or version < 1):
            raise invalid(where + "template_version", "must be a positive integer")
        variables = body.get("variables", {})
        if not isinstance(variables, dict):
            raise invalid(where + "variables", "must be an object")
        given = [part for part in ("subject", "text", "html") if body.get(part) is not None]
        if given:
            raise invalid(where + given[0], "cannot be combined with a template")
        template = await self.templates.get(principal.tenant, name, version)
        if template is None:
            raise ApiError(422, "template_not_found", f"{where}template {name!r} not found")
        try:
            rendered = await deferToThread(render, template, variables)
        except RenderError as e:
            raise ApiError(422, "template_error", str(e)) from None
        fields = {k: v for k, v in body.items()
                  if k not in ("template", "template_version", "variables")}
        for part in ("subject", "text", "html"):
            if getattr(rendered, part) is not None:
                fields[part] = getattr(rendered, part)
        return fields

    # -- templates ---------------------------------------------------------------

    async def list_templates(self, request: Any, principal: Principal) -> tuple[int, Any]:
        found = await self.templates.list(principal.tenant)
        return 200, {"templates": [_template(t) for t in found]}

    async def get_template(self, request: Any, principal: Principal, name: str) -> tuple[int, Any]:
        version_text = _arg(request, "version")
        version = None
        if version_text is not None:
            if not version_text.isdigit() or int(version_text) < 1:
                raise invalid("version", "must be a positive integer")
            version = int(version_text)
        template = await self.templates.get(principal.tenant, name, version)
        if template is None:
            raise not_found(f"template {name}")
        return 200, _template(template)

    async def create_template(self, request: Any, principal: Principal) -> tuple[int, Any]:
        body = json_body(request)
        name = body.get("name")
        if not isinstance(name, str) or not TEMPLATE_NAME.fullmatch(name):
            raise invalid("name", "must be 1-64 letters, digits or . _ - (starting with a "
                                  "letter or digit)")
        return 201, await self._save_template(principal, name, body, {"name"})

    async def put_template(self, request: Any, principal: Principal, name: str) -> tuple[int, Any]:
        if not TEMPLATE_NAME.fullmatch(name):
            raise invalid("name", "must be 1-64 letters, digits or . _ -")
        return 200, await self._save_template(principal, name, json_body(request), set())

    async def _save_template(
        self, principal: Principal, name: str, body: dict[str, Any], extra: set[str]
    ) -> dict[str, Any]:
        unknown = set(body) - {"subject", "text", "html"} - extra
        if unknown:
            raise invalid(sorted(unknown)[0], "is not a known field")
        parts: dict[str, str | None] = {}
        for part in ("subject", "text", "html"):
            value = body.get(part)
            if value is not None and (not isinstance(value, str) or len(value) > MAX_PART):
                raise invalid(part, f"must be a string of at most {MAX_PART} characters")
            parts[part] = value
        if parts["text"] is None and parts["html"] is None:
            raise invalid("text", "a template needs text or html")
        draft = Template(principal.tenant, name, 0, parts["subject"], parts["text"],
                         parts["html"], self.clock.seconds())
        try:
            check_template(draft)
        except RenderError as e:
            raise ApiError(422, "template_error", str(e)) from None
        saved = await self.templates.save(
            principal.tenant, name, parts["subject"], parts["text"], parts["html"],
            self.clock.seconds(),
        )
        return _template(saved)

    async def delete_template(
        self, request: Any, principal: Principal, name: str
    ) -> tuple[int, Any]:
        if not await self.templates.delete(principal.tenant, name):
            raise not_found(f"template {name}")
        return 200, {"deleted": True, "name": name}

    def _send_at(self, value: Any, where: str) -> float | None:
        """``send_at`` as POSIX seconds: RFC 3339 with an offset, in the future, at
        most ``MAX_SCHEDULE`` ahead (a time already past means now)."""
        if value is None:
            return None
        field = where + "send_at"
        if not isinstance(value, str):
            raise invalid(field, "must be an RFC 3339 time such as 2026-12-24T09:00:00Z")
        text = value.strip()
        if not (text.endswith(("Z", "z")) or text[-6:-5] in ("+", "-")):
            raise invalid(field, "must be an RFC 3339 time with an offset (Z or +01:00)")
        try:
            when = parse_timestamp(text[:-1] + "+00:00" if text[-1] in "Zz" else text)
        except (ValueError, OverflowError):
            raise invalid(field, "must be an RFC 3339 time such as 2026-12-24T09:00:00Z") from None
        now = self.clock.seconds()
        if when > now + MAX_SCHEDULE:
            raise invalid(field, "may be at most 72 hours ahead")
        return when if when > now else None

    async def cancel(self, request: Any, principal: Principal, queue_id: str) -> tuple[int, Any]:
        """Cancel the recipients of a message that have not been delivered, bounced
        or expired yet (scheduled or waiting in the queue)."""
        stored = await self.spool.get(queue_id)
        if stored is None or not principal.sees(stored.meta.tenant):
            raise not_found(f"message {queue_id} in the queue")
        open_ = [r.address for r in stored.recipients if not r.status.final]
        if not await self.spool.delete(queue_id):
            raise not_found(f"message {queue_id} in the queue")
        now = self.clock.seconds()
        for address in open_:
            event = Event.make(
                "cancelled", now, queue_id=queue_id, message_id=stored.meta.message_id,
                tenant=stored.meta.tenant, sender=stored.envelope.sender, recipient=address,
                tags=stored.meta.tags, node=self.submission.intake.node,
            )
            await maybeDeferred(self.submission.intake.events.emit, event)
        return 200, {"id": queue_id, "cancelled": open_}

    async def get_message(
        self, request: Any, principal: Principal, queue_id: str
    ) -> tuple[int, Any]:
        stored = await self.spool.get(queue_id)
        page = await self.eventlog.search(EventQuery(queue_id=queue_id, limit=MAX_LIMIT))
        events = sorted(page.events, key=lambda e: (e.timestamp, e.id))
        tenant = stored.meta.tenant if stored is not None else (
            events[0].tenant if events else None
        )
        if (stored is None and not events) or not principal.sees(tenant):
            raise not_found(f"message {queue_id}")
        return 200, message_status(queue_id, stored, events)

    async def events(self, request: Any, principal: Principal) -> tuple[int, Any]:
        kind = _arg(request, "type")
        if kind is not None and kind not in EVENT_TYPES:
            raise invalid("type", f"must be one of {', '.join(sorted(EVENT_TYPES))}")
        known = {"recipient", "sender", "queue_id", "message_id", "type", "tenant", "tag",
                 "since", "until", "limit", "cursor"}
        unknown = {k.decode("latin-1") for k in request.args} - known
        if unknown:
            raise invalid(sorted(unknown)[0], "is not a known parameter")
        query = EventQuery(
            recipient=_arg(request, "recipient"),
            sender=_arg(request, "sender"),
            queue_id=_arg(request, "queue_id"),
            message_id=_arg(request, "message_id"),
            type=kind,
            tenant=principal.tenant_filter(_arg(request, "tenant")),
            tag=_arg(request, "tag"),
            since=_time_arg(request, "since"),
            until=_time_arg(request, "until"),
            limit=_limit_arg(request),
            cursor=_arg(request, "cursor"),
        )
        try:
            page = await self.eventlog.search(query)
        except ValueError:
            raise invalid("cursor", "is not a cursor this API gave out") from None
        return 200, page.to_json()

    # -- suppressions ------------------------------------------------------------

    async def list_suppressions(self, request: Any, principal: Principal) -> tuple[int, Any]:
        tenant = principal.tenant_filter(_arg(request, "tenant"))
        limit = _limit_arg(request, 100)
        start = _page_key(_arg(request, "cursor"), tenant)
        try:
            entries = await self.suppressions.list(tenant, limit + 1, start)
        except ValueError:
            raise invalid("cursor", "is not a cursor this API gave out") from None
        more = len(entries) > limit
        entries = entries[:limit]
        cursor = None
        if more:
            last = entries[-1]
            cursor = _cursor(last.tenant, last.address)
        return 200, {"suppressions": [_suppression(e) for e in entries], "next_cursor": cursor}

    async def add_suppression(self, request: Any, principal: Principal) -> tuple[int, Any]:
        body = json_body(request)
        unknown = set(body) - {"address", "reason", "tenant"}
        if unknown:
            raise invalid(sorted(unknown)[0], "is not a known field")
        address = body.get("address")
        if not isinstance(address, str) or "@" not in address or len(address) > 320:
            raise invalid("address", "must be an email address")
        reason = body.get("reason", "")
        if not isinstance(reason, str) or len(reason) > 500:
            raise invalid("reason", "must be a string of at most 500 characters")
        tenant_field = body.get("tenant")
        if tenant_field is not None and not isinstance(tenant_field, str):
            raise invalid("tenant", "must be a string")
        tenant = principal.tenant_filter(tenant_field) or principal.tenant
        try:
            added = await self.suppressions.add(
                tenant, address, reason, "api", self.clock.seconds()
            )
        except ValueError as e:
            raise invalid("address", str(e)) from None
        entry = await self.suppressions.is_suppressed(tenant, address)
        return (201 if added else 200), _suppression(entry)

    async def remove_suppression(
        self, request: Any, principal: Principal, address: str
    ) -> tuple[int, Any]:
        tenant = principal.tenant_filter(_arg(request, "tenant")) or principal.tenant
        if not await self.suppressions.remove(tenant, address):
            raise not_found(f"suppression of {address}")
        return 200, {"removed": True, "address": address.lower(), "tenant": tenant}

    # -- queue -------------------------------------------------------------------

    async def queue(self, request: Any, principal: Principal) -> tuple[int, Any]:
        if not principal.operator:
            raise ApiError(403, "forbidden_scope", "queue figures need an operator key")
        stats = await self.spool.stats()
        return 200, stats.to_dict()

    async def queue_retry(
        self, request: Any, principal: Principal, queue_id: str
    ) -> tuple[int, Any]:
        """Make a queued message's waiting recipients due now (like ``queue retry``)."""
        await self._queued(principal, queue_id)
        count = await self.spool.retry(queue_id, self.clock.seconds())
        return 200, {"id": queue_id, "rescheduled": count}

    async def queue_delete(
        self, request: Any, principal: Principal, queue_id: str
    ) -> tuple[int, Any]:
        """Remove a message from the queue without events for its recipients (like
        ``queue delete``; cancelling records a ``cancelled`` event instead)."""
        await self._queued(principal, queue_id)
        if not await self.spool.delete(queue_id):
            raise not_found(f"message {queue_id} in the queue")
        return 200, {"id": queue_id, "deleted": True}

    async def stats(self, request: Any, principal: Principal) -> tuple[int, Any]:
        """Event counts per hour or day, by type, provider and tenant."""
        granularity = _arg(request, "granularity") or "hour"
        if granularity not in ("hour", "day"):
            raise invalid("granularity", "must be hour or day")
        now = self.clock.seconds()
        until = _time_arg(request, "until") or now
        since = _time_arg(request, "since")
        if since is None:
            since = until - (86400.0 if granularity == "hour" else 30 * 86400.0)
        if not since < until or until - since > 31 * 86400.0:
            raise invalid("since", "must be before until, at most 31 days apart")
        tenant = principal.tenant_filter(_arg(request, "tenant"))
        rows = await self.stores.stats.query(hour_of(since), until, tenant)
        return 200, {"granularity": granularity, "since": format_timestamp(since),
                     "until": format_timestamp(until), "buckets": stat_buckets(rows, granularity)}

    def _destinations(self, principal: Principal) -> IDestinationControl:
        if not principal.operator:
            raise ApiError(403, "forbidden_scope", "destinations need an operator key")
        if self.delivery is None:
            raise ApiError(503, "no_delivery_agent", "this node runs no delivery agent")
        return self.delivery

    async def destinations(self, request: Any, principal: Principal) -> tuple[int, Any]:
        """The delivery agent's destinations (sites), endpoint health and sources."""
        return 200, self._destinations(principal).routing_state()

    async def suspend(self, request: Any, principal: Principal, site: str) -> tuple[int, Any]:
        """Send nothing to ``site`` for a while (``{"for": "1h"}``, at most 7 days);
        its mail waits in the queue (deferred, never bounced by this)."""
        control = self._destinations(principal)
        body = json_body(request)
        unknown = set(body) - {"for"}
        if unknown:
            raise invalid(sorted(unknown)[0], "is not a known field")
        try:
            seconds = parse_duration(body.get("for", "1h"), "for")
        except ValueError:
            raise invalid("for", "must be a duration such as \"30m\" or \"2h\"") from None
        if not 0 < seconds <= 7 * 86400:
            raise invalid("for", "must be more than 0 and at most 7 days")
        until = self.clock.seconds() + seconds
        control.suspend(site, until)
        return 200, {"site": site, "suspended_until": format_timestamp(until)}

    async def resume(self, request: Any, principal: Principal, site: str) -> tuple[int, Any]:
        control = self._destinations(principal)
        if not control.resume(site):
            raise not_found(f"suspension of {site}")
        return 200, {"site": site, "resumed": True}

    async def _queued(self, principal: Principal, queue_id: str) -> None:
        stored = await self.spool.get(queue_id)
        if stored is None or not principal.sees(stored.meta.tenant):
            raise not_found(f"message {queue_id} in the queue")


def stat_buckets(
    rows: list[tuple[float, str, str, str, int]], granularity: str
) -> list[dict[str, Any]]:
    """Hourly rows gathered into buckets (hours or UTC days), oldest first."""
    size = 3600.0 if granularity == "hour" else 86400.0
    buckets: dict[float, dict[str, Any]] = {}
    for hour, tenant, kind, provider, n in rows:
        start = (hour // size) * size
        b = buckets.setdefault(start, {"start": format_timestamp(start), "counts": {},
                                       "by_provider": {}, "by_tenant": {}})
        b["counts"][kind] = b["counts"].get(kind, 0) + n
        per_provider = b["by_provider"].setdefault(provider, {})
        per_provider[kind] = per_provider.get(kind, 0) + n
        per_tenant = b["by_tenant"].setdefault(tenant, {})
        per_tenant[kind] = per_tenant.get(kind, 0) + n
    return [buckets[k] for k in sorted(buckets)]


def _cursor(tenant: str, address: str) -> str:
    """An opaque cursor for the suppression after (tenant, address)."""
    return base64.urlsafe_b64encode(json_bytes([tenant, address])).decode("ascii")


def _page_key(cursor: str | None, tenant: str | None) -> Any:
    """The store's page key from a cursor: the address within ``tenant``, or the
    (tenant, address) pair when listing every tenant; 400 for anything else."""
    if cursor is None:
        return None
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor.encode("ascii")))
    except (ValueError, UnicodeError):
        raise invalid("cursor", "is not a cursor this API gave out") from None
    if not (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, str) for v in value)):
        raise invalid("cursor", "is not a cursor this API gave out")
    if tenant is not None:
        if value[0] != tenant:
            raise invalid("cursor", "belongs to another listing")
        return value[1]
    return (value[0], value[1])


def _template(template: Template) -> dict[str, Any]:
    return {
        "name": template.name, "version": template.version, "subject": template.subject,
        "text": template.text, "html": template.html,
        "created_at": format_timestamp(template.created_at),
    }


def _suppression(entry: Suppression | None) -> dict[str, Any] | None:
    if entry is None:
        return None
    return {
        "tenant": entry.tenant, "address": entry.address, "reason": entry.reason,
        "source": entry.source, "created_at": format_timestamp(entry.created_at),
    }

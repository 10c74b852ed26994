"""The pluggable parts of Sendarix, as zope interfaces.

Each interface has at least one implementation chosen by configuration; tests check
every implementation with ``zope.interface.verify.verifyObject``.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from sendarix.model.credential import Credential
    from sendarix.model.domain import DKIMKey, SendingDomain
    from sendarix.model.event import Event, EventPage, EventQuery
    from sendarix.model.filtering import FilterContext, FilterVerdict
    from sendarix.model.message import (
        Lease,
        LeasedDelivery,
        NewMessage,
        QueueStats,
        RecipientOutcome,
        StoredMessage,
    )
    from sendarix.model.session import Hop, OutboundMessage, SessionOptions, SessionResult


class ISpool(Interface):
    """Durable storage of accepted mail, with per-destination leases.

    Deliveries are keyed by (queue id, destination domain); each recipient keeps its own
    state.  Every method returns a Deferred.  ``now`` and lease times are POSIX seconds.
    """

    def start() -> Deferred[None]:
        """Open the store (create tables, check settings); Deferred fires when ready."""

    def stop() -> Deferred[None]:
        """Flush and close; Deferred fires when closed."""

    def enqueue(message: NewMessage) -> Deferred[None]:  # noqa: N805
        """Store a :obj:`sendarix.model.message.NewMessage` durably.

        The Deferred fires (with None) only after the message and all its recipients are
        on stable storage, and fails if nothing was stored; never half-written.
        """

    def lease_due(  # noqa: N805
        node: str, now: float, limit: int, lease_for: float
    ) -> Deferred[list[LeasedDelivery]]:
        """Lease up to ``limit`` deliveries due at ``now`` to ``node`` for ``lease_for``
        seconds: a list of :obj:`sendarix.model.message.LeasedDelivery`.  A delivery whose lease has
        expired is due again (another node died holding it)."""

    def renew(  # noqa: N805
        queue_id: str, domain: str, node: str, expires: float
    ) -> Deferred[bool]:
        """Extend ``node``'s lease on a delivery; True when the lease was still ours."""

    def release(queue_id: str, domain: str, node: str) -> Deferred[Any]:  # noqa: N805
        """Give a lease back without an outcome (graceful stop)."""

    def reclaim(node: str) -> Deferred[Any]:  # noqa: N805
        """Release every lease ``node`` holds (a node restarting under its own name)."""

    def complete(  # noqa: N805
        queue_id: str, domain: str, node: str, outcomes: Sequence[RecipientOutcome], now: float
    ) -> Deferred[Any]:
        """Record :obj:`sendarix.model.message.RecipientOutcome`s and release the lease.

        Deferred recipients are due again at their ``next_attempt``; a message whose
        recipients are all final is removed with its body.
        """

    def get(queue_id: str) -> Deferred[StoredMessage | None]:  # noqa: N805
        """A :obj:`sendarix.model.message.StoredMessage`, or None."""

    def body(queue_id: str) -> Deferred[bytes | None]:  # noqa: N805
        """The message bytes, or None."""

    def list_messages(  # noqa: N805
        status: Any = None, domain: str | None = None, limit: int = 100, after: str | None = None
    ) -> Deferred[list[StoredMessage]]:
        """StoredMessages in queue-id order after ``after``, filtered by a recipient status
        value and/or destination domain."""

    def stats() -> Deferred[QueueStats]:
        """A :obj:`sendarix.model.message.QueueStats`."""

    def retry(queue_id: str, now: float) -> Deferred[int]:  # noqa: N805
        """Make every unfinished recipient of a message due at ``now``; the count."""

    def delete(queue_id: str) -> Deferred[bool]:  # noqa: N805
        """Remove a message and its body; True when it existed."""


class IEventSink(Interface):
    """Where outcome events (:obj:`sendarix.events.sinks.Event`) go."""

    def emit(event: Event) -> Deferred[None] | None:  # noqa: N805
        """Record one event; may return a Deferred that fires once it is stored."""


class ILaterEventSink(IEventSink):
    """An event sink that can also take an event to record a moment later."""

    def emit_later(event: Event) -> Deferred[None]:  # noqa: N805
        """Record ``event`` on the reactor's next pass, and in any case before any
        event emitted after this call; fires once it has been handed to the sinks
        (not once they have stored it), never failing.
        Work that must not wait for the event's sinks (a message's hand-over to
        delivery) goes first, and the order of the events stays as emitted."""


class IEventLog(IEventSink):
    """An event sink that can also be searched (the delivery log)."""

    def search(query: EventQuery) -> Deferred[EventPage]:  # noqa: N805
        """A Deferred :class:`~sendarix.model.event.EventPage` for an
        :class:`~sendarix.model.event.EventQuery`, newest first."""

    def trim(before: float) -> Deferred[int]:  # noqa: N805
        """Delete events older than ``before`` (retention); the count deleted."""


class ICredentialStore(Interface):
    """SMTP credentials and API keys: hashed secrets and their scopes."""

    def add(  # noqa: N805
        name: str,
        tenant: str,
        domains: Any = (),
        networks: Any = (),
        scopes: Any = ...,
        rate: Any = None,
        sandbox: bool = False,
    ) -> Deferred[tuple[Credential, str]]:
        """Create a credential; Deferred (Credential, secret).  The secret is shown once."""

    def get(name: str) -> Deferred[Credential | None]:  # noqa: N805
        """The :obj:`sendarix.stores.credentials.Credential` (active or revoked), or None."""

    def list(tenant: str | None = None) -> Deferred[builtins.list[Credential]]:  # noqa: N805
        """Every credential (of ``tenant`` when given)."""

    def revoke(name: str) -> Deferred[bool]:  # noqa: N805
        """Revoke at once; True when it existed."""

    def rotate(name: str) -> Deferred[str]:  # noqa: N805
        """Replace the secret; Deferred new secret (old one stops working at once)."""


class IDomainStore(Interface):
    """Sending domains and their DKIM keys (private keys encrypted with the node
    secret).  Every method returns a Deferred."""

    def add(  # noqa: N805
        domain: str, tenant: str | None, keys: Sequence[DKIMKey], now: float
    ) -> Deferred[SendingDomain]:
        """Add a domain with its keys; fails with
        :obj:`sendarix.stores.sqlite.domains.DomainExistsError` when it is already there."""

    def add_keys(domain: str, keys: Sequence[DKIMKey]) -> Deferred[SendingDomain]:  # noqa: N805
        """Add keys to a domain (rotation); the domain with all its keys.  Fails with
        :obj:`sendarix.stores.sqlite.domains.DomainNotFoundError`, or with DomainExistsError when a
        selector is taken (nothing added)."""

    def get(domain: str) -> Deferred[SendingDomain | None]:  # noqa: N805
        """The :class:`~sendarix.model.domain.SendingDomain` with its keys (in the order
        they were added), or None."""

    def list() -> Deferred[builtins.list[SendingDomain]]:  # noqa: N805
        """Every sending domain, by name."""

    def set_verified(  # noqa: N805
        domain: str, verified_at: float | None, selector: str | None = None
    ) -> Deferred[bool]:
        """Mark key ``selector`` (None: every key) verified at ``verified_at`` (None:
        not verified); True when such a key exists."""

    def remove(domain: str, selector: str | None = None) -> Deferred[bool]:  # noqa: N805
        """Forget one key (``selector``) or the whole domain; True when it existed."""


class IBearerToken(Interface):
    """twisted.cred credentials of SASL XOAUTH2: a user name and a bearer token.

    Any ``ICredentialsChecker`` for this interface registered on the submission
    portal checks XOAUTH2 logins (the built-in one is
    :obj:`sendarix.ingress.xoauth2.HMACTokenChecker`); its avatar id is the credential name."""

    username = Attribute("The user name the client claims (bytes).")
    token = Attribute("The bearer token (bytes).")


class IRateLimiter(Interface):
    """Message rates at submission, per key (a credential, a tenant, a client
    address).  Answers at once (no Deferred): the SMTP session asks it inline."""

    def allow(key, rate, period, now, burst=None):  # noqa: N805
        """True when one more event for ``key`` at ``now`` stays within ``rate``
        events per ``period`` seconds (``burst`` back to back, default ``rate``); the
        event is then counted."""


class IAuthLimiter(Interface):
    """Slows, then locks out, client addresses that keep failing AUTH."""

    def is_locked(ip: str, now: float) -> bool:  # noqa: N805
        """True while ``ip`` is locked out."""

    def delay_for(ip: str, now: float) -> float:  # noqa: N805
        """Seconds to wait before answering ``ip``'s next AUTH failure."""

    def failed(ip: str, now: float) -> None:  # noqa: N805
        """Record a failure."""

    def succeeded(ip: str, now: float) -> None:  # noqa: N805
        """Record a success (forgets earlier failures)."""


class IContentFilter(Interface):
    """Accepts, rejects or tags a message by content before it is queued."""

    name = Attribute("A short name for logs.")

    def check(context: FilterContext, body: bytes) -> Deferred[FilterVerdict]:  # noqa: N805
        """A Deferred :obj:`sendarix.model.filtering.FilterVerdict` on the message
        ``body`` (after cleanup) sent with the envelope and session facts ``context``:
        accept, accept with headers added or a new Subject, or refuse with a reply.
        It never fails: a filter that cannot answer decides by its own error policy."""


class ISubmitter(Interface):
    """The avatar of an authenticated submission client (twisted.cred): the portal
    returns the client's :obj:`sendarix.stores.credentials.Credential` under this interface."""


class IIdempotencyStore(Interface):
    """Idempotency keys of the HTTP API, shared wherever the stores are shared.

    ``scope`` keeps tenants apart (two tenants may use the same key).  Every method
    returns a Deferred.
    """

    def claim(scope, key, fingerprint, now):  # noqa: N805 - zope: no self
        """Claim ``key`` for a request with ``fingerprint``: None when the claim is new
        (the caller runs the request, then calls ``finish`` or ``release``), else the
        record already there (finished or still running).  Records older than
        ``KEY_LIFETIME`` count as absent."""

    def finish(scope, key, status, body):  # noqa: N805
        """Store the answer of the claimed request."""

    def release(scope, key):  # noqa: N805
        """Drop a claim whose request did not finish (so a retry may run it)."""

    def trim(before):  # noqa: N805
        """Delete records created before ``before``; Deferred count."""


class IWebhookOutbox(Interface):
    """The durable outbox of webhook deliveries, shared wherever the stores are shared.

    An event enters it together with its delivery-log entry (one transaction), so an
    event is queued for its endpoints exactly when it is logged.  Queued events are
    formed into batches of at most ``max_events``, once the oldest has waited
    ``fill_time`` seconds or the batch is full.  A batch is leased by one node at a
    time, like a delivery; a lease that runs out makes the batch due again.  Endpoints
    are names (``[[webhook]] name``).  Every method returns a Deferred; ``now`` and
    ``due`` are POSIX seconds.
    """

    def add(event, endpoints):  # noqa: N805 - zope: no self
        """Store ``event`` in the delivery log and queue it for each of ``endpoints``
        (a disabled endpoint is skipped), all in one transaction.  An event whose id
        is already logged is neither logged nor queued again."""

    def lease_due(node, now, limits, lease_for, fill_time, max_events):  # noqa: N805
        """Lease, for ``node`` until ``now + lease_for``, up to ``limits[endpoint]``
        batches of each endpoint named: first batches due for a retry, then new ones
        formed from queued events.  A list of
        :obj:`sendarix.model.webhook.WebhookBatch`, each endpoint's oldest first."""

    def ack(batch_id):  # noqa: N805
        """The batch was accepted by its receiver: forget it.  True when it was there."""

    def retry(batch_id, node, due, error):  # noqa: N805
        """An attempt failed: count it, and make the batch due at ``due``.  False (and
        nothing changes) unless ``node`` holds the lease."""

    def dead_letter(batch_id, node, error, now):  # noqa: N805
        """Give the batch up: it is kept, listed by ``list_dead``, until replayed.
        False unless ``node`` holds the lease."""

    def list_dead(endpoint, limit):  # noqa: N805
        """Dead batches (of ``endpoint``, or of all when None), most recent first:
        a list of :obj:`sendarix.model.webhook.DeadBatch`."""

    def replay(batch_id, now):  # noqa: N805
        """Make a dead batch due at ``now`` with a fresh attempt count (same id and
        body).  True when it was dead."""

    def disable(endpoint, reason, now):  # noqa: N805
        """Stop queueing and sending to ``endpoint`` (its receiver answered 410)."""

    def enable(endpoint):  # noqa: N805
        """Undo ``disable``; True when the endpoint was disabled."""

    def disabled():  # noqa: N805
        """Every disabled endpoint: a list of
        :obj:`sendarix.model.webhook.DisabledEndpoint`."""

    def counts(endpoint):  # noqa: N805
        """``{"queued": events not yet in a batch, "batches": live batches,
        "dead": dead batches}`` of ``endpoint``."""

    def reclaim(node):  # noqa: N805
        """Make every batch ``node`` holds a lease on due again (a restarting node takes
        back its own leases at once); the count."""

    def trim(before):  # noqa: N805
        """Delete dead batches given up before ``before``; the count."""

    def purge(endpoint):  # noqa: N805
        """Drop everything of ``endpoint`` (a removed endpoint): its queued events and
        its batches, live or dead.  ``{"queued": events, "batches": live batches,
        "dead": dead batches}`` dropped."""


class IWebhookEndpointStore(Interface):
    """Webhook endpoints added at run time (each a
    :obj:`sendarix.model.webhook.StoredWebhook`), shared wherever the stores are
    shared, so every node picks them up.  Every method returns a Deferred."""

    def add(endpoint):  # noqa: N805 - zope: no self
        """Store ``endpoint``; False (and nothing changes) when its name is taken."""

    def get(name):  # noqa: N805
        """The endpoint named ``name``, or None."""

    def list(tenant=None):  # noqa: N805
        """The endpoints of ``tenant`` (None: of every tenant), by name."""

    def remove(name):  # noqa: N805
        """Forget ``name``; True when it was there."""


class ITemplateStore(Interface):
    """Each tenant's message templates, every version kept.  Deferreds throughout."""

    def save(tenant, name, subject, text, html, now):  # noqa: N805 - zope: no self
        """Store a new version of ``name`` (version 1 when new); the saved Template."""

    def get(tenant, name, version=None):  # noqa: N805
        """The newest version of ``name`` (or ``version``), or None."""

    def list(tenant):  # noqa: N805
        """The newest version of each of the tenant's templates, by name."""

    def delete(tenant, name):  # noqa: N805
        """Delete every version of ``name``; True when there was one."""


class IStatsStore(Interface):
    """Event counts per hour, tenant, event type and provider (for ``/v1/stats``),
    shared wherever the stores are shared.  Deferreds throughout."""

    def add(counts):  # noqa: N805 - zope: no self
        """Add ``counts``: a mapping ``(hour start, tenant, type, provider) -> n``."""

    def query(since, until, tenant=None):  # noqa: N805
        """``(hour start, tenant, type, provider, n)`` rows for the hours in
        ``[since, until)``, of one tenant or (None) all."""

    def trim(before):  # noqa: N805
        """Forget hours before ``before``; Deferred count of rows removed."""


class ITenantHolds(Interface):
    """Tenants whose outgoing mail is held (complaint rate over the limit), shared
    wherever the stores are shared.  A ``tenant`` here is a hold key: a tenant's name
    (all its mail) or ``tenant/provider`` (its mail to that provider).  Deferreds
    throughout."""

    def hold(tenant, reason, now):  # noqa: N805 - zope: no self
        """Hold ``tenant``'s mail; True when it was not held already."""

    def release(tenant, now):  # noqa: N805
        """Release it (and remember when, so a guard leaves it alone for a while);
        True when it was held."""

    def all():  # noqa: N805
        """``{tenant: (reason, held since)}`` of every held tenant."""

    def released_at(tenant):  # noqa: N805
        """When ``tenant`` was last released, or None."""


class ISiteSuspensions(Interface):
    """Destinations (sites) an operator suspended, and until when, shared wherever the
    stores are shared, so that a suspension made through one node or worker holds on
    every one.  Times are POSIX seconds; Deferreds throughout."""

    def suspend(site, until):  # noqa: N805 - zope: no self
        """Send nothing to ``site`` before ``until`` (replaces an earlier suspension)."""

    def resume(site):  # noqa: N805
        """Lift ``site``'s suspension; True when there was one."""

    def active(now):  # noqa: N805
        """``{site: until}`` of the suspensions still in force at ``now`` (expired ones
        are forgotten)."""


class IDashboardSessions(Interface):
    """The dashboard's login sessions (:class:`~sendarix.model.dashboard.Session`),
    shared wherever the stores are shared, so that a login made through one worker
    or node holds on every one, and a logout on any ends it everywhere.

    Sessions are stored under :func:`~sendarix.model.dashboard.session_key` of
    their id, never the id itself.  When a session ends is the store's
    :class:`~sendarix.model.dashboard.SessionRules`.  Times are POSIX seconds;
    Deferreds throughout."""

    def create(session):  # noqa: N805 - zope: no self
        """Keep the new ``session``; forget ended sessions and, beyond the rules'
        limit, the least recently seen."""

    def get(session_id, now):  # noqa: N805
        """The live session ``session_id`` names, its ``seen`` set to ``now`` (its
        idle time starts again); None when unknown or ended (and then forgotten)."""

    def end(session_id):  # noqa: N805
        """Forget the session (a logout); True when there was one."""

    def set_flash(session_id, message):  # noqa: N805
        """Keep ``message`` for the session's next page (replaces an earlier one;
        nothing when the session is gone)."""

    def take_flash(session_id):  # noqa: N805
        """The session's message and forget it, so that it is shown once; None when
        there is none."""

    def expire(now):  # noqa: N805
        """Forget the sessions that have ended by ``now``; how many were forgotten."""


class ISuppressionStore(Interface):
    """Each tenant's suppression list: recipients that must not be sent to.

    Addresses compare case-insensitively (they are stored lowercased); tenants never
    see each other's entries.  Every method returns a Deferred.  The methods name no
    ``self``, as zope.interface expects.
    """

    def add(tenant, address, reason, source, now):  # noqa: N805 - zope: no self
        """Suppress ``address`` for ``tenant`` from ``now`` (POSIX seconds); ``source``
        is one of ``bounce``, ``expired``, ``complaint``, ``manual``, ``api``.  True when
        added; False when it was already there (a non-empty reason replaces its reason)."""

    def is_suppressed(tenant, address):  # noqa: N805
        """The :obj:`sendarix.stores.sqlite.suppression.Suppression` for ``address``, or None."""

    def remove(tenant, address):  # noqa: N805
        """Lift a suppression; True when there was one."""

    def list(tenant=None, limit=100, after=None):  # noqa: N805
        """Up to ``limit`` Suppressions in (tenant, address) order, after the key
        ``after``: an address within ``tenant``, or a ``(tenant, address)`` pair."""


class IRouter(Interface):
    """Finds where mail for a recipient domain goes."""

    def route(domain):  # noqa: N805 - zope: no self
        """Deferred :obj:`sendarix.routing.mx.Route` for ``domain`` (a DNS name or an address
        literal such as ``[192.0.2.1]``).

        Never fails for DNS trouble: the Route carries either the ordered hops to try or
        a :obj:`sendarix.routing.mx.RouteError` saying whether the failure is permanent
        (bounce) or temporary (defer), with its enhanced status code.
        """


class ITransport(Interface):
    """Carries one session's messages to one hop: SMTP over TCP, or the simulator,
    which answers inside the node.  The delivery agent picks the transport a hop
    names (:attr:`sendarix.model.session.Hop.transport`)."""

    def deliver(  # noqa: N805
        hop: Hop, messages: Sequence[OutboundMessage], options: SessionOptions
    ) -> Deferred[SessionResult]:
        """Send ``messages`` over one session to ``hop``.

        Never fails: every message and recipient gets a reply in the
        :obj:`sendarix.model.session.SessionResult` (a synthesized 4xx when the session
        broke, ``connect_error`` when none took place).
        """

    def close() -> Deferred[None]:
        """Let go of what the transport holds between sessions (resting connections,
        reports not yet made) as the node stops; fires when done."""


class ISelectiveLease(Interface):
    """A spool that can lease due deliveries while leaving some domains alone (the
    delivery agent skips the domains of sites whose ready queue is full, or that
    rest)."""

    def lease_due_except(  # noqa: N805
        node: str, now: float, limit: int, lease_for: float, skip_domains: Sequence[str]
    ) -> Deferred[list[LeasedDelivery]]:
        """As :obj:`ISpool.lease_due`, looking past the deliveries to ``skip_domains``:
        at most ``sendarix.stores.codec.look_past_limit(limit)`` of them in one call,
        so that a poll costs the same at any backlog; past that, the deliveries that
        come next are leased whatever their domain."""


class ILeasedEnqueue(Interface):
    """A spool that can store fresh mail with its deliveries already leased to the
    node that accepted it, in the same commit, so that the node's delivery agent
    takes the message from memory instead of polling the spool and reading it back
    (the active queue)."""

    def enqueue_leased(  # noqa: N805
        message: NewMessage, node: str, expires: float
    ) -> Deferred[list[LeasedDelivery]]:
        """As :obj:`ISpool.enqueue`, every delivery leased to ``node`` until
        ``expires``; fires, after the commit, with those deliveries."""


class IActiveQueue(Interface):
    """The delivery agent's side of the active queue: fresh mail handed over in
    memory when the spool commits it (:obj:`ILeasedEnqueue`)."""

    def reserve(message: NewMessage) -> Lease | None:  # noqa: N805
        """Room for ``message``'s deliveries: the lease to commit them with, or None
        (no room, not due yet, not delivering): enqueue it as usual."""

    def take(message: NewMessage, deliveries: Sequence[LeasedDelivery]) -> None:  # noqa: N805
        """The commit of a reserved message is durable: deliver ``deliveries``."""

    def cancel(message: NewMessage) -> None:  # noqa: N805
        """The commit of a reserved message failed: its room is free again."""


class IThrottle(Interface):
    """Shared pacing state for outbound delivery: connection counts and GCRA rates,
    keyed by a shaping key (a provider name, an MX site, ``source|provider``...).

    The in-memory implementation (:obj:`sendarix.routing.throttle.MemoryThrottle`) answers
    synchronously; a Redis-backed one, for several nodes sharing work, returns
    Deferreds firing with the same values.  Times are POSIX seconds.
    """

    def acquire_connection(key, limit, now):  # noqa: N805 - zope: no self
        """Take one of ``limit`` connection slots for ``key``: True when taken, False
        when ``limit`` connections are already open."""

    def release_connection(key):  # noqa: N805
        """Give back a slot taken by ``acquire_connection``."""

    def connections(key):  # noqa: N805
        """Connections open for ``key`` by this node now (for ``queue stats``)."""

    def admit(key, rate, period, now):  # noqa: N805
        """Ask to send one message under ``rate`` messages per ``period`` seconds:
        0.0 when admitted now (and counted), else the seconds to wait before asking
        again (nothing counted)."""


class IEgressSelector(Interface):
    """Picks the local source address (egress IP) a delivery leaves from."""

    def choose(pool, provider, now, today):  # noqa: N805 - zope: no self
        """The :obj:`sendarix.config.settings.EgressSourceConfig` of ``pool`` to use for mail to
        ``provider`` (a provider name or site key) at ``now`` (POSIX seconds) on
        ``today`` (a date, for warmup caps), or None when no source may send now."""

    def record_send(source, provider, today):  # noqa: N805
        """Count one message sent from ``source`` (a source name) to ``provider``
        on ``today`` against its warmup cap."""

    def penalize(source, provider, now):  # noqa: N805
        """``source`` was rate-limited or blocked by ``provider``: prefer other
        sources of the same tier for that provider for a while."""

    def remaining(source, provider, today):  # noqa: N805
        """Messages ``source`` may still send to ``provider`` on ``today`` under its
        warmup schedule; None when it has no cap."""

    def snapshot(now, today):  # noqa: N805
        """Each source's warmup cap, sends today and current marks, as JSON-able
        dicts (the routing state file, ``queue stats``)."""

    def restore(entries, written_at, today):  # noqa: N805
        """Take back a :meth:`snapshot` this node wrote before a restart; returns how
        many entries were taken (0 where the state is kept elsewhere)."""


class IFailoverStrategy(Interface):
    """Which of a route's hops to try, in which order, and what a failure does to the
    next choice (endpoint health).  Pure decisions: ``now`` is POSIX seconds."""

    def order(hops, now):  # noqa: N805 - zope: no self
        """The :obj:`sendarix.routing.mx.Hop`s to try for one connection, best first; hops
        that are resting after a failure are left out (an empty tuple when none may be
        tried now)."""

    def failed(hop, now):  # noqa: N805
        """``hop`` held no session (connection error or timeout, or 421)."""

    def succeeded(hop, now):  # noqa: N805
        """``hop`` held a session."""

    def states(now):  # noqa: N805
        """Each endpoint's health (``closed``, ``open``, ``half-open``) by name, for
        ``queue stats``; empty when the strategy keeps none."""


class IDestinationControl(Interface):
    """The delivery agent as an operator sees it: what it knows about destinations,
    and suspending one."""

    def routing_state() -> dict[str, Any]:
        """Sites (with ``held_until`` for an operator's suspension), pool endpoints'
        health and egress sources, as JSON-able values."""

    def suspend(site: str, until: float) -> None:  # noqa: N805
        """Send nothing to ``site`` before ``until`` (POSIX seconds)."""

    def resume(site: str) -> bool:  # noqa: N805
        """Lift ``site``'s suspension; False when it was not suspended."""


class IDeliveryObserver(Interface):
    """Told what the delivery agent does on the wire that no event records (for the
    metrics).  Called on the reactor thread; must not block or fail."""

    def outbound_connection(site, ok):  # noqa: N805 - zope: no self
        """A connection to one host of ``site`` (a shaping key) held a session
        (``ok``), or did not (connection error, timeout, 421 greeting)."""

    def throttle_wait(site, seconds):  # noqa: N805
        """A message for ``site`` waited ``seconds`` for the site's rate."""


class IBackend(Interface):
    """One storage backend (SQLite or Redis) and everything built on it.

    The node and the command line ask the backend for its stores and for the limits
    and routing state that must be shared wherever the stores are shared; they never
    ask which backend it is.  Opened once, closed once.
    """

    spool = Attribute("The ISpool.")
    credentials = Attribute("The ICredentialStore.")
    eventlog = Attribute("The IEventLog (the delivery log).")
    suppressions = Attribute("The ISuppressionStore.")
    domains = Attribute("The IDomainStore.")
    idempotency = Attribute("The IIdempotencyStore (HTTP API idempotency keys).")
    templates = Attribute("The ITemplateStore (message templates of the HTTP API).")
    stats = Attribute("The IStatsStore (hourly event counts).")
    holds = Attribute("The ITenantHolds (tenants whose mail is held).")
    site_suspensions = Attribute("The ISiteSuspensions (destinations an operator suspended).")
    dashboard_sessions = Attribute("The IDashboardSessions (dashboard logins).")
    outbox = Attribute("The IWebhookOutbox (webhook deliveries, written with the log).")
    webhook_endpoints = Attribute("The IWebhookEndpointStore (endpoints added at run time).")
    location = Attribute("Where the data is, for messages (a file path or a server).")
    errors = Attribute(
        "The exception types that mean the store failed (unreachable, unreadable), "
        "for callers that report them rather than crash."
    )
    shares_state = Attribute(
        "True when limits and routing state are shared by every node of the backend; "
        "False when they live in this process (and a node keeps its own state file)."
    )
    keys_checked_before_start = Attribute(
        "True when the stored DKIM keys can be checked against the node secret before "
        "the reactor runs; False when the check must wait until the stores are open."
    )

    def open(wait):  # noqa: N805
        """Open the stores (for a server: wait at most ``wait`` seconds, None for as
        long as it takes); the Deferred fails with StoreUnavailable when it cannot."""

    def close():  # noqa: N805
        """Close everything opened (queued writes finish first); Deferred."""

    def throttle(node):  # noqa: N805
        """The IThrottle for ``node``: connection caps and paced rates per site."""

    def auth_limiter(max_failures, window, lockout):  # noqa: N805
        """The IAuthLimiter: AUTH failure delays and lockouts."""

    def rate_limiter():  # noqa: N805
        """The submission rate limiter (per credential and per tenant)."""

    def egress_selector(sources):  # noqa: N805
        """The IEgressSelector over the configured egress sources."""

    def endpoint_strategy(pool):  # noqa: N805
        """The IFailoverStrategy (endpoint health) of one smarthost pool."""

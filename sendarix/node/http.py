"""The node's HTTP listener: the API (with the operations endpoints and the
dashboard) on ``[api] endpoint``, listening once the stores are open, closed before
them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.logger import Logger
from twisted.web.resource import IResource

from sendarix.cleanup.intake import Intake
from sendarix.cleanup.keyring import DomainKeyring
from sendarix.config.settings import Config
from sendarix.control.api.app import ApiApp
from sendarix.control.api.auth import ApiKeys
from sendarix.control.api.site import ApiSite, root_resource
from sendarix.control.dashboard.app import SEGMENTS, Dashboard
from sendarix.ingress.auth import CredentialChecker
from sendarix.ingress.httpsubmit import HTTPSubmission
from sendarix.interfaces import IDestinationControl, IRateLimiter
from sendarix.node.listening import PortService
from sendarix.stores.backends import Stores

log = Logger()


def make_api_site(
    config: Config,
    stores: Stores,
    intake: Intake,
    rate_limiter: IRateLimiter,
    keyring: DomainKeyring | None,
    tenant_rates: Mapping[str, tuple[float, float]],
    reactor: Any,
    extras: Mapping[str, IResource] | None = None,
    on_request: Any = None,
    secret: Any = None,
    delivery: IDestinationControl | None = None,
) -> tuple[ApiApp, ApiSite]:
    """The API's routes and the site serving them with ``extras`` (``metrics``, ...)
    and the dashboard (over ``delivery``'s destinations when given)."""
    submission = HTTPSubmission(
        intake=intake, clock=reactor, limits=config.limits, rate_limiter=rate_limiter,
        suppressions=stores.suppressions, keyring=keyring,
        require_verified_domains=config.domains.require_verified_domains,
        tenant_rates=tenant_rates,
        tenant_quotas={name: t.quota for name, t in config.tenants.items() if t.quota},
        simulator_domain=config.simulator.domain,
    )
    keys = ApiKeys(CredentialChecker(stores.credentials, reactor, required_scope=None))
    app = ApiApp(
        keys=keys,
        submission=submission, spool=stores.spool, eventlog=stores.eventlog,
        suppressions=stores.suppressions, idempotency=stores.idempotency,
        templates=stores.templates, clock=reactor, stores=stores, secret=secret,
        delivery=delivery,
        on_request=on_request,
    )
    dashboard = Dashboard(
        keys=keys, credentials=stores.credentials, spool=stores.spool,
        eventlog=stores.eventlog, suppressions=stores.suppressions, clock=reactor,
        sessions=stores.dashboard_sessions, delivery=delivery,
    )
    root = root_resource(
        app.resource(), extras or {}, pages=dashboard.resource(), page_segments=SEGMENTS
    )
    # A JSON request may be as large as a message may be (base64 counts as sent).
    site = ApiSite(root, max_body=config.limits.max_message_size, reactor=reactor)
    site.noisy = False
    return app, site


class HTTPService(PortService):
    """Listens on the API endpoint once ``ready()`` fires; stops listening on stop."""

    name = "api"

    def __init__(
        self, reactor: Any, endpoint: str, site: ApiSite, ready: Any, shared: bool = False,
        tls: Any = None,
    ) -> None:
        super().__init__(reactor, endpoint, site, ready,
                         lambda host, port: f"HTTP API on {host}:{port}", tls=tls, shared=shared)
        self.site = site

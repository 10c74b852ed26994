"""Tenants side by side: daily quotas over SMTP and the API, ``sendarix tenants`` and
``GET /v1/tenants`` (the same figures), and what each tenant's key may see."""

from __future__ import annotations

import json
import os
import smtplib
from typing import Any

from twisted.internet import reactor, task

from sendarix.ingress import policy
from tests.control.api.test_api import ApiTestCase
from tests.control.cli.test_main import _run
from tests.delivery.test_routing import start_sink
from tests.delivery.test_service import RELAY_LISTENER, wait_event
from tests.support.relay import in_thread, start_relay


class TenantTests(ApiTestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.sink = await start_sink(self, "127.0.0.3")
        self.relay = await start_relay(
            self, [{**RELAY_LISTENER, "tenant": "globex"}],
            pool={"sink": {"endpoints": [f"127.0.0.3:{self.sink.addresses[0][1]}"]}},
            route=[{"via": "pool:sink"}],
            tenant={"acme": {"quota": 2, "max_complaint_rate": "0.5%"},
                    "globex": {"quota": 1}},
        )
        self.key = await self.relay.add_credential("app", tenant="acme",
                                                   scopes=["send", "read"])
        self.other = await self.relay.add_credential("rival", tenant="globex",
                                                     scopes=["send", "read"])
        self.admin = await self.relay.add_credential("acme-admin", tenant="acme",
                                                     scopes=["admin"])
        self.operator = await self.relay.add_credential("ops", tenant="*", scopes=["admin"])
        self.base = f"http://127.0.0.1:{self.relay.api_port}"

    async def test_quotas_are_per_tenant(self) -> None:
        """acme's two messages a day over the API, then 429 quota_exceeded; globex's
        one over SMTP (the listener's tenant), then 450 4.7.1; neither touches the
        other's."""
        for _ in range(2):
            status, body, _ = await self.call("POST", "/v1/messages", self.message())
            self.assertEqual(status, 202, body)
        result = await self.call("POST", "/v1/messages", self.message())
        self.assertError(result, 429, "quota_exceeded")
        self.assertEqual(result[2].getRawHeaders("retry-after"), ["60"])

        def smtp() -> list[Any]:
            out = []
            for _ in range(2):
                with smtplib.SMTP("127.0.0.1", self.relay.ports["relay"], timeout=30) as s:
                    try:
                        s.sendmail("a@globex.test", ["b@sink.test"], b"Subject: q\r\n\r\nx\r\n")
                        out.append(250)
                    except smtplib.SMTPSenderRefused as e:
                        out.append((e.smtp_code, e.smtp_error))
            return out

        replies = await in_thread(smtp)
        self.assertEqual(replies[0], 250)
        self.assertEqual(replies[1], (450, b"4.7.1 " + policy.TENANT_QUOTA.text.encode()))

    async def test_tenants_api_and_cli_agree(self) -> None:
        """Both show acme's settings and its last day's figures; a tenant admin sees
        only its tenant."""
        await self.call("POST", "/v1/messages", self.message())
        await wait_event(self.relay, "user@sink.test", "delivered")
        await task.deferLater(reactor, 1.5, lambda: None)  # the counts are flushed
        status, body, _ = await self.call("GET", "/v1/tenants", key=self.operator)
        self.assertEqual(status, 200, body)
        by_name = {t["name"]: t for t in body["tenants"]}
        self.assertEqual(set(by_name), {"acme", "globex", "default"})
        acme = by_name["acme"]
        self.assertEqual((acme["quota"], acme["max_complaint_rate"]), (2, 0.005))
        self.assertEqual(acme["last_24h"]["delivered"], 1)
        self.assertEqual(acme["complaint_rate"], 0.0)
        self.assertFalse(acme["over_complaint_limit"])
        status, own, _ = await self.call("GET", "/v1/tenants", key=self.admin)
        self.assertEqual([t["name"] for t in own["tenants"]], ["acme"])
        self.assertError(await self.call("GET", "/v1/tenants/globex", key=self.admin),
                         404, "not_found")
        self.assertError(await self.call("GET", "/v1/tenants"), 403, "forbidden_scope")

        await self.relay.service.stopService()  # the command line opens the same file
        self.relay.service = _Stopped()
        config = os.path.join(self.relay.directory, "cli.toml")
        with open(config, "w") as f:
            f.write('[spool]\nurl = "sqlite:var/spool.db"\n'
                    '[tenant.acme]\nquota = 2\nmax_complaint_rate = "0.5%"\n'
                    '[tenant.globex]\nquota = 1\n')
        out, err, code = await _run(["--config", config, "tenants", "show", "acme", "--json"],
                                    self.relay.directory)
        self.assertEqual(code, 0, err)
        shown = json.loads(out)
        self.assertEqual(shown["last_24h"], acme["last_24h"])
        self.assertEqual(shown["credentials"], ["acme-admin", "app"])
        out, err, code = await _run(["--config", config, "tenants", "list"],
                                    self.relay.directory)
        self.assertEqual(code, 0, err)
        self.assertIn(b"acme", out)
        out, err, code = await _run(["--config", config, "tenants", "show", "nobody"],
                                    self.relay.directory)
        self.assertEqual(code, 1)
        self.assertIn(b"no tenant nobody", err)


class _Stopped:
    """Stands in for a node already stopped (the test's cleanup stops it again)."""

    def stopService(self) -> Any:  # noqa: N802
        from twisted.internet.defer import succeed

        return succeed(None)

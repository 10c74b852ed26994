"""Dashboard sessions over real HTTP across two nodes on the same stores (as two
workers on one SQLite file, or two nodes on one Redis): a login made through one is
good on the other, a message set through one is shown once on the other, and a
logout on either ends the session on both.  A session store that fails is a 503
page and no login."""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from twisted.trial import unittest

from tests.control.dashboard.test_dashboard import dashboard_request, form_token, set_cookies
from tests.delivery.test_service import RELAY_LISTENER
from tests.support.redisserver import start_redis
from tests.support.relay import Relay, start_relay, until


async def request(
    base: str, method: str, path: str, form: dict[str, str] | None = None,
    cookies: dict[str, str] | None = None,
) -> tuple[int, str, Any]:
    """(status, body text, response headers); no redirect is followed."""
    return await dashboard_request(base, method, path, form, cookies)


def base(relay: Relay) -> str:
    return f"http://127.0.0.1:{relay.api_port}"


async def login_form(relay: Relay, key: str) -> tuple[int, str, Any]:
    """POST the login form of ``relay`` with ``key``."""
    status, body, headers = await request(base(relay), "GET", "/login")
    return await request(
        base(relay), "POST", "/login", {"csrf": form_token(body), "key": key},
        cookies={"sendarix_login": set_cookies(headers)["sendarix_login"].value},
    )


class SharedSessionsMixin:
    """Mixed into a TestCase whose ``nodes()`` starts two nodes on one store."""

    async def nodes(self) -> tuple[Relay, Relay]:
        raise NotImplementedError

    async def test_login_on_one_node_holds_on_the_other(self) -> None:
        one, two = await self.nodes()
        key = await one.add_credential("ops", tenant="*", scopes=["admin"])
        status, body, headers = await login_form(one, key)
        self.assertEqual(status, 303, body)
        cookies = {"sendarix_session": set_cookies(headers)["sendarix_session"].value}
        # The other node answers the next request: the same session, its page.
        status, body, _ = await request(base(two), "GET", "/", cookies=cookies)
        self.assertEqual(status, 200, body)
        self.assertIn("ops (operator)", body)
        token = form_token(body)
        status, body, _ = await request(base(one), "GET", "/", cookies=cookies)
        self.assertEqual(form_token(body), token)
        # What an action on one did is shown once, on whichever node comes next.
        status, _, _ = await request(base(two), "POST", "/sites/resume",
                                     {"site": "gmail", "csrf": token}, cookies=cookies)
        self.assertEqual(status, 303)
        status, body, _ = await request(base(one), "GET", "/", cookies=cookies)
        self.assertIn("gmail was not suspended.", body)
        status, body, _ = await request(base(two), "GET", "/", cookies=cookies)
        self.assertNotIn("gmail was not suspended.", body)
        # A logout on the second node ends it on the first.
        status, _, headers = await request(base(two), "POST", "/logout", {"csrf": token},
                                           cookies=cookies)
        self.assertEqual((status, headers.getRawHeaders("location")), (303, ["/login"]))
        status, _, headers = await request(base(one), "GET", "/", cookies=cookies)
        self.assertEqual((status, headers.getRawHeaders("location")), (303, ["/login"]))

    async def test_revoked_on_one_node_ends_it_on_the_other(self) -> None:
        one, two = await self.nodes()
        key = await one.add_credential("ops", tenant="*", scopes=["admin"])
        _, _, headers = await login_form(two, key)
        cookies = {"sendarix_session": set_cookies(headers)["sendarix_session"].value}
        await one.stores.credentials.revoke("ops")
        status, _, _ = await request(base(one), "GET", "/", cookies=cookies)
        self.assertEqual(status, 303)
        # Ended in the stores, not only refused by the node that saw the revocation.
        self.assertFalse(await two.stores.dashboard_sessions.end(cookies["sendarix_session"]))


class SQLiteSharedSessionsTests(SharedSessionsMixin, unittest.TestCase):
    """Two nodes on one SQLite file, as the workers of one node are."""

    async def nodes(self) -> tuple[Relay, Relay]:
        one = await start_relay(self, [RELAY_LISTENER])
        path = one.config.spool.sqlite_path
        two = await start_relay(self, [], spool={"url": f"sqlite:{path}"})
        self.assertEqual(two.config.spool.sqlite_path, path)
        return one, two

    async def test_store_failure_is_an_error_page_not_a_login(self) -> None:
        """With the sessions' table unreadable, a page and a login are both the
        503 page (no traceback, no session cookie); the other stores still work."""
        one, two = await self.nodes()
        key = await one.add_credential("ops", tenant="*", scopes=["admin"])
        _, _, headers = await login_form(one, key)
        cookies = {"sendarix_session": set_cookies(headers)["sendarix_session"].value}
        await one.stores.backend.db.run(
            lambda conn: conn.execute("DROP TABLE dashboard_session")
        )
        status, body, _ = await request(base(two), "GET", "/", cookies=cookies)
        self.assertEqual(status, 503)
        self.assertIn("Stores unavailable", body)
        self.assertNotIn("Traceback", body)
        status, body, headers = await login_form(two, key)
        self.assertEqual(status, 503)
        self.assertNotIn("sendarix_session", set_cookies(headers))
        self.assertTrue(self.flushLoggedErrors(sqlite3.OperationalError))


class RedisSharedSessionsTests(SharedSessionsMixin, unittest.TestCase):
    """Two nodes on one Redis."""

    timeout = 60

    async def nodes(self) -> tuple[Relay, Relay]:
        port, self.stop_redis = start_redis(os.path.abspath(self.mktemp()))
        self.addCleanup(self.stop_redis)
        url = f"redis://127.0.0.1:{port}/0"
        one = await start_relay(self, [RELAY_LISTENER], spool={"url": url})
        two = await start_relay(self, [], spool={"url": url})
        return one, two

    async def test_redis_down_is_an_error_page_not_a_login(self) -> None:
        one, two = await self.nodes()
        key = await one.add_credential("ops", tenant="*", scopes=["admin"])
        status, body, headers = await request(base(two), "GET", "/login")
        token, login = form_token(body), set_cookies(headers)["sendarix_login"].value
        _, _, headers = await login_form(one, key)
        cookies = {"sendarix_session": set_cookies(headers)["sendarix_session"].value}
        self.stop_redis()
        await until(lambda: not two.stores.backend.redis.connected, 10, "disconnected")
        status, body, _ = await request(base(two), "GET", "/", cookies=cookies)
        self.assertEqual(status, 503)
        self.assertIn("Stores unavailable", body)
        status, body, headers = await request(
            base(two), "POST", "/login", {"csrf": token, "key": key},
            cookies={"sendarix_login": login},
        )
        self.assertEqual(status, 503)
        self.assertNotIn("sendarix_session", set_cookies(headers))

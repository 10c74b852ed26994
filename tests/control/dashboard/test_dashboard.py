"""The dashboard end to end: a running node, a sink as the destination, real HTTP
(treq) for the login, the session cookie and the form tokens, and headless Chromium
(selenium) for what an operator does: log in, find a sent message, open its timeline,
search, suspend and resume a destination.

Chromium and its driver are the system's (Debian's ``chromium`` and
``chromium-driver``); without them the browser tests are skipped, except under
``CI=true``, where that is a failure.  ``SENDARIX_UPDATE_SCREENSHOT=1`` saves the
overview as docs/dashboard.png.
"""

from __future__ import annotations

import os
import re
import shutil
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlencode

import treq
from twisted.internet import reactor
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer
from zope.interface.verify import verifyObject

from sendarix.interfaces import IDestinationControl
from sendarix.model.event import EventQuery
from tests.delivery.test_routing import start_sink
from tests.delivery.test_service import RELAY_LISTENER, wait_event
from tests.support.paths import REPO_ROOT
from tests.support.relay import HOSTNAME, Relay, in_thread, start_relay, until
from tests.support.tlsca import TestCA

SENDER = "app@sender.test"
SCREENSHOT = os.path.join(REPO_ROOT, "docs", "dashboard.png")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


class DashboardTestCase(unittest.TestCase):
    """A node whose mail goes to a sink on 127.0.0.3 (the site ``pool:sink``), with
    an operator key, an admin key of tenant ``acme`` and a sending key of ``acme``."""

    relay: Relay

    async def setUp(self) -> None:  # type: ignore[override]
        self.sink = await start_sink(self, "127.0.0.3", 0)
        port = self.sink.addresses[0][1]
        self.relay = await start_relay(
            self, [RELAY_LISTENER],
            pool={"sink": {"endpoints": [f"127.0.0.3:{port}"]}},
            route=[{"via": "pool:sink"}],
            delivery={"retry_schedule": ["1s"]},
        )
        self.sender_key = await self.relay.add_credential(
            "app", tenant="acme", scopes=["send", "read"]
        )
        self.admin_key = await self.relay.add_credential("acme-admin", tenant="acme",
                                                         scopes=["admin"])
        self.operator_key = await self.relay.add_credential("ops", tenant="*",
                                                            scopes=["admin"])
        self.base = f"http://127.0.0.1:{self.relay.api_port}"

    async def request(
        self, method: str, path: str, form: dict[str, str] | None = None,
        cookies: dict[str, str] | None = None, headers: dict[str, str] | None = None,
    ) -> tuple[int, str, Any]:
        """(status, body text, response headers); no redirect is followed."""
        return await dashboard_request(self.base, method, path, form, cookies, headers)

    async def send(self, to: str, subject: str = "Hello") -> str:
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.post(
            self.base + "/v1/messages",
            json={"from": f"App <{SENDER}>", "to": [to], "subject": subject,
                  "text": "Hi there"},
            headers={"Authorization": f"Bearer {self.sender_key}"}, pool=pool,
        )
        body = await response.json()
        self.assertEqual(response.code, 202, body)
        return str(body["id"])

    async def login(self, key: str) -> dict[str, str]:
        """Log in with ``key``: the cookies of the session."""
        status, body, headers = await self.request("GET", "/login")
        self.assertEqual(status, 200)
        token = form_token(body)
        login_cookie = set_cookies(headers)["sendarix_login"]
        status, body, headers = await self.request(
            "POST", "/login", {"csrf": token, "key": key},
            cookies={"sendarix_login": login_cookie.value},
        )
        self.assertEqual(status, 303, body)
        self.assertEqual(headers.getRawHeaders("location"), ["/"])
        return {"sendarix_session": set_cookies(headers)["sendarix_session"].value}


def form_token(body: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', body)
    assert found is not None, body
    return found.group(1)


def set_cookies(headers: Any) -> Any:
    jar: SimpleCookie = SimpleCookie()
    for raw in headers.getRawHeaders("set-cookie") or []:
        jar.load(raw)
    return jar


class LoginTests(DashboardTestCase):
    async def test_pages_need_a_login(self) -> None:
        for path in ("/", "/events", "/messages/X", "/suppressions"):
            status, _, headers = await self.request("GET", path)
            self.assertEqual((status, headers.getRawHeaders("location")), (303, ["/login"]))

    async def test_wrong_key_is_refused(self) -> None:
        status, body, headers = await self.request("GET", "/login")
        token = form_token(body)
        cookie = set_cookies(headers)["sendarix_login"].value
        for key in ("nonsense", self.operator_key + "x"):
            status, body, headers = await self.request(
                "POST", "/login", {"csrf": token, "key": key}, cookies={"sendarix_login": cookie},
            )
            self.assertEqual(status, 401)
            self.assertIn("not a valid API key", body)
            self.assertNotIn("sendarix_session", set_cookies(headers))

    async def test_key_without_admin_scope_is_refused(self) -> None:
        status, body, headers = await self.request("GET", "/login")
        status, body, headers = await self.request(
            "POST", "/login", {"csrf": form_token(body), "key": self.sender_key},
            cookies={"sendarix_login": set_cookies(headers)["sendarix_login"].value},
        )
        self.assertEqual(status, 403)
        self.assertIn("admin", body)

    async def test_login_form_needs_its_token(self) -> None:
        status, body, headers = await self.request("GET", "/login")
        status, _, _ = await self.request("POST", "/login",
                                          {"csrf": form_token(body), "key": self.operator_key})
        self.assertEqual(status, 403)

    async def test_cookie_flags(self) -> None:
        """The session cookie is HttpOnly and SameSite=Strict (Secure only over TLS);
        pages forbid framing and scripts."""
        status, body, headers = await self.request("GET", "/login")
        status, body, headers = await self.request(
            "POST", "/login", {"csrf": form_token(body), "key": self.operator_key},
            cookies={"sendarix_login": set_cookies(headers)["sendarix_login"].value},
        )
        raw = [c for c in headers.getRawHeaders("set-cookie") if c.startswith("sendarix_session=")]
        self.assertEqual(len(raw), 1)
        flags = {part.strip().lower() for part in raw[0].split(";")[1:]}
        self.assertIn("httponly", flags)
        self.assertIn("samesite=strict", flags)
        self.assertIn("path=/", flags)
        self.assertNotIn("secure", flags)
        cookie = set_cookies(headers)["sendarix_session"].value
        self.assertGreaterEqual(len(cookie), 40)
        status, body, headers = await self.request("GET", "/", cookies={"sendarix_session": cookie})
        self.assertEqual(status, 200)
        policy = headers.getRawHeaders("content-security-policy")[0]
        self.assertIn("default-src 'none'", policy)
        self.assertIn("frame-ancestors 'none'", policy)
        self.assertEqual(headers.getRawHeaders("cache-control"), ["no-store"])

    async def test_logout_ends_the_session(self) -> None:
        cookies = await self.login(self.operator_key)
        status, body, _ = await self.request("GET", "/", cookies=cookies)
        self.assertEqual(status, 200)
        status, _, headers = await self.request("POST", "/logout", {"csrf": form_token(body)},
                                                cookies=cookies)
        self.assertEqual((status, headers.getRawHeaders("location")), (303, ["/login"]))
        status, _, _ = await self.request("GET", "/", cookies=cookies)
        self.assertEqual(status, 303)

    async def test_revoked_key_ends_the_session(self) -> None:
        cookies = await self.login(self.operator_key)
        await self.relay.stores.credentials.revoke("ops")
        status, _, headers = await self.request("GET", "/", cookies=cookies)
        self.assertEqual((status, headers.getRawHeaders("location")), (303, ["/login"]))

    async def test_api_and_operations_are_unchanged(self) -> None:
        status, body, _ = await self.request("GET", "/healthz")
        self.assertEqual(status, 200)
        status, body, _ = await self.request("GET", "/v1/queue")
        self.assertEqual(status, 401)
        status, body, headers = await self.request("GET", "/static/dashboard.css")
        self.assertEqual(status, 200)
        self.assertTrue(headers.getRawHeaders("content-type")[0].startswith("text/css"))


@implementer(IPolicyForHTTPS)
class _TrustTestCA:
    """Clients that trust the test CA and expect the relay's name (whatever the
    address connected to)."""

    def __init__(self, ca_path: str) -> None:
        with open(ca_path, "rb") as f:
            self.root = Certificate.loadPEM(f.read())

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:  # noqa: N802
        return optionsForClientTLS(HOSTNAME, trustRoot=self.root)


class TLSLoginTests(unittest.TestCase):
    async def test_secure_cookie_over_tls(self) -> None:
        """Reached over TLS, the session cookie is also ``Secure``."""
        ca = TestCA(os.path.abspath(self.mktemp()))
        cert, key = ca.issue(HOSTNAME)
        relay = await start_relay(
            self, [RELAY_LISTENER],
            api={"endpoint": f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"},
        )
        operator = await relay.add_credential("ops", tenant="*", scopes=["admin"])
        agent = Agent(reactor, contextFactory=_TrustTestCA(ca.ca_path),
                      pool=HTTPConnectionPool(reactor, persistent=False))
        base = f"https://127.0.0.1:{relay.api_port}"
        response = await treq.get(base + "/login", agent=agent)
        token = form_token(await response.text("utf-8"))
        login_cookie = set_cookies(response.headers)["sendarix_login"]
        self.assertTrue(login_cookie["secure"])
        response = await treq.post(
            base + "/login", data={"csrf": token, "key": operator}, agent=agent,
            headers={"Cookie": f"sendarix_login={login_cookie.value}"}, allow_redirects=False,
        )
        await response.content()
        self.assertEqual(response.code, 303)
        (raw,) = [c for c in response.headers.getRawHeaders("set-cookie")
                  if c.startswith("sendarix_session=")]
        flags = {part.strip().lower() for part in raw.split(";")[1:]}
        self.assertTrue({"secure", "httponly", "samesite=strict"} <= flags, flags)


class ActionTests(DashboardTestCase):
    async def test_post_without_token_is_forbidden(self) -> None:
        """A form without the session's token, with another session's token, or from
        another origin changes nothing: 403."""
        cookies = await self.login(self.operator_key)
        other = await self.login(self.operator_key)
        status, body, _ = await self.request("GET", "/", cookies=other)
        other_token = form_token(body)
        status, body, _ = await self.request("GET", "/", cookies=cookies)
        token = form_token(body)
        for form, headers in (
            ({"site": "pool:sink", "for": "3600"}, None),
            ({"site": "pool:sink", "for": "3600", "csrf": other_token}, None),
            ({"site": "pool:sink", "for": "3600", "csrf": token},
             {"Origin": "http://evil.test"}),
        ):
            status, body, _ = await self.request("POST", "/sites/suspend", form, cookies=cookies,
                                                 headers=headers)
            self.assertEqual(status, 403, body)
        self.assertEqual(self.relay.service.delivery.scheduler.suspensions(0.0), {})
        status, _, _ = await self.request("POST", "/sites/suspend",
                                          {"site": "pool:sink", "for": "3600", "csrf": token})
        self.assertEqual(status, 403)  # no session at all

    async def test_suspend_and_resume(self) -> None:
        cookies = await self.login(self.operator_key)
        status, body, _ = await self.request("GET", "/", cookies=cookies)
        token = form_token(body)
        status, _, _ = await self.request(
            "POST", "/sites/suspend", {"site": "pool:sink", "for": "3600", "csrf": token},
            cookies=cookies,
        )
        self.assertEqual(status, 303)
        delivery = self.relay.service.delivery
        verifyObject(IDestinationControl, delivery)
        (site,) = [s for s in delivery.routing_state()["sites"] if s["site"] == "pool:sink"]
        self.assertLess(abs(site["held_until"] - (reactor.seconds() + 3600)), 30)
        # Mail for the site waits meanwhile: deferred, not sent.
        await self.send("held@sink.test")
        event = await wait_event(self.relay, "held@sink.test", "deferred")
        self.assertIn("suspended by the operator", event.response.text)
        self.assertEqual(self.sink.stats.messages, 0)
        status, body, _ = await self.request("GET", "/", cookies=cookies)
        self.assertIn('id="resume-pool:sink"', body)
        status, _, _ = await self.request(
            "POST", "/sites/resume", {"site": "pool:sink", "csrf": token}, cookies=cookies,
        )
        self.assertEqual(status, 303)
        self.assertEqual(delivery.scheduler.suspensions(reactor.seconds()), {})
        await self.sink.wait_for(1, timeout=15)

    async def test_tenant_admin_sees_only_its_tenant(self) -> None:
        queue_id = await self.send("user@sink.test")
        await wait_event(self.relay, "user@sink.test", "delivered")
        cookies = await self.login(self.admin_key)
        status, body, _ = await self.request("GET", "/", cookies=cookies)
        self.assertEqual(status, 200)
        self.assertIn(queue_id, body)
        self.assertNotIn("suspend-form", body)  # destinations are the operator's
        token = form_token(body)
        status, _, _ = await self.request(
            "POST", "/sites/suspend", {"site": "pool:sink", "for": "3600", "csrf": token},
            cookies=cookies,
        )
        self.assertEqual(status, 403)
        status, body, _ = await self.request("GET", "/events?tenant=globex", cookies=cookies)
        self.assertIn(queue_id, body)
        # Another tenant's message is not there for this key, nor its events.
        self.sender_key = await self.relay.add_credential("rival", tenant="globex",
                                                          scopes=["send"])
        theirs = await self.send("rival@sink.test")
        await wait_event(self.relay, "rival@sink.test", "delivered")
        status, _, _ = await self.request("GET", f"/messages/{theirs}", cookies=cookies)
        self.assertEqual(status, 404)
        status, body, _ = await self.request("GET", "/events", cookies=cookies)
        self.assertNotIn(theirs, body)
        status, _, _ = await self.request("POST", f"/messages/{theirs}/retry", {"csrf": token},
                                          cookies=cookies)
        self.assertEqual(status, 404)

    async def test_retry_delete_and_suppression(self) -> None:
        await self.relay.stores.suppressions.add("acme", "gone@sink.test", "bounced", "api",
                                                 reactor.seconds())
        cookies = await self.login(self.operator_key)
        status, body, _ = await self.request("GET", "/suppressions", cookies=cookies)
        self.assertIn("gone@sink.test", body)
        token = form_token(body)
        status, _, _ = await self.request(
            "POST", "/suppressions/remove",
            {"address": "gone@sink.test", "tenant": "acme", "csrf": token}, cookies=cookies,
        )
        self.assertEqual(status, 303)
        self.assertIsNone(await self.relay.stores.suppressions.is_suppressed(
            "acme", "gone@sink.test"))
        # A queued message (its site suspended) is retried, then deleted.
        self.relay.service.delivery.suspend("pool:sink", reactor.seconds() + 600)
        queue_id = await self.send("later@sink.test")
        await wait_event(self.relay, "later@sink.test", "deferred")
        status, body, _ = await self.request("GET", f"/messages/{queue_id}", cookies=cookies)
        self.assertEqual(status, 200)
        self.assertIn('id="retry"', body)
        status, _, headers = await self.request(
            "POST", f"/messages/{queue_id}/retry", {"csrf": token}, cookies=cookies)
        self.assertEqual((status, headers.getRawHeaders("location")),
                         (303, [f"/messages/{queue_id}"]))
        status, _, _ = await self.request(
            "POST", f"/messages/{queue_id}/delete", {"csrf": token}, cookies=cookies)
        self.assertEqual(status, 303)
        self.assertIsNone(await self.relay.stores.spool.get(queue_id))

    async def test_values_are_escaped(self) -> None:
        cookies = await self.login(self.operator_key)
        status, body, _ = await self.request(
            "GET", "/events?" + urlencode({"recipient": '"><script>alert(1)</script>'}),
            cookies=cookies,
        )
        self.assertEqual(status, 200)
        self.assertNotIn("<script>", body)
        self.assertIn("&lt;script&gt;", body)


class BrowserTests(DashboardTestCase):
    """What an operator does, in headless Chromium."""

    def setUp(self) -> Any:
        if CHROMIUM is None or CHROMEDRIVER is None:
            if os.environ.get("CI") == "true":
                self.fail("CI: chromium and chromedriver are required (apt-get install "
                          "chromium chromium-driver)")
            raise unittest.SkipTest("chromium or chromedriver is not installed")
        try:
            import selenium  # noqa: F401
        except ImportError:
            if os.environ.get("CI") == "true":
                raise
            raise unittest.SkipTest("selenium is not installed") from None
        return super().setUp()

    async def test_operator_session(self) -> None:
        queue_id = await self.send("user@sink.test", "Quarterly report")
        await wait_event(self.relay, "user@sink.test", "delivered")
        # Some other outcomes for the charts (the simulator answers for its domain).
        for local in ("bounce", "defer", "success", "success"):
            await self.send(f"{local}@simulator.sendarix.invalid")
        await until(lambda: self.relay.stores.eventlog.search(
            EventQuery(type="bounced")).addCallback(lambda p: bool(p.events)), 10, "no bounce")
        browser = await in_thread(Browser, self.base)
        self.addCleanup(in_thread, browser.quit)
        await in_thread(browser.log_in, self.operator_key)
        await in_thread(browser.follow_message, queue_id)
        await in_thread(browser.search, queue_id)
        await in_thread(browser.suspend)
        # Mail for the suspended destination waits in the queue, deferred.
        held = await self.send("later@sink.test", "Held back")
        await wait_event(self.relay, "later@sink.test", "deferred")
        await in_thread(browser.see_queued, held)
        await in_thread(browser.resume)
        self.assertEqual(self.relay.service.delivery.scheduler.suspensions(reactor.seconds()), {})
        await wait_event(self.relay, "later@sink.test", "delivered", timeout=15)


class Browser:
    """Headless Chromium on the dashboard (blocking: each step runs in a thread while
    the node serves)."""

    def __init__(self, base: str) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        assert CHROMIUM is not None and CHROMEDRIVER is not None
        options.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1400,1000", "--hide-scrollbars"):
            options.add_argument(flag)
        self.base = base
        self.driver = webdriver.Chrome(options=options,
                                       service=Service(executable_path=CHROMEDRIVER))
        self.driver.implicitly_wait(5)

    def quit(self) -> None:
        self.driver.quit()

    def find(self, how: str, what: str, within: Any = None) -> Any:
        return (within or self.driver).find_element(how, what)

    def click(self, element: Any) -> None:
        """Click and wait for the next page to replace this one."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        page = self.driver.find_element(By.TAG_NAME, "html")
        element.click()
        # While the old page is being torn down Chromium may answer "node does not
        # belong to the document" instead of "stale": that is gone too.
        WebDriverWait(self.driver, 10, ignored_exceptions=[WebDriverException]).until(
            expected_conditions.staleness_of(page)
        )

    def log_in(self, key: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver.get(self.base + "/")
        assert self.driver.current_url.endswith("/login"), self.driver.current_url
        self.find(By.ID, "key").send_keys(key)
        self.click(self.find(By.ID, "login"))
        assert self.driver.current_url == self.base + "/", self.driver.current_url

    def follow_message(self, queue_id: str) -> None:
        """The sent message is among the recent events; its timeline opens."""
        from selenium.webdriver.common.by import By

        recent = self.find(By.ID, "recent-events")
        assert queue_id in recent.text, recent.text
        self.click(self.find(By.LINK_TEXT, queue_id, recent))
        timeline = self.find(By.ID, "timeline").text
        assert "accepted" in timeline and "delivered" in timeline, timeline
        assert "user@sink.test" in self.find(By.TAG_NAME, "main").text

    def search(self, queue_id: str) -> None:
        """A search by recipient finds that message, and only it."""
        from selenium.webdriver.common.by import By

        self.click(self.find(By.LINK_TEXT, "Events"))
        self.find(By.ID, "search-recipient").send_keys("user@sink.test")
        self.click(self.find(By.ID, "search"))
        found = self.find(By.ID, "events").text
        assert queue_id in found and "simulator" not in found, found

    def suspend(self) -> None:
        from selenium.webdriver.common.by import By

        self.click(self.find(By.LINK_TEXT, "Overview"))
        self.click(self.find(By.ID, "suspend-pool:sink"))
        assert "is suspended" in self.find(By.ID, "flash").text

    def see_queued(self, queue_id: str) -> None:
        """The overview shows the waiting message and the suspended destination (and
        is the screenshot, when asked for)."""
        from selenium.webdriver.common.by import By

        self.driver.get(self.base + "/")
        assert self.find(By.ID, "depth-deferred").text.split()[0] == "1"
        assert "suspended" in self.find(By.ID, "sites").text
        if os.environ.get("SENDARIX_UPDATE_SCREENSHOT") == "1":
            height = self.driver.execute_script("return document.documentElement.scrollHeight")
            self.driver.set_window_size(1400, int(height) + 40)
            self.driver.save_screenshot(SCREENSHOT)
            self.driver.set_window_size(1400, 1000)

    def resume(self) -> None:
        from selenium.webdriver.common.by import By

        self.click(self.find(By.ID, "resume-pool:sink"))
        assert "is resumed" in self.find(By.ID, "flash").text
        self.find(By.ID, "suspend-pool:sink")


async def dashboard_request(
    base: str, method: str, path: str, form: dict[str, str] | None = None,
    cookies: dict[str, str] | None = None, headers: dict[str, str] | None = None,
) -> tuple[int, str, Any]:
    """One request to the dashboard at ``base``: (status, body text, response
    headers); no redirect is followed, no connection kept."""
    sent = dict(headers or {})
    if cookies:
        sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    data = None
    if form is not None:
        sent["Content-Type"] = "application/x-www-form-urlencoded"
        data = urlencode(form).encode()
    pool = HTTPConnectionPool(reactor, persistent=False)
    response = await treq.request(method, base + path, data=data, headers=sent,
                                  pool=pool, allow_redirects=False)
    return response.code, await response.text("utf-8"), response.headers

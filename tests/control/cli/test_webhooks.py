"""``sendarix webhooks``: endpoints and their outbox, adding, testing and removing
endpoints, dead letters, replay, enable; run as subprocesses on a SQLite file this
test prepares and inspects."""

from __future__ import annotations

import json
import os
import time

from standardwebhooks.webhooks import Webhook
from twisted.internet import reactor as _reactor
from twisted.trial.unittest import TestCase

from sendarix.config.loader import load_config
from sendarix.events.webhooks.signature import generate_secret
from sendarix.model.event import Event
from sendarix.stores.backends import Stores, open_stores
from tests.control.cli.test_main import CONFIG, _run, _write_config
from tests.support.webhooks import Answer, Receiver

WEBHOOKS = CONFIG + """
[[webhook]]
name = "hook"
tenant = "acme"
url = "https://hooks.acme.example/x"
events = ["delivered"]
secret_env = "NOT_NEEDED_BY_THE_COMMAND"

[[webhook]]
name = "gone"
tenant = "acme"
url = "https://old.acme.example/x"
"""


class WebhookCommandTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.folder = os.path.abspath(self.mktemp())
        self.config = _write_config(self.folder, text=WEBHOOKS)

    async def _stores(self) -> Stores:
        stores = open_stores(load_config(self.config), _reactor, json_log=False)
        await stores.open()
        return stores

    async def cli(self, *args: str, status: int = 0) -> str:
        out, err, code = await _run([*args, "--config", self.config], self.folder)
        self.assertEqual(code, status, (args, err))
        return (err if status else out).decode()

    async def test_list_dead_replay_enable(self) -> None:
        now = time.time()
        stores = await self._stores()
        await stores.outbox.add(
            Event.make("delivered", now - 10, queue_id="Q1", tenant="acme"), ["hook"]
        )
        await stores.outbox.add(
            Event.make("delivered", now - 10, queue_id="Q2", tenant="acme"), ["hook"]
        )
        (batch,) = await stores.outbox.lease_due("n1", now, {"hook": 1}, 60.0, 1.0, 1)
        await stores.outbox.dead_letter(batch.id, "n1", "HTTP 500", now)
        await stores.outbox.disable("gone", "HTTP 410 Gone", now)
        await stores.close()

        listed = json.loads(await self.cli("webhooks", "list", "--json"))
        self.assertEqual(
            [(e["name"], e["queued"], e["batches"], e["dead"], e["disabled_reason"])
             for e in listed],
            [("hook", 1, 0, 1, None), ("gone", 0, 0, 0, "HTTP 410 Gone")],
        )  # fmt: skip
        table = await self.cli("webhooks", "list")
        self.assertIn("disabled", table.splitlines()[2])

        (dead,) = json.loads(await self.cli("webhooks", "dead", "--json"))
        self.assertEqual((dead["id"], dead["error"], dead["events"]), (batch.id, "HTTP 500", 1))
        self.assertIn(batch.id, await self.cli("webhooks", "dead", "--endpoint", "hook"))

        self.assertIn(f"replaying {batch.id}", await self.cli("webhooks", "replay", batch.id))
        err = await self.cli("webhooks", "replay", batch.id, status=1)
        self.assertIn("not dead-lettered", err)
        self.assertIn("no dead-lettered", await self.cli("webhooks", "dead"))
        await self.cli("webhooks", "enable", "gone")
        self.assertIn("not disabled", await self.cli("webhooks", "enable", "gone", status=1))

        stores = await self._stores()
        self.addCleanup(stores.close)
        self.assertEqual(await stores.outbox.disabled(), [])
        (again,) = await stores.outbox.lease_due("n1", time.time(), {"hook": 1}, 60.0, 1.0, 1)
        self.assertEqual((again.id, again.body), (batch.id, batch.body))


MANAGED = CONFIG + """
[tenant.acme]

[webhooks]
allow_private = true

[[webhook]]
name = "cfg-hook"
tenant = "acme"
url = "http://127.0.0.1:9/cfg"
events = ["bounced"]
secret_env = "SENDARIX_TEST_CLI_HOOK"
"""


class WebhookManagementTests(TestCase):
    """``webhooks add|list|test|remove`` on the same stores, with the node secret in
    the environment and loopback receivers answering 200 and 500."""

    timeout = 60

    def setUp(self) -> None:
        from tests.cleanup.test_domains import SECRET

        self.patch(os, "environ", dict(os.environ, SENDARIX_SECRET_KEY=SECRET,
                                       SENDARIX_TEST_CLI_HOOK=generate_secret()))
        self.folder = os.path.abspath(self.mktemp())
        self.config = _write_config(self.folder, text=MANAGED)
        self.ok = self.receiver((200, {}))
        self.broken = self.receiver((500, {}))

    def receiver(self, answer: Answer) -> Receiver:
        receiver = Receiver(_reactor, lambda r: answer)
        port = _reactor.listenTCP(0, receiver.site(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        receiver.url = f"http://127.0.0.1:{port.getHost().port}/hook"
        return receiver

    async def cli(self, *args: str, status: int = 0) -> str:
        out, err, code = await _run([*args, "--config", self.config], self.folder)
        self.assertEqual(code, status, (args, out, err))
        return (err if status else out).decode()

    async def test_add_list_test_remove(self) -> None:
        made = json.loads(await self.cli(
            "webhooks", "add", "--tenant", "acme", "--url", self.ok.url,
            "--event", "delivered", "--event", "bounced", "--json"))
        self.assertEqual((made["tenant"], made["events"], made["source"]),
                         ("acme", ["bounced", "delivered"], "stored"))
        name, secret = made["name"], made["secret"]
        self.assertTrue(secret.startswith("whsec_"))
        text = await self.cli("webhooks", "add", "--tenant", "acme", "--url", self.broken.url,
                              "--event", "*")
        lines = text.splitlines()
        self.assertTrue(lines[0].startswith("name: wh_"), text)
        self.assertTrue(lines[1].startswith("secret: whsec_"), text)
        broken = lines[0].removeprefix("name: ")

        listed = json.loads(await self.cli("webhooks", "list", "--json"))
        self.assertEqual({(r["name"], r["source"]) for r in listed},
                         {("cfg-hook", "config"), (name, "stored"), (broken, "stored")})
        self.assertNotIn(secret, json.dumps(listed))
        self.assertEqual(json.loads(await self.cli("webhooks", "list", "--tenant", "globex",
                                                   "--json")), [])
        self.assertIn("stored", await self.cli("webhooks", "list"))

        # A test POST, signed with the secret add printed; exit 1 on a 500.
        out = await self.cli("webhooks", "test", name)
        self.assertIn("answered HTTP 200", out)
        (probe,) = self.ok.received
        body = Webhook(secret).verify(probe.body, probe.headers)
        self.assertEqual((body["type"], body["data"]["endpoint"]), ("test", name))
        err = await self.cli("webhooks", "test", broken, status=1)
        self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertIn("HTTP 500", err)
        self.assertEqual(len(self.broken.received), 1)
        err = await self.cli("webhooks", "test", "cfg-hook", status=1)
        self.assertIn("ConnectionRefused", err)

        # Removing drops what was queued for it and says how much.
        await open_and_queue(self.config, name)
        out = await self.cli("webhooks", "remove", name)
        self.assertIn(f"removed webhook {name}; dropped 2 queued events", out)
        err = await self.cli("webhooks", "remove", "cfg-hook", status=1)
        self.assertIn("[[webhook]]", err)
        self.assertIn("not found", await self.cli("webhooks", "remove", name, status=1))
        self.assertIn("not found", await self.cli("webhooks", "test", name, status=1))
        listed = json.loads(await self.cli("webhooks", "list", "--json"))
        self.assertEqual({r["name"] for r in listed}, {"cfg-hook", broken})
        stores = await reopen(self.config)
        self.addCleanup(stores.close)
        self.assertEqual(await stores.outbox.counts(name), {"queued": 0, "batches": 0, "dead": 0})
        self.assertIsNone(await stores.webhook_endpoints.get(name))

    async def test_refusals(self) -> None:
        for args, fragment in (
            (["--url", "ftp://x.example/", "--event", "delivered"], "url:"),
            (["--url", "http://h.example/", "--event", "opened"], "events:"),
            (["--url", "http://h.example/", "--event", "delivered", "--retry-schedule",
              "5m,1m"], "retry_schedule[1]"),
        ):
            err = await self.cli("webhooks", "add", "--tenant", "acme", *args, status=1)
            self.assertIn(fragment, err)
        err = await self.cli("webhooks", "add", "--tenant", "nosuch", "--url",
                             "http://h.example/", "--event", "delivered", status=1)
        self.assertIn("tenant: no tenant 'nosuch'", err)
        os.environ.pop("SENDARIX_SECRET_KEY")
        err = await self.cli("webhooks", "add", "--tenant", "acme", "--url",
                             "http://h.example/", "--event", "delivered", status=1)
        self.assertIn("node secret is not set", err)
        self.assertEqual(json.loads(await self.cli("webhooks", "list", "--json"))[0]["name"],
                         "cfg-hook")


async def reopen(config: str) -> Stores:
    stores = open_stores(load_config(config), _reactor, json_log=False)
    await stores.open()
    return stores


async def open_and_queue(config: str, name: str) -> None:
    """Queue two events for ``name`` (as a node would), then close the stores."""
    stores = await reopen(config)
    try:
        for queue_id in ("Q1", "Q2"):
            await stores.outbox.add(
                Event.make("delivered", time.time(), queue_id=queue_id, tenant="acme"), [name]
            )
    finally:
        await stores.close()

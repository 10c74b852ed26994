"""``sendarix webhooks``: endpoints and their outbox, dead letters, replay, enable; run
as subprocesses on a SQLite file this test prepares and inspects."""

from __future__ import annotations

import json
import os
import time

from twisted.internet import reactor as _reactor
from twisted.trial.unittest import TestCase

from sendarix.config.loader import load_config
from sendarix.model.event import Event
from sendarix.stores.backends import Stores, open_stores
from tests.control.cli.test_main import CONFIG, _run, _write_config

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

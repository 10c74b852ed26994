"""Tests for sendarix.routing.state: the delivery agent's routing snapshot and how
``sendarix queue stats`` shows it."""

from __future__ import annotations

import json
import os
from typing import Any

from attrs import evolve
from twisted.trial import unittest

from sendarix.config.loader import load_config
from sendarix.routing.state import (
    discard_other_layouts,
    format_state,
    read_state,
    read_states,
    state_path,
    write_state,
)
from tests.control.cli.test_main import CONFIG, _run, _write_config
from tests.delivery.test_routing import SENDER, start_sink
from tests.delivery.test_service import RELAY_LISTENER, submit, wait_event
from tests.support.relay import in_thread, start_relay


class RoutingStateTests(unittest.TestCase):
    """A node's routing state after a failover, written and shown by the CLI."""

    async def test_snapshot_and_cli(self) -> None:
        """After a pool failover the snapshot shows the failed endpoint open, the
        site, and the egress source's sends today; ``queue stats`` prints them."""
        sink = await start_sink(self, "127.0.0.3")
        port = sink.addresses[0][1]
        relay = await start_relay(
            self,
            [RELAY_LISTENER],
            pool={"relays": {"endpoints": [
                {"host": "127.0.0.5", "port": port, "priority": 1},
                {"host": "127.0.0.3", "port": port, "priority": 2},
            ]}},
            route=[{"via": "pool:relays"}],
            egress={"source": [{"name": "ip10", "address": "127.0.0.10"}]},
        )
        await in_thread(submit, relay.ports["relay"], SENDER, ["user@anywhere.test"])
        await wait_event(relay, "user@anywhere.test", "delivered")
        delivery: Any = relay.service.delivery
        state = delivery.routing_state()
        self.assertEqual(state["node"], "test-node")
        self.assertEqual(state["pools"]["relays"][f"relays/127.0.0.5:{port}"], "open")
        self.assertEqual(state["pools"]["relays"][f"relays/127.0.0.3:{port}"], "closed")
        (site,) = state["sites"]
        self.assertEqual(site["site"], "pool:relays")
        self.assertEqual(site["queued"], 0)
        (source,) = state["egress"]
        self.assertEqual(source["sent_today"], {"pool:relays": 1})
        lines = "\n".join(format_state(state, state["written_at"]))
        self.assertIn(f"relays/127.0.0.5:{port} open", lines)
        self.assertIn("egress ip10 (127.0.0.10", lines)
        self.assertIn("pool:relays: 0/", lines)
        self.assertIn("queued 0", lines)

        await delivery._write_state()
        written = read_state(state_path(relay.config))
        assert written is not None
        self.assertEqual(written["pools"], state["pools"])

        folder = os.path.abspath(self.mktemp())
        _write_config(folder, "cli.toml", CONFIG)
        write_state(os.path.join(folder, "var", "routing-state.json"), state)
        out, err, code = await _run(["--config", "cli.toml", "queue", "stats"], folder)
        self.assertEqual(code, 0, err)
        self.assertIn(b"routing state of node test-node", out)
        self.assertIn(b"pool relays:", out)
        out, err, code = await _run(["--config", "cli.toml", "queue", "stats", "--json"], folder)
        self.assertEqual(code, 0, err)
        self.assertEqual([r["pools"] for r in json.loads(out)["routing"]], [state["pools"]])

    async def test_each_worker_its_own_file(self) -> None:
        """Workers write one file each, named after them (a shared one would hold the
        last writer's counts); ``queue stats`` shows every worker's, newest first."""
        folder = os.path.abspath(self.mktemp())
        _write_config(folder, "cli.toml", CONFIG)
        config = load_config(os.path.join(folder, "cli.toml"))
        self.assertEqual(state_path(config), os.path.join(folder, "var", "routing-state.json"))
        paths = []
        for index, written_at in ((1, 100.0), (2, 200.0)):
            worker = evolve(config, node=evolve(
                config.node, name=f"{config.node.name}-w{index}", workers=2))
            paths.append(state_path(worker))
            write_state(paths[-1], {"node": worker.node.name, "written_at": written_at,
                                    "sites": [], "pools": {}, "egress": []})
        self.assertEqual(len(set(paths)), 2)
        self.assertNotIn(os.path.join(folder, "var", "routing-state.json"), paths)
        self.assertEqual([s["node"] for s in read_states(config)],
                         ["clitest-w2", "clitest-w1"])
        out, err, code = await _run(["--config", "cli.toml", "queue", "stats"], folder)
        self.assertEqual(code, 0, err)
        self.assertIn(b"routing state of node clitest-w1", out)
        self.assertIn(b"routing state of node clitest-w2", out)

    def test_other_layouts_discarded(self) -> None:
        """A node started with N workers removes the single process's file and the
        files of workers beyond N; started as one process, every worker's file.
        Another node's files and other files stay."""
        folder = os.path.abspath(self.mktemp())
        _write_config(folder, "cli.toml", CONFIG)
        config = load_config(os.path.join(folder, "cli.toml"))
        var = os.path.join(folder, "var")
        names = ["routing-state.json", "routing-state-clitest-w1.json",
                 "routing-state-clitest-w2.json", "routing-state-clitest-w3.json",
                 "routing-state-other-w1.json", "routing-state-clitest-wx.json",
                 "spool.db"]

        def lay_out() -> None:
            os.makedirs(var, exist_ok=True)
            for name in names:
                with open(os.path.join(var, name), "w") as f:
                    f.write("{}")

        lay_out()
        removed = discard_other_layouts(config, 2)
        self.assertEqual(sorted(os.path.basename(p) for p in removed),
                         ["routing-state-clitest-w3.json", "routing-state.json"])
        self.assertEqual(sorted(os.listdir(var)), sorted(
            set(names) - {"routing-state-clitest-w3.json", "routing-state.json"}))
        lay_out()
        removed = discard_other_layouts(config, 1)
        self.assertEqual(sorted(os.path.basename(p) for p in removed), [
            "routing-state-clitest-w1.json", "routing-state-clitest-w2.json",
            "routing-state-clitest-w3.json"])
        self.assertIn("routing-state.json", os.listdir(var))
        self.assertEqual(discard_other_layouts(config, 1), [])

    def test_site_line(self) -> None:
        """A site's line shows open connections, the cap per source when set, the
        window, the ready queue and the rate."""
        site = {"site": "gmail", "open": 2, "max_connections": 20,
                "max_connections_per_source": 5, "window": 5, "queued": 42,
                "rate": 300.0, "period": 60.0, "throttled": 1, "suspended_until": None}
        line = format_state({"node": "n", "written_at": 0.0, "sites": [site]}, 0.0)[2]
        self.assertEqual(
            line.strip(),
            "gmail: 2/20 (5 per source), window 5, queued 42, rate 300/60s, throttled 1",
        )

    def test_operator_suspension_shown(self) -> None:
        site = {"site": "gmail", "open": 0, "max_connections": 20, "window": 5,
                "queued": 0, "rate": None, "throttled": 0, "suspended_until": None,
                "held_until": 900.0}
        line = format_state({"node": "n", "written_at": 0.0, "sites": [site]}, 0.0)[2]
        self.assertTrue(line.endswith(", suspended by the operator for 900 s"), line)

    def test_unreadable(self) -> None:
        """A missing or foreign file reads as no state."""
        path = os.path.abspath(self.mktemp())
        self.assertIsNone(read_state(path))
        with open(path, "w") as f:
            f.write('{"version": 99}')
        self.assertIsNone(read_state(path))

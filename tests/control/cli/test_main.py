"""Tests for the ``sendarix`` command (sendarix.control.cli.main).

Commands that only parse arguments or read the configuration never start a reactor,
so they run in-process through ``main()``.  Commands that open the stores run under
``task.react``, which cannot share trial's running reactor: they run as
``python -m sendarix.control.cli`` subprocesses on a temporary configuration, and the test
prepares or inspects the same SQLite file through :obj:`Stores` in this process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sendarix.config.loader import load_config
from sendarix.control.cli.main import (
    CommandError,
    main,
    parse_time,
    render_table,
)
from sendarix.control.cli.queue import _queue_delete, _queue_retry
from sendarix.ingress.auth import CredentialChecker
from sendarix.ingress.queueid import QueueIdGenerator
from sendarix.model.event import Event, format_timestamp
from sendarix.model.message import Envelope, MessageMeta, NewMessage, Reply
from sendarix.stores.backends import Stores, open_stores
from tests.support.paths import REPO_ROOT

ROOT = REPO_ROOT

CONFIG = """\
[node]
name = "clitest"

[spool]
url = "sqlite:var/spool.db"

[events]
json_log = false
"""


def _write_config(folder: str, name: str = "cli.toml", text: str = CONFIG) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def _run(args: list[str], cwd: str) -> Deferred[tuple[bytes, bytes, int]]:
    """Run ``python -m sendarix.control.cli ARGS`` in ``cwd``: (stdout, stderr, exit status)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    return getProcessOutputAndValue(
        sys.executable, ["-m", "sendarix.control.cli", *args], env=env, path=cwd
    )


class InProcessTests(SynchronousTestCase):
    """Parsing, configuration and usage errors: ``main()`` called directly."""

    def setUp(self) -> None:
        self.out = io.StringIO()
        self.err = io.StringIO()
        self.patch(sys, "stdout", self.out)
        self.patch(sys, "stderr", self.err)
        self.folder = os.path.abspath(self.mktemp())
        self.config = _write_config(self.folder)

    def assertUserError(self, argv: list[str], *fragments: str) -> str:
        """``argv`` exits 1 with one stderr line containing every fragment."""
        self.assertEqual(main(argv), 1)
        lines = self.err.getvalue().splitlines()
        self.assertEqual(len(lines), 1, lines)
        for fragment in fragments:
            self.assertIn(fragment, lines[0])
        self.assertEqual(self.out.getvalue(), "")
        return lines[0]

    def test_config_check_before_command(self) -> None:
        """``--config PATH config check`` describes that file and says it is OK."""
        self.assertEqual(main(["--config", self.config, "config", "check"]), 0)
        out = self.out.getvalue()
        self.assertIn(f"configuration: {self.config}", out)
        self.assertIn(os.path.join(self.folder, "var", "spool.db"), out)
        self.assertTrue(out.endswith("configuration OK\n"))
        self.assertEqual(self.err.getvalue(), "")

    def test_config_check_after_command(self) -> None:
        """``--config`` after the command (either spelling) is the same option."""
        self.assertEqual(main(["config", "check", f"--config={self.config}"]), 0)
        self.assertIn(f"configuration: {self.config}", self.out.getvalue())

    def test_config_check_bad_key(self) -> None:
        """A bad key exits 1 with one line naming the key."""
        bad = _write_config(self.folder, "bad.toml", CONFIG + 'colour = "blue"\n')
        line = self.assertUserError(["config", "check", "--config", bad], "configuration error")
        self.assertIn("colour: unknown key", line)

    def test_config_missing_file(self) -> None:
        """A configuration file that does not exist is a user error for every command."""
        missing = os.path.join(self.folder, "nope.toml")
        self.assertUserError(["queue", "list", "--config", missing], missing)

    def test_version(self) -> None:
        """``--version`` prints the version and exits 0."""
        self.assertEqual(main(["--version"]), 0)
        self.assertRegex(self.out.getvalue(), r"^sendarix \d+\.\d+\.\d+")

    def test_usage_errors(self) -> None:
        """Bad arguments exit 1 with one line naming the option, before any store opens."""
        cases = [
            (["credentials", "add", "x", "--tenant", "t", "--scope", "smtp,fly"], "fly"),
            (["credentials", "add", "x", "--tenant", "t", "--allow-ip", "10.0.0.1/33"], "33"),
            (["credentials", "add", "x"], "--tenant"),
            (["queue", "list", "--limit", "0"], "--limit"),
            (["log", "search", "--since", "yesterday"], "--since"),
            (["log", "search", "--type", "opened"], "--type"),
            (["queue"], "ACTION"),
            ([], "COMMAND"),
        ]
        for argv, fragment in cases:
            self.err.seek(0)
            self.err.truncate()
            self.assertUserError(["--config", self.config, *argv], fragment)
        self.assertFalse(os.path.exists(os.path.join(self.folder, "var")))

    def test_sink_dispatch(self) -> None:
        """``sink`` hands the rest of the line to sendarix.control.cli.sink untouched, also after
        ``--config``, without reading the configuration."""
        missing = os.path.join(self.folder, "nope.toml")
        for argv in (["sink", "--no-such-option"], ["--config", missing, "sink", "--bogus"]):
            self.err.seek(0)
            self.err.truncate()
            self.assertEqual(main(argv), 1)
            self.assertTrue(self.err.getvalue().startswith("sendarix sink: "), argv)
            self.assertNotIn("configuration", self.err.getvalue())


class HelperTests(SynchronousTestCase):
    """Time parsing and table layout."""

    def test_parse_time(self) -> None:
        """RFC 3339, POSIX seconds and "that long ago" durations."""
        now = 1_800_000_000.0
        self.assertEqual(parse_time("2024-01-02T03:04:05Z", now), 1704164645.0)
        self.assertEqual(parse_time("2024-01-02T04:04:05.5+01:00", now), 1704164645.5)
        self.assertEqual(parse_time("1704164645", now), 1704164645.0)
        self.assertEqual(parse_time("1h", now), now - 3600)
        self.assertEqual(parse_time("90m", now), now - 5400)
        for bad in ("yesterday", "1 fortnight", ""):
            self.assertRaises(ValueError, parse_time, bad, now)

    def test_render_table(self) -> None:
        """Columns line up; right-aligned columns pad on the left; no trailing blanks."""
        table = render_table(("NAME", "N", "NOTE"), [("a", 5, ""), ("long-name", 120, "x")], [1])
        self.assertEqual(
            table.splitlines(),
            ["NAME         N  NOTE", "a            5", "long-name  120  x"],
        )


class StoreCommandTests(TestCase):
    """Commands on the stores, as subprocesses on a temporary configuration."""

    timeout = 60

    def setUp(self) -> None:
        self.folder = os.path.abspath(self.mktemp())
        self.config = _write_config(self.folder)

    async def _stores(self) -> Stores:
        stores = open_stores(load_config(self.config), _reactor, json_log=False)
        await stores.open()
        return stores

    async def cli(self, *args: str, status: int = 0) -> str:
        """Run the command with ``--config`` after it; its stdout, after checking the
        exit status (and a single stderr line on failure)."""
        out, err, code = await _run([*args, "--config", self.config], self.folder)
        self.assertEqual(code, status, (args, err))
        if status:
            self.assertEqual(len(err.decode().splitlines()), 1, err)
            return err.decode()
        return out.decode()

    async def test_credentials(self) -> None:
        """add prints a working secret; list shows no hash; revoke and rotate act at
        once; duplicates and unknown names are one-line errors."""
        out = await self.cli(
            "credentials", "add", "alice", "--tenant", "acme", "--domain", "Example.COM",
            "--allow-ip", "10.1.2.3/8", "--scope", "smtp,read", "--rate", "30/min",
        )  # fmt: skip
        lines = out.splitlines()
        self.assertEqual(lines[0], "username: alice")
        self.assertTrue(lines[1].startswith("secret: "))
        alice_secret = lines[1].removeprefix("secret: ")

        out_json, _, code = await _run(
            ["--config", self.config, "credentials", "add", "bob", "--tenant", "beta",
             "--sandbox", "--json"], self.folder,
        )  # fmt: skip
        self.assertEqual(code, 0)
        bob = json.loads(out_json)
        self.assertEqual((bob["username"], bob["tenant"], bob["sandbox"]), ("bob", "beta", True))
        self.assertEqual(bob["scopes"], ["send", "smtp"])

        table = await self.cli("credentials", "list")
        self.assertNotIn("scrypt", table)
        header, *rows = table.splitlines()
        self.assertEqual(header.split()[:3], ["NAME", "TENANT", "SCOPES"])
        self.assertEqual(rows[0].split()[:8], [
            "alice", "acme", "read,smtp", "example.com", "10.0.0.0/8", "30/min", "no", "active",
        ])  # fmt: skip
        self.assertEqual(header.index("STATE"), rows[1].index("active"))

        err = await self.cli("credentials", "add", "alice", "--tenant", "acme", status=1)
        self.assertIn("already exists", err)
        await self.cli("credentials", "revoke", "alice")
        err = await self.cli("credentials", "revoke", "nobody", status=1)
        self.assertIn("nobody", err)
        rotated = json.loads(await self.cli("credentials", "rotate", "bob", "--json"))
        self.assertEqual(rotated["username"], "bob")
        self.assertNotEqual(rotated["secret"], bob["secret"])

        listed = json.loads(await self.cli("credentials", "list", "--json"))
        self.assertEqual(
            [(c["name"], c["active"]) for c in listed], [("alice", False), ("bob", True)]
        )
        self.assertFalse(any("secret_hash" in c for c in listed))

        stores = await self._stores()
        try:
            checker = CredentialChecker(stores.credentials, _reactor, required_scope=None)
            cred = await checker.authenticate("bob", rotated["secret"])
            self.assertEqual(cred.tenant, "beta")
            for name, secret in (("bob", bob["secret"]), ("alice", alice_secret)):
                with self.assertRaises(UnauthorizedLogin):
                    await checker.authenticate(name, secret)
        finally:
            await stores.close()

    async def test_default_config_path(self) -> None:
        """Without --config, ./sendarix.toml in the working directory is read (its
        spool is used); without it, the built-in default."""
        _write_config(self.folder, "sendarix.toml", CONFIG.replace("var/spool.db", "data/q.db"))
        out, err, code = await _run(["queue", "stats", "--json"], self.folder)
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out), {"messages": 0, "by_status": {}, "by_domain": {},
                                           "routing": []})
        self.assertTrue(os.path.exists(os.path.join(self.folder, "data", "q.db")))

        empty = os.path.abspath(self.mktemp())
        os.makedirs(empty)
        out, err, code = await _run(["config", "check"], empty)
        self.assertEqual(code, 0, err)
        self.assertIn(b"configuration: built-in development default", out)
        self.assertIn(os.path.join(empty, "var", "spool.db").encode(), out)

    async def test_queue_empty(self) -> None:
        """An empty spool lists as [], and an unknown queue id is a one-line error."""
        self.assertEqual(json.loads(await self.cli("queue", "list", "--json")), [])
        err = await self.cli("queue", "show", "0000000000000000", status=1)
        self.assertIn("0000000000000000", err)

    async def test_queue(self) -> None:
        """list, show (JSON and raw body) and stats on a spooled message."""
        qid = QueueIdGenerator("clitest", _reactor).next()
        body = b"Subject: hi\r\nMessage-ID: <m1@example.org>\r\n\r\nhello\r\n"
        message = NewMessage(
            queue_id=qid,
            envelope=Envelope("sender@example.org", ("a@example.com", "b@example.net")),
            meta=MessageMeta(tenant="acme", received_at=1_800_000_000.0, message_id="<m1@x>"),
            body=body,
        )
        stores = await self._stores()
        try:
            await stores.spool.enqueue(message)
        finally:
            await stores.close()

        listed = json.loads(await self.cli("queue", "list", "--domain", "example.net", "--json"))
        self.assertEqual([m["queue_id"] for m in listed], [qid])
        self.assertEqual(listed[0]["envelope"]["sender"], "sender@example.org")
        self.assertEqual(
            json.loads(await self.cli("queue", "list", "--status", "deferred", "--json")), []
        )

        shown = json.loads(await self.cli("queue", "show", qid, "--json"))
        self.assertEqual(shown["size"], len(body))
        self.assertEqual(
            sorted(r["address"] for r in shown["recipients"]), ["a@example.com", "b@example.net"]
        )
        out, err, code = await _run(["queue", "show", qid, "--body", "--config", self.config],
                                    self.folder)  # fmt: skip
        self.assertEqual((out, code), (body, 0), err)

        stats = (await self.cli("queue", "stats")).splitlines()
        self.assertEqual(stats[:2], ["messages: 1", "recipients: 2 (pending 2)"])
        self.assertEqual([line.split() for line in stats[3:]], [
            ["DOMAIN", "PENDING"], ["example.com", "1"], ["example.net", "1"],
        ])  # fmt: skip

    async def test_log_search(self) -> None:
        """--json gives events newest first; --since filters; the human form ends with
        the next cursor, which pages on."""
        t0 = 1_800_000_000.0
        events = [
            Event.make("accepted", t0, queue_id="Q1", recipients=("a@x.example", "b@y.example")),
            Event.make("deferred", t0 + 10, queue_id="Q1", recipient="a@x.example",
                       response=Reply(451, "4.7.1", "greylisted")),
            Event.make("delivered", t0 + 20, queue_id="Q1", recipient="a@x.example",
                       response=Reply(250, "2.0.0", "queued as 12")),
            Event.make("bounced", t0 + 30, queue_id="Q2", recipient="c@z.example"),
        ]  # fmt: skip
        stores = await self._stores()
        try:
            for event in events:
                await stores.eventlog.emit(event)
        finally:
            await stores.close()

        since = format_timestamp(t0 + 5)
        found = json.loads(
            await self.cli(
                "log", "search", "--recipient", "A@x.example", "--since", since, "--json"
            )
        )
        self.assertEqual([e["type"] for e in found], ["delivered", "deferred"])
        self.assertEqual(found[0], events[2].to_json())

        lines = await self.cli("log", "search", "--recipient", "a@x.example", "--limit", "2")
        first, second, last = lines.splitlines()
        self.assertEqual(first.split()[:6], [
            format_timestamp(t0 + 20), "delivered", "Q1", "a@x.example", "250", "2.0.0",
        ])  # fmt: skip
        self.assertEqual(first.index("Q1"), second.index("Q1"))
        self.assertTrue(last.startswith("next cursor: "))
        cursor = last.removeprefix("next cursor: ")

        rest = json.loads(
            await self.cli("log", "search", "--recipient", "a@x.example", "--cursor", cursor,
                           "--json")
        )  # fmt: skip
        self.assertEqual([e["id"] for e in rest], [events[0].id])
        self.assertEqual(rest[0]["recipients"], ["a@x.example", "b@y.example"])

    async def test_queue_retry_delete(self) -> None:
        """retry makes a spooled message's recipients due and says how many; delete of
        an unknown id is a one-line error; in-process, retry of an unknown id fails and
        delete removes the message with its body."""
        qid = QueueIdGenerator("clitest", _reactor).next()
        message = NewMessage(
            queue_id=qid,
            envelope=Envelope("s@example.org", ("a@example.com", "b@example.net")),
            meta=MessageMeta(tenant="acme", received_at=1_800_000_000.0),
            body=b"Subject: hi\r\n\r\nhello\r\n",
        )
        stores = await self._stores()
        try:
            await stores.spool.enqueue(message)
        finally:
            await stores.close()

        before = time.time()
        out = await self.cli("queue", "retry", qid)
        self.assertEqual(out, f"2 recipients of {qid} due now\n")
        err = await self.cli("queue", "delete", "0000000000000000", status=1)
        self.assertIn("0000000000000000", err)

        stores = await self._stores()
        try:
            stored = await stores.spool.get(qid)
            assert stored is not None
            for r in stored.recipients:
                assert r.next_attempt is not None
                self.assertGreaterEqual(r.next_attempt, before)
                self.assertLessEqual(r.next_attempt, time.time())
            unknown = argparse.Namespace(queue_id="0000000000000000")
            with self.assertRaises(CommandError):
                await _queue_retry(unknown, stores)
            done = await _queue_delete(argparse.Namespace(queue_id=qid), stores)
            self.assertEqual(done.stdout, f"deleted {qid}\n")
            self.assertIsNone(await stores.spool.get(qid))
            self.assertIsNone(await stores.spool.body(qid))
        finally:
            await stores.close()

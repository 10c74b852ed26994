"""Worker processes (``--workers N`` / ``[node] workers``): listeners shared through
the supervisor's listening sockets, a stable node name per worker, one spool for all, a
clean stop."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import struct
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from sendarix.config.fields import auto_workers
from sendarix.node.workers import (
    PEERS_PREFIX,
    ParentWatch,
    WorkerPool,
    remove_orphan_peer_dirs,
    twistd_log_file,
    twistd_reactor,
    worker_name,
)
from tests.node.test_peermetrics import read_socket
from tests.support.redisserver import start_redis
from tests.support.relayproc import env, free_port, serving, start_workers


class WorkerOptionsTests(TestCase):
    """The supervisor's command lines, options and the layout of its workers."""

    def test_child_command(self) -> None:
        """Children run twistd in the foreground without a pidfile, with the parent's
        arguments and their number; with a twistd --logfile, each its own file."""
        pool = WorkerPool(reactor, 2, ["--config", "/etc/s.toml"])
        command = pool.command(2)
        self.assertEqual(command[command.index("sendarix"):],
                         ["sendarix", "--config", "/etc/s.toml", "--worker", "2"])
        self.assertIn("--pidfile=", command)
        self.assertFalse([a for a in command if a.startswith("--logfile")])
        pool.log_file = "/var/log/sendarix.log"
        self.assertIn("--logfile=/var/log/sendarix-w2.log", pool.command(2))
        pool.peers = "/tmp/sendarix-workers-x"
        self.assertEqual(pool.command(2)[-4:],
                         ["--peers", "/tmp/sendarix-workers-x", "--worker", "2"])

    def test_twistd_log_file(self) -> None:
        """The --logfile given to twistd (not to the plugin) is found in argv."""
        for argv, expected in (
            (["twistd", "--logfile=/l/x.log", "sendarix"], "/l/x.log"),
            (["twistd", "-l", "/l/x.log", "sendarix", "--config", "c"], "/l/x.log"),
            (["twistd", "-l/l/x.log", "sendarix"], "/l/x.log"),
            (["twistd", "-n", "sendarix", "--logfile", "/no"], None),
            (["twistd", "--logfile=-", "sendarix"], None),
        ):
            self.assertEqual(twistd_log_file(argv), expected, argv)

    def test_twistd_reactor(self) -> None:
        """The --reactor given to twistd is found in argv, and the workers get it."""
        for argv, expected in (
            (["twistd", "--reactor=epoll", "sendarix"], "epoll"),
            (["twistd", "-r", "asyncio", "-n", "sendarix"], "asyncio"),
            (["twistd", "-rpoll", "sendarix"], "poll"),
            (["twistd", "-n", "sendarix", "--reactor", "epoll"], None),
            (["twistd", "-n", "sendarix"], None),
        ):
            self.assertEqual(twistd_reactor(argv), expected, argv)
        pool = WorkerPool(Clock(), 2, ["--config", "/etc/s.toml"], reactor_name="epoll")
        command = pool.command(1)
        self.assertLess(command.index("--reactor=epoll"), command.index("sendarix"))
        self.assertNotIn("--reactor=epoll",
                         " ".join(WorkerPool(Clock(), 2, []).command(1)))

    def test_workers_option_auto(self) -> None:
        """``--workers auto`` is one worker per CPU this process may use."""
        from sendarix.node.tap import Options

        options = Options()
        options.parseOptions(["--workers", "auto"])
        self.assertEqual(options["workers"], len(os.sched_getaffinity(0)))
        options = Options()
        options.parseOptions(["--workers", "3"])
        self.assertEqual(options["workers"], 3)

    def test_workers_know_their_count(self) -> None:
        """The supervisor tells each worker how many they are (a worker keeps its
        part of the limits it counts); without a count set, one worker per usable CPU
        (a single process on one CPU), and ``workers = 1`` is one process."""
        from sendarix.node.service import NodeService

        folder = os.path.abspath(self.mktemp())
        default = _service(folder)
        if auto_workers() == 1:
            self.assertIsInstance(default, NodeService)
        else:
            assert isinstance(default, WorkerPool)
            self.assertEqual(default.count, auto_workers())
        single = _service(folder, "workers = 1\n")
        assert isinstance(single, NodeService)
        self.assertEqual(single.stores.config.node.workers, 1)
        pool = _service(folder, "", "--workers", "3")
        assert isinstance(pool, WorkerPool)
        self.assertEqual(pool.count, 3)
        self.assertEqual(pool.command(1)[-4:], ["--workers", "3", "--worker", "1"])

    def test_state_of_another_layout_removed(self) -> None:
        """A node started with workers removes the single process's routing state
        file, and started as one process, the workers' (``queue stats`` would show
        them, with figures no process of the node keeps any more)."""
        from sendarix.config.loader import load_config

        folder = os.path.abspath(self.mktemp())
        pool = _service(folder, "", "--workers", "2")
        assert isinstance(pool, WorkerPool)
        var = load_config(os.path.join(folder, "sendarix.toml")).var_dir
        os.makedirs(var, exist_ok=True)
        single, worker = (os.path.join(var, "routing-state.json"),
                          os.path.join(var, "routing-state-box-w1.json"))
        for path in (single, worker):
            with open(path, "w") as f:
                f.write("{}")
        _service(folder, "", "--workers", "2")
        self.assertEqual((os.path.exists(single), os.path.exists(worker)), (False, True))
        with open(single, "w") as f:
            f.write("{}")
        _service(folder, "workers = 1\n")
        self.assertEqual((os.path.exists(single), os.path.exists(worker)), (True, False))

    def test_a_worker_serves_its_peers(self) -> None:
        """``--peers DIR``: worker 2 of 3 serves its metrics on DIR/w2.sock and its
        /metrics answers for the node "box"; without it (or with the API off), a
        worker serves its own figures only, as a single process does."""
        from sendarix.node.peermetrics import ExpositionServer, NodeMetrics, WorkerPeers
        from sendarix.node.service import NodeService

        folder = os.path.abspath(self.mktemp())
        node = _service(folder, "", "--workers", "3", "--peers", "/run/x", "--worker", "2")
        assert isinstance(node, NodeService)
        server = node.getServiceNamed("worker-metrics")
        assert isinstance(server, ExpositionServer)
        self.assertEqual(server.path, "/run/x/w2.sock")
        assert node.metrics_resource is not None
        owner = getattr(node.metrics_resource.gather, "__self__", None)
        assert isinstance(owner, NodeMetrics)
        self.assertEqual(owner.peers, WorkerPeers("/run/x", 2, 3, "box"))
        node = _service(folder, "", "--workers", "3", "--worker", "2")
        assert isinstance(node, NodeService) and node.metrics_resource is not None
        self.assertIsNone(node.metrics_resource.gather)

    def test_workers_placed_on_cpus(self) -> None:
        """A worker keeps to a CPU of its own (its node has the placement service,
        started with the node), unless ``cpu_affinity = "none"``; a single process
        is never placed.  Only built here: placing this process would slow the suite."""
        from sendarix.node.affinity import CpuPlacement
        from sendarix.node.service import NodeService

        folder = os.path.abspath(self.mktemp())
        worker = _service(folder, "", "--workers", "2", "--worker", "2")
        assert isinstance(worker, NodeService)
        placement = worker.getServiceNamed("cpu-placement")
        assert isinstance(placement, CpuPlacement)
        self.assertEqual(placement.index, 2)
        unplaced = _service(folder, 'cpu_affinity = "none"\n', "--workers", "2", "--worker", "2")
        single = _service(folder, "workers = 1\n")
        for node in (unplaced, single):
            assert isinstance(node, NodeService)
            self.assertNotIn("cpu-placement", [s.name for s in node])

    def test_worker_names(self) -> None:
        """Worker I of node N is named N-wI."""
        self.assertEqual(worker_name("mx1", 3), "mx1-w3")


class ParentWatchTests(SynchronousTestCase):
    """A worker stops itself once its supervisor is gone."""

    def test_stops_once_when_the_parent_changes(self) -> None:
        clock = Clock()
        parents = [100]
        stops: list[float] = []
        watch = ParentWatch(clock, lambda: stops.append(clock.seconds()), interval=1.0,
                            parent=lambda: parents[-1])
        watch.startService()
        clock.advance(5)
        self.assertEqual(stops, [])
        parents.append(1)  # adopted by init: the supervisor died
        clock.advance(1)
        clock.advance(10)
        self.assertEqual(stops, [6.0])
        watch.stopService()

    def test_stop_ends_the_checks(self) -> None:
        clock = Clock()
        watch = ParentWatch(clock, lambda: None, parent=lambda: 7)
        watch.startService()
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        watch.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])


def _send_sessions(port: int, count: int, pause: float = 0.0, first: int = 0) -> list[int]:
    """``count`` sessions of one message each, one after the other (``pause`` seconds
    apart), numbered from ``first``; the DATA reply codes."""
    codes = []
    for i in range(first, first + count):
        time.sleep(pause)
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as s:
            s.ehlo()
            body = f"Message-ID: <w{i}@test>\r\nSubject: w{i}\r\n\r\nbody\r\n".encode()
            s.mail("app@example.com")
            s.rcpt(f"user{i}@example.org")
            codes.append(s.data(body)[0])
    return codes


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape of /metrics on a new connection (the kernel picks the worker)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _raw(path: str) -> float:
    """Messages accepted by one worker, read from its own socket (length-prefixed)."""
    data = read_socket(path)
    (length,) = struct.unpack("!I", data[:4])
    assert length == len(data) - 4
    return sum(
        s.value for family in text_string_to_metric_families(data[4:].decode())
        for s in family.samples if s.name == "sendarix_messages_accepted_total"
    )


class OrphanPeerDirTests(SynchronousTestCase):
    """The workers' directories that killed supervisors left behind."""

    def test_only_dead_supervisors_dirs_removed(self) -> None:
        """A directory whose supervisor PID no process has is removed; one of a live
        PID, one named the older way (no PID) and anything else stay."""
        parent = os.path.abspath(self.mktemp())
        os.makedirs(parent)
        gone = subprocess.Popen(["true"])
        gone.wait()
        names = {
            f"{PEERS_PREFIX}{gone.pid}-abcd1234": False,
            f"{PEERS_PREFIX}{os.getpid()}-efgh5678": True,
            f"{PEERS_PREFIX}ijkl9012": True,
            "something-else": True,
        }
        for name in names:
            os.makedirs(os.path.join(parent, name))
            with open(os.path.join(parent, name, "w1.sock"), "w"):
                pass
        removed = remove_orphan_peer_dirs(parent)
        self.assertEqual(removed, [os.path.join(parent, f"{PEERS_PREFIX}{gone.pid}-abcd1234")])
        self.assertEqual(sorted(os.listdir(parent)), sorted(n for n, kept in names.items() if kept))
        self.assertEqual(remove_orphan_peer_dirs(os.path.join(parent, "missing")), [])


class WorkerProcessTests(TestCase):
    """``twistd -n sendarix --workers 2``, as an operator runs it."""

    timeout = 90

    def configure(
        self, spool_url: str, api_port: int = 0, json_log: bool = False,
    ) -> tuple[str, str, int]:
        """A folder, the configuration of node "box" in it, and its SMTP port (the API
        on ``api_port``, by default a port each worker picks; the event lines in the
        log with ``json_log``)."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        port = free_port()
        config = os.path.join(folder, "sendarix.toml")
        with open(config, "w") as f:
            f.write(
                '[node]\nname = "box"\nhostname = "box.test"\n'
                f'[spool]\nurl = "{spool_url}"\n'
                f"[events]\njson_log = {'true' if json_log else 'false'}\n"
                f'[api]\nendpoint = "tcp:{api_port}:interface=127.0.0.1"\n'
                '[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = 0.5\n'
                '[[listener]]\nname = "relay"\n'
                f'endpoint = "tcp:{port}:interface=127.0.0.1"\n'
                'tls = "none"\nauth = "none"\ntrusted_networks = ["127.0.0.0/8"]\n'
            )
        return folder, config, port

    def accepted_by(self, config: str, folder: str) -> Counter[str]:
        """How many messages each worker accepted, from the node's event log."""
        search = subprocess.run(
            [sys.executable, "-m", "sendarix.control.cli", "--config", config, "log", "search",
             "--type", "accepted", "--limit", "100", "--json"],
            cwd=folder, env=env(), capture_output=True, timeout=60,
        )
        self.assertEqual(search.returncode, 0, search.stderr)
        return Counter(e["node"] for e in json.loads(search.stdout))

    def run_workers(self, spool_url: str) -> None:
        folder, config, port = self.configure(spool_url)
        parent, log_path, children = start_workers(self, folder, config, port)
        # Sessions one at a time, the workers idle between them: the worker first in
        # line takes them, unless it happens to be busy (a delivery attempt's timer)
        # when one arrives.  (Spread by a hash, 22 or more of 30 on one worker would
        # happen once in 60 runs; a few busy moments do not come near 9 of 30.)
        codes = _send_sessions(port, 30, pause=0.05)
        self.assertEqual(codes, [250] * 30)
        counts = self.accepted_by(config, folder)
        self.assertEqual(sum(counts.values()), 30)
        busiest, taken = counts.most_common(1)[0]
        self.assertGreaterEqual(taken, 22, counts)

        # That worker dies: the other takes the next sessions from the same socket
        # at once, and none is refused or reset.  (Three sessions take far less than
        # the second it waits before the dead worker is started again, and its start.)
        index = int(busiest.rsplit("-w", 1)[1])
        os.kill(children[index - 1], signal.SIGKILL)
        while _alive(children[index - 1]):
            time.sleep(0.01)  # a connection the kernel hands to a dying worker waits
        self.assertEqual(_send_sessions(port, 3, first=30), [250] * 3)
        other = f"box-w{3 - index}"
        after = self.accepted_by(config, folder)
        self.assertEqual(after[other], counts[other] + 3, after)
        self.assertEqual(sum(after.values()), 33)

        # A worker that dies is started again (under the same worker number).
        deadline = time.monotonic() + 20
        while len(children) < 3 and time.monotonic() < deadline:
            with open(log_path, "rb") as f:
                found = re.findall(rb"worker (\d) started, pid (\d+)", f.read())
            children[:] = [int(p) for _, p in found]
            time.sleep(0.1)
        self.assertEqual([int(i) for i, _ in found], [1, 2, index])
        while serving(log_path, port) < 3:
            self.assertLess(time.monotonic(), deadline, "the restarted worker does not serve")
            time.sleep(0.1)
        children.pop(index - 1)

        parent.send_signal(signal.SIGTERM)
        # twistd stops cleanly on SIGTERM and then exits with that signal's status.
        self.assertIn(parent.wait(timeout=45), (0, -signal.SIGTERM))
        for pid in children:
            self.assertFalse(_alive(pid), f"worker {pid} still running")
        with open(log_path, "rb") as f:
            self.assertEqual(f.read().count(b"Server Shut Down"), 3)  # parent, live workers

    def test_workers_keep_to_a_cpu_each(self) -> None:
        """With the default ``cpu_affinity``, every thread of worker I keeps to the
        I-th CPU the supervisor may use, so the two workers use two CPUs."""
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) < 2:
            raise SkipTest("one usable CPU: the workers are not placed")
        folder, config, port = self.configure("sqlite:var/spool.db")
        parent, log_path, children = start_workers(self, folder, config, port)
        # The database thread is started with the node: mail makes sure it runs.
        self.assertEqual(_send_sessions(port, 2), [250] * 2)
        with open(log_path, "rb") as f:
            started = re.findall(rb"worker (\d+) started, pid (\d+)", f.read())
        self.assertEqual(sorted(int(p) for _, p in started), sorted(children))
        for number, pid_text in started:
            index, pid = int(number), int(pid_text)
            masks = set()
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{tid}/status") as f:
                        status = f.read()
                except FileNotFoundError:
                    continue  # a thread that ended since the listing
                found = re.search(r"Cpus_allowed_list:\s*(\S+)", status)
                assert found is not None, status
                masks.add(found.group(1))
            self.assertEqual(masks, {str(allowed[index - 1])}, f"worker {index}")
        with open(log_path, "rb") as f:
            text = f.read()
        self.assertIn(f"worker 1 keeps to CPU {allowed[0]}".encode(), text)
        self.assertIn(f"worker 2 keeps to CPU {allowed[1]}".encode(), text)
        # The supervisor only supervises: it is left where it was.
        self.assertEqual(sorted(os.sched_getaffinity(parent.pid)), allowed)

    def test_workers_stop_when_the_supervisor_is_killed(self) -> None:
        """SIGKILL of the supervisor (no chance to stop its children): each worker sees
        it is orphaned and stops itself, cleanly, within seconds."""
        folder, config, port = self.configure("sqlite:var/spool.db")
        parent, log_path, children = start_workers(self, folder, config, port)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in children:
            self.assertFalse(_alive(pid), f"worker {pid} still running")
        with open(log_path, "rb") as f:
            text = f.read()
        self.assertEqual(text.count(b"is gone: stopping this worker"), 2)
        self.assertEqual(text.count(b"Server Shut Down"), 2)  # the workers, not the parent

    def test_workers_run_on_the_chosen_reactor(self) -> None:
        """``twistd --reactor=poll`` runs the workers on that reactor too, not on the
        default one, and they take mail."""
        folder, config, port = self.configure("sqlite:var/spool.db")
        parent, log_path, children = start_workers(
            self, folder, config, port, twistd_options=("--reactor=poll",))
        self.assertEqual(_send_sessions(port, 4), [250] * 4)
        with open(log_path, "rb") as f:
            reactors = re.findall(rb"reactor class: ([\w.]+\w)", f.read())
        # The supervisor's line and each worker's.
        self.assertEqual(reactors, [b"twisted.internet.pollreactor.PollReactor"] * 3)

    def test_workers_log_to_their_own_files(self) -> None:
        """With twistd's ``--logfile``, each worker writes its own file beside the
        supervisor's, in twistd's line format: an event line per accepted message,
        each line whole, and the last lines are there once the worker stops."""
        folder, config, port = self.configure("sqlite:var/spool.db", json_log=True)
        log_file = os.path.join(folder, "node.log")
        parent, log_path, children = start_workers(
            self, folder, config, port, twistd_options=(f"--logfile={log_file}",))
        self.assertEqual(_send_sessions(port, 12), [250] * 12)
        parent.send_signal(signal.SIGTERM)
        try:
            code = parent.wait(timeout=10)
        except subprocess.TimeoutExpired:
            # A worker that does not stop: its threads' stacks (SIGUSR2) for the report.
            for pid in children:
                if _alive(pid):
                    os.kill(pid, signal.SIGUSR2)
            time.sleep(1)
            with open(os.path.join(folder, "parent.log"), errors="replace") as f:
                stacks = f.read()[-6000:]
            self.fail(f"a worker did not stop within 10 s of SIGTERM:\n{stacks}")
        self.assertIn(code, (0, -signal.SIGTERM))
        accepted = 0
        stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^]]+\] ")
        for name in ("node-w1.log", "node-w2.log"):
            with open(os.path.join(folder, name)) as f:
                lines = f.read().splitlines()
            for text in lines:
                if not text.startswith("\t"):  # a traceback's lines go on indented
                    self.assertRegex(text, stamp)
            accepted += sum(" event accepted queue_id=" in text for text in lines)
            self.assertTrue(lines[-1].endswith("Server Shut Down."), lines[-3:])
        self.assertEqual(accepted, 12)

    def test_stacks_on_sigusr2(self) -> None:
        """SIGUSR2 makes a worker write every thread's stack to the supervisor's
        output, and the worker goes on serving."""
        folder, config, port = self.configure("sqlite:var/spool.db")
        parent, log_path, children = start_workers(self, folder, config, port)
        os.kill(children[0], signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while True:
            with open(log_path, "rb") as f:
                text = f.read()
            if b"(most recent call first)" in text:
                break
            self.assertLess(time.monotonic(), deadline, "no stacks written")
            time.sleep(0.1)
        self.assertIn(b"in run", text)  # the reactor's main loop, among the frames
        self.assertTrue(_alive(children[0]))
        self.assertEqual(_send_sessions(port, 2), [250] * 2)

    def test_workers_on_sqlite(self) -> None:
        """Two workers on one SQLite spool share the port and both take mail; a killed
        worker is started again; SIGTERM stops the parent and every worker."""
        self.run_workers("sqlite:var/spool.db")

    def test_workers_on_redis(self) -> None:
        """The same with the Redis spool."""
        redis_port, stop = start_redis(os.path.abspath(self.mktemp()))
        self.addCleanup(stop)
        self.run_workers(f"redis://127.0.0.1:{redis_port}/0")

    def test_one_scrape_for_the_node(self) -> None:
        """Every scrape shows the node's totals, whichever worker answers it; the
        workers' private directory is 0700 and goes when the supervisor stops; a
        dead worker is left out of a scrape, which still answers."""
        api_port = free_port()
        folder, config, port = self.configure("sqlite:var/spool.db", api_port)
        parent, log_path, children = start_workers(self, folder, config, port)
        deadline = time.monotonic() + 20
        while serving(log_path, api_port) < len(children):
            self.assertLess(time.monotonic(), deadline, "the API port is not shared")
            time.sleep(0.1)
        with open(f"/proc/{children[0]}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        peers = argv[argv.index(b"--peers") + 1].decode()
        self.assertEqual(os.stat(peers).st_mode & 0o777, 0o700)

        self.assertEqual(_send_sessions(port, 12), [250] * 12)
        accepted = ("sendarix_messages_accepted_total", (("tenant", "default"),))
        received = ("sendarix_messages_received_total",
                    (("listener", "relay"), ("tenant", "default")))
        seen: list[float] = []
        for _ in range(10):
            got = _scrape(api_port)
            seen.append(got.get(accepted, 0.0))
            self.assertEqual(got[("sendarix_workers", ())], 2.0)
            self.assertEqual(got[("sendarix_workers_scraped", ())], 2.0)
            build = [dict(labels)["node"] for name, labels in got
                     if name == "sendarix_build_info"]
            self.assertEqual(build, ["box"])
        # Each 250 came after the message's accepted event: every scrape has them all.
        self.assertEqual(seen, [12.0] * 10)
        self.assertEqual(got[received], 12.0)
        # ... which are what the two workers counted, each its own part.
        parts = [_raw(os.path.join(peers, f"w{i}.sock")) for i in (1, 2)]
        self.assertEqual(sum(parts), 12.0)

        # Worker 2 killed: until it is started again, worker 1 answers alone, and
        # says it holds one worker of two.
        os.kill(children[1], signal.SIGKILL)
        while _alive(children[1]):
            time.sleep(0.01)
        for _attempt in range(20):
            try:
                got = _scrape(api_port)
                break
            except ConnectionResetError:
                # A connection the killed worker had already accepted is reset, as a
                # client of any killed process sees; the next one reaches the worker
                # still running.
                time.sleep(0.1)
        self.assertEqual(got[("sendarix_workers_scraped", ())], 1.0)
        # The idle worker first in line takes each session: worker 1 may have taken
        # none of the twelve, and then has no such series.
        self.assertEqual(got.get(accepted, 0.0), parts[0])

        parent.send_signal(signal.SIGTERM)
        self.assertIn(parent.wait(timeout=45), (0, -signal.SIGTERM))
        self.assertFalse(os.path.exists(peers))
        with open(log_path, "rb") as f:
            self.assertIn(b"worker 2 did not answer", f.read())


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _service(folder: str, node_lines: str = "", *argv: str) -> Any:
    """``makeService`` for a config of node "box" (plus ``node_lines``) on a SQLite
    spool in ``folder``, with the command-line options ``argv``."""
    from sendarix.node.tap import Options, makeService

    os.makedirs(folder, exist_ok=True)
    config = os.path.join(folder, "sendarix.toml")
    with open(config, "w") as f:
        f.write(f'[node]\nname = "box"\n{node_lines}[spool]\nurl = "sqlite:spool.db"\n'
                '[events]\njson_log = false\n')
    options = Options()
    options.parseOptions(["--config", config, *argv])
    return makeService(options)

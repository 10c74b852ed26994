"""The fault soak: ``python -m tests.soak --minutes N`` (``tox -e soak -- --minutes N``).

Two relay nodes (``twistd sendarix``) share one Redis (its own ``redis-server``, with
an append-only file fsynced on every write).  Submitters send over SMTP and the HTTP
API for N minutes, each message with a unique ``X-Soak-Id`` token and one to three
recipients at the soak's destinations (``tests/soak/world.py``: DNS with MX records,
and destinations that accept, greylist with 450, refuse recipients with 550, answer
421, stall until the client gives up, drop the connection in the middle of DATA,
refuse connections on a first MX, or stop listening for a while).  During the run a
node is SIGKILLed and restarted under its own name, Redis is SIGKILLed and restarted on
the same append-only file, and a third node joins.  Then the relay drains.

Every submission answered 250 (queue id from the reply) or 202 (the id) is recorded
with its recipients; every copy a destination answered 250 is recorded with the queue
id from the relay's ``Received:`` field and the token; bounces come from the relay's
``bounced`` events.  Each accepted (message, recipient) must then be delivered
exactly once, or bounced when its destination refuses it.  The soak prints the counts
and exits 1 on a single lost recipient, a wrong outcome, something still queued after
the drain, or a duplicate that at-least-once delivery does not explain (one is
explained only when an earlier copy left a node shortly before that node was
SIGKILLed, and a later copy came after the kill).

Every process the soak starts is stopped by its PID at the end; every loop is
bounded in time and count.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import select
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import IO, Any

from tests.soak.ledger import Kill, Receipt, Submission, Verdict, judge
from tests.soak.world import DESTINATIONS, SWITCHABLE, expected_outcome
from tests.support.relayproc import TWISTD, env, free_port, wait_listening

#: Lease time of the soak's nodes: a SIGKILLed node's deliveries wait this long at
#: most (its restart takes them back at once); also the window in which a copy sent by
#: a node before it was killed may be sent again.
LEASE = 10.0
#: Relay settings that make retries come back within seconds, so the drain ends.
DELIVERY = (
    '[delivery]\nretry_schedule = ["2s", "4s", "8s"]\nmax_lifetime = "1h"\n'
    'greylist_retry = "3s"\nconnect_timeout = "2s"\ncommand_timeout = "4s"\n'
    'dead_site_suspension = "10s"\nrate_limit_pause = "10s"\n'
)
#: Seconds of one round of faults (a longer run repeats them).
CHAOS_ROUND = 180.0
#: Most messages one submitter sends, whatever the duration.
MAX_PER_SUBMITTER = 50_000
SENDER = "soak@sender.test"
_QUEUED_AS = re.compile(r"queued as (\S+)")


def _domains() -> list[str]:
    return list(DESTINATIONS)


class Soak:
    def __init__(self, minutes: float, rate: float, drain: float, folder: str,
                 seed: int) -> None:
        self.minutes = minutes
        self.rate = rate
        self.drain_limit = drain
        self.dir = folder
        self.rng = random.Random(seed)
        self.seed = seed
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: list[IO[bytes]] = []
        self.nodes: dict[str, tuple[int, int]] = {}  # name -> (smtp port, api port)
        self.submissions: dict[str, Submission] = {}
        self.kills: list[Kill] = []
        self.lock = threading.Lock()
        self.redis_port = free_port()
        self.records = os.path.join(folder, "received.jsonl")
        self.dns_port = 0
        self.mx_port = 0
        self.key = ""
        self.refused = 0
        self.started = time.time()

    def say(self, text: str) -> None:
        print(f"# {time.time() - self.started:6.1f} s: {text}", flush=True)

    # -- processes ------------------------------------------------------------------

    def start_redis(self) -> None:
        data = os.path.join(self.dir, "redis")
        os.makedirs(data, exist_ok=True)
        self.procs["redis"] = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--dir", data, "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_listening(self.redis_port, self.procs["redis"])

    def start_world(self) -> None:
        log = open(os.path.join(self.dir, "world.log"), "ab")
        self.logs.append(log)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.soak.world", self.records, str(self.seed)],
            env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
        )
        self.procs["world"] = proc
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline().decode() if ready else "(nothing within 60 s)"
        if not line.startswith("ready "):
            raise RuntimeError(f"the soak's destinations did not start: {line!r}")
        self.dns_port, self.mx_port = (int(x) for x in line.split()[1:3])

    def world(self, command: str) -> None:
        stdin = self.procs["world"].stdin
        assert stdin is not None
        stdin.write(command.encode() + b"\n")
        stdin.flush()

    def config(self, name: str, smtp: int, api: int) -> str:
        path = os.path.join(self.dir, f"{name}.toml")
        with open(path, "w") as f:
            f.write(
                f'[node]\nname = "{name}"\nhostname = "{name}.soak.test"\n'
                # One process per node: the soak kills and restarts nodes by PID.
                "workers = 1\n"
                f'[spool]\nurl = "redis://127.0.0.1:{self.redis_port}/0"\n'
                f'lease_time = "{LEASE:g}s"\n'
                '[events]\njson_log = false\n'
                f'[api]\nendpoint = "tcp:{api}:interface=127.0.0.1"\n'
                f'[dns]\nnameservers = ["127.0.0.1:{self.dns_port}"]\ntimeout = "2s"\n'
                + DELIVERY + f"mx_port = {self.mx_port}\n"
                + '[[listener]]\nname = "relay"\n'
                f'endpoint = "tcp:{smtp}:interface=127.0.0.1"\n'
                'tls = "none"\nauth = "none"\ntrusted_networks = ["127.0.0.0/8"]\n'
                'tenant = "soak"\n'
            )
        return path

    def start_node(self, name: str) -> None:
        smtp, api = self.nodes.get(name) or (free_port(), free_port())
        log = open(os.path.join(self.dir, f"{name}.log"), "ab")
        self.logs.append(log)
        self.procs[name] = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "sendarix", "--config", self.config(name, smtp, api)],
            cwd=self.dir, env=env(), stdout=log, stderr=subprocess.STDOUT,
        )
        # Named only once its process exists: the submitters read both from their threads.
        self.nodes[name] = (smtp, api)
        wait_listening(smtp, self.procs[name], timeout=60)

    def sigkill(self, name: str) -> None:
        proc = self.procs[name]
        if name != "redis":
            self.kills.append(Kill(name, time.time()))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def live_nodes(self) -> list[str]:
        # A snapshot: a node may join (from the main thread) while a submitter asks.
        return [n for n in list(self.nodes) if self.procs[n].poll() is None]

    def cli(self, *args: str) -> Any:
        out = subprocess.run(
            [sys.executable, "-m", "sendarix.control.cli", "--config",
             os.path.join(self.dir, "a.toml"), *args],
            env=env(), cwd=self.dir, capture_output=True, check=True, timeout=120,
        )
        return json.loads(out.stdout)

    def credential(self) -> None:
        self.key = self.cli("credentials", "add", "soak", "--tenant", "soak",
                            "--scope", "smtp,send,read", "--json")["secret"]

    # -- load -----------------------------------------------------------------------

    def message(self) -> tuple[str, list[str], bytes]:
        token = f"{self.rng.getrandbits(64):016x}"
        rcpts = []
        for i in range(self.rng.choice((1, 1, 2, 3))):
            domain = self.rng.choice(_domains())
            local = "gone" if domain == "bounce.test" and self.rng.random() < 0.4 else "u"
            rcpts.append(f"{local}{i}-{token}@{domain}")
        body = (f"From: {SENDER}\r\nTo: {', '.join(rcpts)}\r\nSubject: soak {token}\r\n"
                f"X-Soak-Id: {token}\r\n\r\nsoak message {token}\r\n").encode()
        return token, rcpts, body

    def accepted(self, queue_id: str, token: str, rcpts: list[str], via: str) -> None:
        with self.lock:
            self.submissions[queue_id] = Submission(queue_id, token, tuple(rcpts), via)

    def not_accepted(self) -> None:
        with self.lock:
            self.refused += 1

    def submit(self, until: float, interval: float, send: Callable[..., None]) -> None:
        """Until ``until`` (and at most MAX_PER_SUBMITTER times), hand a new message to
        ``send(node, token, recipients, body)`` on a live node, then wait ``interval``."""
        for _ in range(MAX_PER_SUBMITTER):
            if time.time() >= until:
                return
            token, rcpts, body = self.message()
            nodes = self.live_nodes()
            if not nodes:
                time.sleep(0.5)
                continue
            send(self.rng.choice(nodes), token, rcpts, body)
            time.sleep(interval)

    def submit_smtp(self, until: float, interval: float) -> None:
        self.submit(until, interval, self.send_smtp)

    def submit_api(self, until: float, interval: float) -> None:
        self.submit(until, interval, self.send_api)

    def send_smtp(self, node: str, token: str, rcpts: list[str], body: bytes) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", self.nodes[node][0], timeout=20) as s:
                s.ehlo("submitter.test")
                code, _ = s.mail(SENDER)
                if code != 250 or not all(s.rcpt(r)[0] == 250 for r in rcpts):
                    s.rset()
                    self.not_accepted()
                    return
                code, reply = s.data(body)
                m = _QUEUED_AS.search(reply.decode("utf-8", "replace"))
                if code == 250 and m:
                    self.accepted(m.group(1), token, rcpts, "smtp")
                else:
                    self.not_accepted()
        except (smtplib.SMTPException, OSError):
            self.not_accepted()

    def send_api(self, node: str, token: str, rcpts: list[str], body: bytes) -> None:
        data = json.dumps({"from": SENDER, "to": rcpts,
                           "raw_b64": base64.b64encode(body).decode()}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.nodes[node][1]}/v1/messages", data=data,
            headers={"Authorization": f"Bearer {self.key}",
                     "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=20) as response:
                answer = json.loads(response.read())
                if response.status == 202:
                    self.accepted(answer["id"], token, rcpts, "api")
                else:
                    self.not_accepted()
        except (urllib.error.URLError, OSError, ValueError):
            self.not_accepted()

    # -- counting -------------------------------------------------------------------

    def receipts(self) -> list[Receipt]:
        found = []
        try:
            with open(self.records) as f:
                lines = f.readlines()
        except FileNotFoundError:
            return []
        for line in lines:
            if not line.endswith("\n"):
                continue  # being written
            entry = json.loads(line)
            node = entry["helo"].split(".")[0]
            for rcpt in entry["recipients"]:
                found.append(Receipt(entry["queue_id"], entry["token"], rcpt, node,
                                     entry["at"]))
        return found

    def api_get(self, path: str) -> Any:
        last: Exception | None = None
        for node in self.live_nodes():
            request = urllib.request.Request(
                f"http://127.0.0.1:{self.nodes[node][1]}{path}",
                headers={"Authorization": f"Bearer {self.key}"})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return json.loads(response.read())
            except (urllib.error.URLError, OSError) as e:
                last = e
        raise RuntimeError(f"no node answered {path}: {last}")

    def bounced(self) -> set[tuple[str, str]]:
        found: set[tuple[str, str]] = set()
        cursor = None
        for _ in range(10_000):
            page = self.api_get("/v1/events?type=bounced&limit=1000"
                                + (f"&cursor={cursor}" if cursor else ""))
            for event in page["events"]:
                for rcpt in [event.get("recipient"), *(event.get("recipients") or [])]:
                    if rcpt:
                        found.add((event["queue_id"], rcpt.lower()))
            cursor = page["next_cursor"]
            if not cursor:
                break
        return found

    def queued(self) -> tuple[int, set[tuple[str, str]]]:
        """Messages in the spool, and their (queue id, recipient) still to deliver."""
        active: set[tuple[str, str]] = set()
        messages = self.cli("queue", "list", "--json", "--limit", "1000000")
        for message in messages:
            for r in message["recipients"]:
                if r["status"] in ("pending", "deferred"):
                    active.add((message["queue_id"], r["address"].lower()))
        return len(messages), active

    def show(self, cases: list[str]) -> None:
        """The spool's record of a few recipients still waiting (why they wait)."""
        wanted = {tuple(case.split(" ", 1)) for case in cases}
        for message in self.cli("queue", "list", "--json", "--limit", "1000000"):
            for r in message["recipients"]:
                if (message["queue_id"], r["address"]) in wanted:
                    reply = r.get("last_reply") or {}
                    wait = (r["next_attempt"] or time.time()) - time.time()
                    self.say(f"  {message['queue_id']} {r['address']}: {r['status']}, "
                             f"{r['attempts']} attempts, next in {wait:.0f} s, last "
                             f"{reply.get('code')} {reply.get('text')}")

    def verdict(self, queued: set[tuple[str, str]]) -> Verdict:
        with self.lock:
            submissions = dict(self.submissions)
        return judge(submissions, self.receipts(), self.bounced(), expected_outcome,
                     self.kills, LEASE, queued)

    # -- the run --------------------------------------------------------------------

    def run(self) -> int:
        self.start_redis()
        self.start_world()
        self.start_node("a")
        self.start_node("b")
        self.credential()
        self.say(f"nodes a and b up; destinations on port {self.mx_port}, DNS on "
                 f"{self.dns_port}; submitting for {self.minutes:g} min at ~{self.rate:g}/s")
        seconds = self.minutes * 60
        self.started = time.time()
        until = self.started + seconds
        workers = [threading.Thread(target=self.submit_smtp, args=(until, 4 / self.rate))
                   for _ in range(3)]
        workers.append(threading.Thread(target=self.submit_api, args=(until, 4 / self.rate)))
        for w in workers:
            w.start()
        for at, what, action in self.chaos(seconds):
            time.sleep(max(0.0, self.started + at - time.time()))
            self.say(what)
            action()
        for w in workers:
            w.join(timeout=seconds + 120)
        self.say(f"submissions ended: {len(self.submissions)} accepted, {self.refused} "
                 "refused or failed (clients would retry those); draining")
        return self.drain()

    def chaos(self, seconds: float) -> list[tuple[float, str, Any]]:
        """The faults, at seconds into the run: one round per ``CHAOS_ROUND`` seconds
        (a short run has one), each taking a destination down and back, SIGKILLing a
        node (a, then b, then c, ...) and restarting it, and SIGKILLing Redis; node c
        joins in the first round."""
        switchable = SWITCHABLE[0]
        rounds = max(1, int(seconds // CHAOS_ROUND))
        length = seconds / rounds
        events: list[tuple[float, str, Any]] = []
        for i in range(rounds):
            start = i * length
            victim = "abc"[i % 3] if i else "a"
            events += [
                (start + 0.15 * length, f"{switchable} stops listening",
                 lambda: self.world(f"down {switchable}")),
                (start + 0.25 * length, f"SIGKILL node {victim}, restart it",
                 lambda victim=victim: self._restart(victim)),
                (start + 0.35 * length, f"{switchable} listens again",
                 lambda: self.world(f"up {switchable}")),
                (start + 0.5 * length, "SIGKILL Redis, restart it", self._restart_redis),
            ]
            if i == 0:
                events.append((start + 0.65 * length, "node c joins",
                               lambda: self.start_node("c")))
        return events

    def _restart(self, name: str) -> None:
        self.sigkill(name)
        self.start_node(name)

    def _restart_redis(self) -> None:
        self.sigkill("redis")
        time.sleep(2)
        self.start_redis()

    def drain(self) -> int:
        deadline = time.time() + self.drain_limit
        verdict = self.verdict(set())
        for _ in range(10_000):
            messages = int(self.cli("queue", "stats", "--json")["messages"])
            verdict = self.verdict(set())
            open_ = len(verdict.lost)
            if not open_ and not messages:
                break
            if time.time() >= deadline:
                break
            by_domain: dict[str, int] = {}
            for case in verdict.lost:
                domain = case.rpartition("@")[2]
                by_domain[domain] = by_domain.get(domain, 0) + 1
            self.say(f"{open_} recipients not yet delivered or bounced, {messages} "
                     "messages in the spool ("
                     + ", ".join(f"{d} {n}" for d, n in sorted(by_domain.items())) + ")")
            if open_ <= 3:
                self.show(verdict.lost)
            time.sleep(5)
        self.say("drain over")
        spooled, active = self.queued()
        verdict = self.verdict(active)
        for line in verdict.lines():
            print(line)
        print(f"{'messages left in the spool'.ljust(54)}  {spooled}")
        for label, cases in (("lost", verdict.lost), ("still queued", verdict.still_queued),
                             ("unexplained duplicate", verdict.duplicated_unexplained),
                             ("wrong outcome", verdict.wrong)):
            for case in cases[:10]:
                print(f"# {label}: {case}")
        if verdict.failed or spooled:
            print("# FAILED")
            return 1
        print("# OK: every accepted recipient delivered once or bounced as told")
        return 0

    def stop(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                if name == "world" and proc.stdin is not None:
                    proc.stdin.close()
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self.logs:
            log.close()

    def problems(self) -> None:
        """Tracebacks in the nodes' logs (a hint where to look after a failure)."""
        for name in sorted(self.nodes):
            path = os.path.join(self.dir, f"{name}.log")
            with open(path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
            count = text.count("Traceback")
            if count:
                print(f"# {name}.log holds {count} tracebacks")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="submission time (3)")
    parser.add_argument("--rate", type=float, default=15.0,
                        help="messages submitted per second, all submitters together (15)")
    parser.add_argument("--drain", type=float, default=300.0,
                        help="longest wait for the queue to drain, in seconds (300)")
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        print("redis-server is required", file=sys.stderr)
        return 1
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    folder = tempfile.mkdtemp(prefix="sendarix-soak-")
    print(f"# seed {seed}", flush=True)
    soak = Soak(args.minutes, args.rate, args.drain, folder, seed)
    status = 1
    try:
        status = soak.run()
        return status
    finally:
        soak.stop()
        soak.problems()
        if args.keep or status:
            print(f"# work folder kept: {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

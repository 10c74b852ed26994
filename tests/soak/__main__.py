"""The fault soak: ``python -m tests.soak --minutes N`` (``tox -e soak -- --minutes N``).

Two relay nodes (``twistd sendarix``) share one Redis; submitters send over SMTP and
the HTTP API, each message marked with a unique ``X-Soak-Id`` and addressed to one of
three destinations (test sinks): one that accepts, one that answers 421 and 451 to
its first sessions, one that refuses some recipients with 550.  Meanwhile a node is
killed with SIGKILL and restarted, Redis is killed and restarted (same append-only
file), and a third node joins.  At the end the queues drain, and the soak counts,
for every message that got a 250 or a 202: delivered, bounced as the destination
said, duplicated, lost.  It exits 1 on a single lost message, or on a duplicate when
no node was killed mid-delivery (the only way at-least-once delivery may repeat one).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
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

from tests.support.relayproc import TWISTD, env, free_port, wait_listening

DOMAINS = {"good.test": "127.0.0.2", "flaky.test": "127.0.0.3", "bouncy.test": "127.0.0.4"}
#: Seconds each submitter waits between messages (a steady load, not a flood: the
#: soak is about faults, the bench about speed).
PAUSE = 0.05

FAULTS = {
    "good.test": [],
    "flaky.test": ["first:40:421:4.3.2:busy", "rcpt:451:4.7.1:grey*@*"],
    "bouncy.test": ["rcpt:550:5.1.1:gone*@*"],
}


class Soak:
    def __init__(self, minutes: float, folder: str) -> None:
        self.minutes = minutes
        self.dir = folder
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.sinks: dict[str, tuple[int, str]] = {}
        self.nodes: dict[str, tuple[int, int]] = {}  # name -> (smtp port, api port)
        self.accepted: dict[str, str] = {}  # soak id -> expected outcome
        self.lock = threading.Lock()
        self.killed_mid_delivery = False
        self.redis_port = free_port()
        self.key = ""
        self.refused = 0

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

    def start_sinks(self) -> None:
        for domain, address in DOMAINS.items():
            port = free_port()
            maildir = os.path.join(self.dir, "sink-" + domain)
            os.makedirs(maildir)
            args = [sys.executable, "-m", "sendarix.control.cli.sink",
                    "--listen", f"tcp:{port}:interface={address}", "--maildir", maildir,
                    "--idle-timeout", "30"]
            for fault in FAULTS[domain]:
                args += ["--fault", fault]
            self.procs["sink-" + domain] = subprocess.Popen(
                args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.sinks[domain] = (port, maildir)
        time.sleep(2)

    def config(self, name: str, smtp: int, api: int) -> str:
        routes = "".join(
            f'[pool.{d.split(".")[0]}]\nendpoints = ["{DOMAINS[d]}:{port}"]\n'
            f'[[route]]\nmatch.recipient_domain = "{d}"\nvia = "pool:{d.split(".")[0]}"\n'
            for d, (port, _) in self.sinks.items()
        )
        path = os.path.join(self.dir, f"{name}.toml")
        with open(path, "w") as f:
            f.write(
                f'[node]\nname = "{name}"\nhostname = "{name}.soak.test"\n'
                f'[spool]\nurl = "redis://127.0.0.1:{self.redis_port}/0"\nlease_time = "20s"\n'
                '[events]\njson_log = false\n'
                f'[api]\nendpoint = "tcp:{api}:interface=127.0.0.1"\n'
                '[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = 0.5\n'
                '[delivery]\nretry_schedule = ["1s", "2s", "3s"]\nmax_lifetime = "1h"\n'
                + routes
                + '[[listener]]\nname = "relay"\n'
                f'endpoint = "tcp:{smtp}:interface=127.0.0.1"\n'
                'tls = "none"\nauth = "none"\ntrusted_networks = ["127.0.0.0/8"]\n'
            )
        return path

    def start_node(self, name: str) -> None:
        smtp, api = self.nodes.get(name) or (free_port(), free_port())
        self.nodes[name] = (smtp, api)
        log = open(os.path.join(self.dir, f"{name}.log"), "ab")
        self.procs[name] = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "sendarix", "--config", self.config(name, smtp, api)],
            cwd=self.dir, env=env(), stdout=log, stderr=subprocess.STDOUT,
        )
        wait_listening(smtp, self.procs[name], timeout=60)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def credential(self) -> None:
        out = subprocess.run(
            [sys.executable, "-m", "sendarix.control.cli", "--config",
             os.path.join(self.dir, "a.toml"), "credentials", "add", "soak", "--tenant", "soak",
             "--scope", "smtp,send,read", "--json"],
            env=env(), cwd=self.dir, capture_output=True, check=True,
        )
        self.key = json.loads(out.stdout)["secret"]

    # -- load -----------------------------------------------------------------------

    def message(self) -> tuple[str, str, str]:
        """(soak id, recipient, expected outcome)."""
        soak_id = f"{random.getrandbits(64):016x}"
        domain = random.choice(list(DOMAINS))
        local = "gone" if domain == "bouncy.test" and random.random() < 0.3 else "user"
        if domain == "flaky.test" and random.random() < 0.2:
            local = "grey"  # deferred at every try: still queued at the end (not lost)
        expected = {"gone": "bounced", "grey": "queued"}.get(local, "delivered")
        return soak_id, f"{local}-{soak_id}@{domain}", expected

    def submit_smtp(self, until: float) -> None:
        while time.time() < until:
            soak_id, rcpt, expected = self.message()
            node = random.choice([n for n in self.nodes if self.procs[n].poll() is None])
            body = (f"From: soak@sender.test\r\nSubject: soak\r\nX-Soak-Id: {soak_id}\r\n\r\n"
                    "hello\r\n").encode()
            try:
                with smtplib.SMTP("127.0.0.1", self.nodes[node][0], timeout=20) as s:
                    s.sendmail("soak@sender.test", [rcpt], body)
                with self.lock:
                    self.accepted[soak_id] = expected
            except (smtplib.SMTPException, OSError):
                with self.lock:
                    self.refused += 1
                time.sleep(0.2)
            time.sleep(PAUSE)

    def submit_api(self, until: float) -> None:
        while time.time() < until:
            soak_id, rcpt, expected = self.message()
            node = random.choice([n for n in self.nodes if self.procs[n].poll() is None])
            raw = (f"From: soak@sender.test\r\nSubject: soak\r\nX-Soak-Id: {soak_id}\r\n\r\n"
                   "hello\r\n").encode()
            data = json.dumps({"from": "soak@sender.test", "to": rcpt,
                               "raw_b64": base64.b64encode(raw).decode()}).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{self.nodes[node][1]}/v1/messages", data=data,
                headers={"Authorization": f"Bearer {self.key}",
                         "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=20) as response:
                    if response.status == 202:
                        with self.lock:
                            self.accepted[soak_id] = expected
            except (urllib.error.URLError, OSError):
                with self.lock:
                    self.refused += 1
                time.sleep(0.2)
            time.sleep(PAUSE)

    # -- counting -------------------------------------------------------------------

    def delivered(self) -> dict[str, int]:
        seen: dict[str, int] = {}
        for _, maildir in self.sinks.values():
            for name in os.listdir(maildir):
                if not name.endswith(".eml"):
                    continue
                with open(os.path.join(maildir, name), "rb") as f:
                    head = f.read(4096)
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"x-soak-id:"):
                        soak_id = line.split(b":", 1)[1].strip().decode()
                        seen[soak_id] = seen.get(soak_id, 0) + 1
        return seen

    def bounced(self) -> set[str]:
        node = next(n for n in self.nodes if self.procs[n].poll() is None)
        found: set[str] = set()
        cursor = None
        while True:
            url = (f"http://127.0.0.1:{self.nodes[node][1]}/v1/events?type=bounced&limit=1000"
                   + (f"&cursor={cursor}" if cursor else ""))
            request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.key}"})
            with urllib.request.urlopen(request, timeout=20) as response:
                page = json.loads(response.read())
            for event in page["events"]:
                rcpt = event.get("recipient") or ""
                found.add(rcpt.split("@")[0].split("-", 1)[-1])
            cursor = page["next_cursor"]
            if not cursor:
                return found

    # -- the run --------------------------------------------------------------------

    def run(self) -> int:
        self.start_redis()
        self.start_sinks()
        self.start_node("a")
        self.start_node("b")
        self.credential()
        seconds = self.minutes * 60
        until = time.time() + seconds
        workers = [threading.Thread(target=self.submit_smtp, args=(until,)) for _ in range(3)]
        workers += [threading.Thread(target=self.submit_api, args=(until,))]
        for w in workers:
            w.start()
        chaos = [
            (seconds * 0.25, "SIGKILL node a, restart it"),
            (seconds * 0.5, "kill Redis, restart it"),
            (seconds * 0.7, "node c joins"),
        ]
        start = time.time()
        for at, what in chaos:
            time.sleep(max(0.0, start + at - time.time()))
            print(f"# {time.time() - start:5.0f} s: {what}", flush=True)
            if what.startswith("SIGKILL"):
                self.kill("a")
                self.killed_mid_delivery = True
                self.start_node("a")
            elif what.startswith("kill Redis"):
                self.kill("redis")
                time.sleep(2)
                self.start_redis()
            else:
                self.start_node("c")
        for w in workers:
            w.join()
        print("# submissions ended; draining", flush=True)
        drain_until = time.time() + 180
        want = {i for i, e in self.accepted.items() if e == "delivered"}
        while time.time() < drain_until and not want <= set(self.delivered()):
            time.sleep(2)
        return self.report()

    def queued(self) -> int:
        """Messages still in the spool (the greylisted ones stay)."""
        out = subprocess.run(
            [sys.executable, "-m", "sendarix.control.cli", "--config",
             os.path.join(self.dir, "a.toml"), "queue", "stats", "--json"],
            env=env(), cwd=self.dir, capture_output=True, check=True,
        )
        return int(json.loads(out.stdout)["messages"])

    def report(self) -> int:
        delivered = self.delivered()
        bounced = self.bounced()
        counts = {"accepted (250/202)": len(self.accepted), "refused (retried by a client)":
                  self.refused}
        lost, duplicated, wrong = [], [], []
        for soak_id, expected in self.accepted.items():
            n = delivered.get(soak_id, 0)
            if n > 1:
                duplicated.append(soak_id)
            if expected == "delivered" and n == 0:
                lost.append(soak_id)
            if expected == "bounced" and soak_id not in bounced:
                lost.append(soak_id)
            if expected == "bounced" and n:
                wrong.append(soak_id)
        counts["delivered"] = sum(1 for i, e in self.accepted.items()
                                  if e == "delivered" and delivered.get(i))
        counts["bounced as the destination said"] = sum(
            1 for i, e in self.accepted.items() if e == "bounced" and i in bounced)
        counts["still deferred (greylisted for ever)"] = sum(
            1 for e in self.accepted.values() if e == "queued")
        counts["duplicated"] = len(duplicated)
        counts["delivered though refused"] = len(wrong)
        # A message neither delivered nor bounced may still be in the queue (retried):
        # only what is in neither the destinations nor the queue is lost.
        waiting = self.queued() - counts["still deferred (greylisted for ever)"]
        counts["still in the queue after the drain"] = max(0, waiting)
        missing = len(lost)
        lost = lost[max(0, waiting):] if waiting > 0 else lost
        counts["lost"] = len(lost) if missing > max(0, waiting) else 0
        if not counts["lost"]:
            lost = []
        width = max(len(k) for k in counts)
        for key, value in counts.items():
            print(f"{key.ljust(width)}  {value}")
        unexplained = duplicated if not self.killed_mid_delivery else []
        if duplicated and self.killed_mid_delivery:
            print("# duplicates are allowed: a node was killed mid-delivery (at least once)")
        if lost or unexplained or wrong:
            print(f"# FAILED: lost {lost[:10]}, unexplained duplicates {unexplained[:10]}, "
                  f"delivered though refused {wrong[:10]}")
            return 1
        return 0

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="submission time (3)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        print("redis-server is required", file=sys.stderr)
        return 1
    folder = tempfile.mkdtemp(prefix="sendarix-soak-")
    soak = Soak(args.minutes, folder)
    try:
        return soak.run()
    finally:
        soak.stop()
        if args.keep:
            print(f"# work folder: {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())


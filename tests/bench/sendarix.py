"""Sendarix as the bench runs it: ``twistd -n sendarix --config ...`` in a temp folder,
with a trusted-network listener without AUTH or TLS, relaying to the sink.

The sink is a ``[pool.sink]`` smarthost that a ``[[route]]`` sends the bench domain to
(as Postfix's ``relayhost``); with ``route="mx"`` it is instead the MX of the bench
domain, served by a DNS server of our own (``tests.bench.dnsproc``).
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time

from tests.support.relayproc import ROOT, TWISTD, env, serving

#: Recipient domain of every bench message.
DOMAIN = "bench.example"

#: How twistd is started for each reactor a variant may name (``default+asyncio``,
#: ``sqlite-w1+uvloop``): Twisted's asyncio reactor on asyncio's own loop, or on uvloop.
REACTORS: dict[str, list[str]] = {
    "epoll": [*TWISTD, "-n"],
    "asyncio": [*TWISTD, "-n", "--reactor=asyncio"],
    "uvloop": [
        sys.executable, "-c",
        "import asyncio, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
        "from twisted.scripts.twistd import run; run()",
        "-n", "--reactor=asyncio",
    ],
}


#: The interpreter a ``+pypy`` variant runs the node on: ``$SENDARIX_BENCH_PYPY`` (a
#: PyPy with the relay's dependencies installed for it, such as a virtualenv's
#: ``bin/python``), else ``pypy3`` from the PATH.
PYPY_ENV = "SENDARIX_BENCH_PYPY"

#: What the relay needs of an interpreter (setup.cfg's ``python_requires``).
NEEDS = (3, 11)


def pypy_interpreter() -> str | None:
    """The PyPy a ``+pypy`` variant would run, or None when there is none."""
    chosen = os.environ.get(PYPY_ENV)
    return chosen if chosen else shutil.which("pypy3")


def interpreter_env(interpreter: str | None) -> dict[str, str]:
    """The node's environment on ``interpreter`` (None: ours).  Another interpreter
    gets the tree alone on ``PYTHONPATH``: a path set for this Python (trial sets
    its own ``sys.path`` there for its workers) would hand it our site-packages."""
    environment = env()
    if interpreter is not None:
        environment["PYTHONPATH"] = ROOT
    return environment


def check_pypy(interpreter: str | None) -> str:
    """What ``interpreter`` is ("PyPy 3.11.13"), if it can run the relay; else
    :class:`Refused` with the reason (none installed, too old a Python, the relay or
    its dependencies not importable)."""
    if interpreter is None:
        raise Refused(f"no pypy3 on the PATH and ${PYPY_ENV} is not set")
    probe = (
        "import sys, platform\n"
        "print(platform.python_implementation(), platform.python_version())\n"
        f"if sys.version_info < {NEEDS!r}: sys.exit(3)\n"
        "import twisted.scripts.twistd, sendarix.node.tap\n"
    )
    try:
        done = subprocess.run([interpreter, "-c", probe], env=interpreter_env(interpreter),
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Refused(f"{interpreter}: {e}") from e
    version = done.stdout.strip() or interpreter
    if done.returncode == 3:
        raise Refused(f"{interpreter} is {version}; the relay needs Python "
                      f"{NEEDS[0]}.{NEEDS[1]} or later")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["failed"])[-1]
        raise Refused(f"{interpreter} ({version}) cannot import the relay: {last[-200:]}")
    return version


def on_interpreter(command: list[str], interpreter: str | None) -> list[str]:
    """``command`` (one of :data:`REACTORS`) run by ``interpreter`` instead of ours."""
    if interpreter is None:
        return command
    assert command[0] == sys.executable
    return [interpreter, *command[1:]]


class Failed(Exception):  # noqa: N818 - "raise Failed(why)"
    """A system could not be started or measured."""


class Refused(Failed):  # noqa: N818 - "the relay refused the config"
    """The relay refused this configuration (a variant this build lacks)."""


def raise_nofile(limit: int) -> None:
    """Raise this process's open-files limit towards ``limit`` (capped at the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    tree = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, ()))
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_tree_rss(pid: int, only: str | None = None) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over ``pid``'s tree (only processes named ``only``)."""
    rss = pss = 0
    for p in process_tree(pid):
        if only is not None and _comm(p) != only:
            continue
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


CONFIG = """\
[node]
name = "bench"
hostname = "sendarix.bench.invalid"
{node_extra}
[api]
endpoint = "tcp:0:interface=127.0.0.1"

[[listener]]
name = "bench"
endpoint = "tcp:{port}:interface=127.0.0.1"
tls = "none"
auth = "none"
trusted_networks = ["127.0.0.0/8"]
max_connections_per_ip = {max_connections}
max_connections = {max_connections}

[limits]
max_message_size = {size_limit}

[delivery]
mx_port = {sink_port}
{delivery_extra}"""

DNS = """
[dns]
nameservers = ["127.0.0.1:{dns_port}"]
"""

POOL_ROUTE = """
[[route]]
match.recipient_domain = "{domain}"
via = "pool:sink"

[pool.sink]
endpoints = ["127.0.0.1:{sink_port}"]
"""


#: ``[delivery]`` lines of each ``gather`` choice, by its variant option: the default
#: wait for company, none (``+nogather``), or a peak's intake first (``+burst``).
GATHER = {
    "default": "",
    "nogather": 'gather_time = "0s"\n',
    "burst": 'gather_time = "5s"\ngather_messages = 100\n',
}


class SendarixSystem:
    """One Sendarix variant (spool backend, worker count): ``start()`` runs a fresh node.

    ``spool="default"`` is the configuration a user gets without choosing: no
    ``[node] workers`` and no ``[spool]`` section (the embedded SQLite spool under
    ``var/``), only the bench's listener and route."""

    def __init__(self, dir: str, port: int, sink_port: int, dns_port: int, *,
                 spool: str, workers: int | str | None, max_connections: int,
                 size_limit: int, route: str = "pool", redis_url: str | None = None,
                 redis_pid: int | None = None, reactor: str = "epoll",
                 json_log: bool = True, gather: str = "default", pin: bool = True,
                 pypy: bool = False,
                 name: str | None = None) -> None:
        self.dir = os.path.abspath(dir)
        self.port = port
        self.sink_port = sink_port
        self.dns_port = dns_port
        self.spool = spool
        self.workers = workers
        self.max_connections = max_connections
        self.size_limit = size_limit
        self.route = route
        self.redis_url = redis_url
        self.redis_pid = redis_pid
        self.reactor = reactor
        self.json_log = json_log
        #: A key of :data:`GATHER`.
        if gather not in GATHER:
            raise ValueError(f"gather={gather!r}")
        self.gather = gather
        #: ``False``: ``[node] cpu_affinity = "none"`` (workers not kept to a CPU each).
        self.pin = pin
        #: Run the node on PyPy (see :func:`pypy_interpreter`) instead of this Python.
        self.pypy = pypy
        self.runtime = ""
        if name is None:
            name = "sendarix-default" if spool == "default" else f"sendarix-{spool}-w{workers}"
            if reactor != "epoll":
                name += f"+{reactor}"
            if not json_log:
                name += "+nolog"
            if gather != "default":
                name += f"+{gather}"
            if not pin:
                name += "+nopin"
            if pypy:
                name += "+pypy"
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    def config_text(self) -> str:
        node_extra = ""
        if self.workers is not None:
            workers = f'"{self.workers}"' if isinstance(self.workers, str) else self.workers
            node_extra += f"workers = {workers}\n"
        if not self.pin:
            node_extra += 'cpu_affinity = "none"\n'
        if self.spool != "default":
            spool_url = "sqlite:spool.db" if self.spool == "sqlite" else self.redis_url
            node_extra += f'\n[spool]\nurl = "{spool_url}"\n'
        text = CONFIG.format(
            node_extra=node_extra, port=self.port,
            max_connections=self.max_connections, size_limit=self.size_limit,
            sink_port=self.sink_port, dns_port=self.dns_port,
            delivery_extra=GATHER[self.gather],
        )
        if not self.json_log:
            text += "\n[events]\njson_log = false\n"
        if self.route == "pool":
            text += POOL_ROUTE.format(domain=DOMAIN, sink_port=self.sink_port)
        else:
            text += DNS.format(dns_port=self.dns_port)
        return text

    def start(self, fresh: bool = True) -> None:
        """Start the system; ``fresh``: on a new, empty folder (else on the same spool)."""
        if fresh:
            shutil.rmtree(self.dir, ignore_errors=True)
            os.makedirs(self.dir)
        interpreter = None
        if self.pypy:
            interpreter = pypy_interpreter()
            runtime = check_pypy(interpreter)
            if runtime != self.runtime:
                self.runtime = runtime
                print(f"# {self.name}: the node runs on {runtime} ({interpreter})", flush=True)
        config = os.path.join(self.dir, "sendarix.toml")
        with open(config, "w") as f:
            f.write(self.config_text())
        self.log = os.path.join(self.dir, "relay.log")
        nofile = self.max_connections + 1000
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [*on_interpreter(REACTORS[self.reactor], interpreter), "--pidfile=",
                 "sendarix", "--config", config],
                cwd=self.dir, env=interpreter_env(interpreter), stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=lambda: raise_nofile(nofile),
            )
        try:
            self._wait_listening(60.0)
            if isinstance(self.workers, int) and self.workers > 1:
                self._check_workers()
            self._wait_all_workers(60.0)
        except BaseException:
            # A node that never came up (or only partly) is not left running.
            self.stop()
            raise

    def _wait_all_workers(self, timeout: float) -> None:
        """With worker processes (chosen or by default), wait until every one serves:
        the first answer may come from one worker while another is still starting,
        and its start would be counted against what is measured first (memory)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            workers = [p for p in self._pythons() if p != self.proc.pid]
            if serving(self.log, self.port) >= len(workers):
                return
            time.sleep(0.1)
        raise Failed(f"{self.name}: not every worker listens after {timeout:.0f}s")

    def _wait_listening(self, timeout: float) -> None:
        import socket

        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Refused(self._why())
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.recv(512)  # the banner: the node is ready, not just bound
                    return
            except OSError:
                time.sleep(0.1)
        raise Failed(f"{self.name} not listening after {timeout:.0f}s; see {self.log}")

    def _check_workers(self) -> None:
        """A build without worker processes runs one process: that is not this variant."""
        assert self.proc is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if len(self._pythons()) >= int(self.workers or 1):
                return
            time.sleep(0.2)
        self.stop()
        raise Refused(f"[node] workers = {self.workers} ran one process (not in this build)")

    def _pythons(self) -> list[int]:
        assert self.proc is not None
        return [p for p in process_tree(self.proc.pid)
                if _comm(p).startswith(("python", "pypy"))]

    def _why(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                lines = [line.strip() for line in f if line.strip()]
        except OSError:
            return "relay exited"
        for line in reversed(lines):
            if "Error" in line or "error" in line or "refus" in line:
                return line[-200:]
        return lines[-1][-200:] if lines else "relay exited"

    @property
    def pids(self) -> list[int]:
        return self._pythons() if self.proc is not None else []

    def roots(self) -> list[int]:
        """The root PIDs of this system: the node (with its workers) and its Redis."""
        out = [self.proc.pid] if self.proc is not None else []
        if self.redis_pid is not None and self.spool == "redis":
            out.append(self.redis_pid)
        return out

    def rss(self) -> tuple[int, int]:
        """(RSS, PSS) in bytes of the node's processes."""
        if self.proc is None:
            return 0, 0
        return process_tree_rss(self.proc.pid)

    def stop(self) -> None:
        """End the node (SIGTERM by PID, SIGKILL after 20 s)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        tree = process_tree(proc.pid)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in tree[1:]:  # workers that outlived their parent
            try:
                os.kill(pid, 9)
            except OSError:
                pass

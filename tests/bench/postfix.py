"""A throwaway Postfix instance: its own config, queue and data directories in a temp
folder, an smtpd on a free loopback port, everything relayed to the sink.

Durability is as shipped (cleanup fsyncs each queue file before smtpd answers 250).
The master.cf is Postfix's stock one (no chroot), with the smtpd service on our port.
Its process limit is raised so that each idle session of the memory test gets its own
smtpd, as Postfix serves one session per process (``default_process_limit`` is 100).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from sendarix.node.workers import pid_alive
from tests.bench.install import which
from tests.bench.sendarix import Failed, process_tree_rss

MASTER_CF = """\
127.0.0.1:{port} inet n - n - {maxproc} smtpd
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
tlsmgr     unix  -       -       n       1000?   1       tlsmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
proxywrite unix  -       -       n       -       1       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
local      unix  -       n       n       -       -       local
lmtp       unix  -       -       n       -       -       lmtp
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
config_directory = {dir}/etc
queue_directory = {dir}/queue
data_directory = {dir}/data
mail_owner = postfix
setgid_group = postdrop
maillog_file = {dir}/maillog
myhostname = postfix.bench.invalid
mydomain = bench.invalid
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relayhost = [127.0.0.1]:{sink_port}
message_size_limit = {size_limit}
smtpd_client_connection_count_limit = 0
biff = no
append_dot_mydomain = no
smtpd_tls_security_level = none
smtp_tls_security_level = may
"""


class PostfixSystem:
    """``start()`` a fresh instance in ``dir``; ``stop()`` with ``postfix -c DIR stop``."""

    name = "postfix"

    def __init__(self, dir: str, port: int, sink_port: int, maxproc: int,
                 size_limit: int) -> None:
        self.dir = os.path.abspath(dir)
        self.port = port
        self.sink_port = sink_port
        self.maxproc = maxproc
        self.size_limit = size_limit
        self.postfix = which("postfix") or "postfix"
        self._master_pid: int | None = None

    @property
    def config_dir(self) -> str:
        return os.path.join(self.dir, "etc")

    def start(self, fresh: bool = True) -> None:
        """Start the system; ``fresh``: on a new, empty folder (else on the same spool)."""
        if fresh:
            shutil.rmtree(self.dir, ignore_errors=True)
            os.makedirs(self.config_dir)
            os.makedirs(os.path.join(self.dir, "queue"))
            os.makedirs(os.path.join(self.dir, "data"))
        fields = {"dir": self.dir, "port": self.port, "sink_port": self.sink_port,
                  "maxproc": self.maxproc, "size_limit": self.size_limit}
        with open(os.path.join(self.config_dir, "main.cf"), "w") as f:
            f.write(MAIN_CF.format(**fields))
        with open(os.path.join(self.config_dir, "master.cf"), "w") as f:
            f.write(MASTER_CF.format(**fields))
        shutil.chown(os.path.join(self.dir, "data"), "postfix")
        log = os.path.join(self.dir, "postfix-commands.log")
        with open(log, "ab") as out:
            for args in (["set-permissions"], ["check"], ["start"]):
                done = subprocess.run(
                    [self.postfix, "-c", self.config_dir, *args],
                    stdout=out, stderr=subprocess.STDOUT, check=False,
                )
                if done.returncode != 0 and args == ["start"]:
                    raise Failed(f"postfix {args[0]} failed; see {log}")
        self._master_pid = self._read_master_pid()
        _wait_listening(self.port, 20.0)

    def _read_master_pid(self) -> int | None:
        path = os.path.join(self.dir, "queue", "pid", "master.pid")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with open(path) as f:
                    return int(f.read().strip())
            except (OSError, ValueError):
                time.sleep(0.1)
        return None

    def roots(self) -> list[int]:
        """The root PID of this instance (its master; every daemon is its child)."""
        return [self._master_pid] if self._master_pid is not None else []

    def smtpd_rss(self) -> tuple[int, int]:
        """(RSS, PSS) in bytes summed over this instance's smtpd processes."""
        if self._master_pid is None:
            return 0, 0
        return process_tree_rss(self._master_pid, only="smtpd")

    def stop(self) -> None:
        subprocess.run(
            [self.postfix, "-c", self.config_dir, "stop"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
        )
        pid = self._master_pid
        deadline = time.monotonic() + 15
        while pid is not None and pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid is not None and pid_alive(pid):
            subprocess.run([self.postfix, "-c", self.config_dir, "abort"], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._master_pid = None


def _wait_listening(port: int, timeout: float) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise Failed(f"nothing listening on 127.0.0.1:{port}")

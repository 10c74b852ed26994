"""A throwaway ``rspamd`` on a free loopback port, for tests of the rspamd filter.

The configuration is minimal: the normal worker only, no Redis, no modules, no DNS,
actions at the stock thresholds.  rspamd recognises the GTUBE test string by itself
and answers ``reject``.  Tests skip when rspamd is not installed, except on CI
(``CI=true``), where a missing rspamd is a failure.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from unittest import SkipTest

_START_TIMEOUT = 30.0

#: The GTUBE test string: any spam filter rejects a message holding it.
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

_CONFIG = """\
options {{
    pidfile = "{dir}/rspamd.pid";
    dbdir = "{dir}";
    filters = "";
    dns {{ nameserver = ["127.0.0.1:9"]; timeout = 1s; retransmits = 0; }}
    local_addrs = [];
}}
logging {{
    type = "file";
    filename = "{dir}/rspamd.log";
    level = "warning";
}}
actions {{
    reject = 15;
    add_header = 6;
    greylist = 4;
}}
worker "normal" {{
    bind_socket = "127.0.0.1:{port}";
    count = 1;
}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as r:
            return bool(r.read().strip() == b"pong")
    except OSError:
        return False


def start_rspamd(directory: str) -> tuple[int, Callable[[], None]]:
    """Start rspamd with its files in ``directory``; return (port, stop).  ``stop``
    ends it by its PID and waits for it to exit (it may be called twice)."""
    binary = shutil.which("rspamd") or next(
        (p for p in ("/usr/bin/rspamd", "/usr/sbin/rspamd") if os.path.exists(p)), None
    )
    if binary is None:
        if os.environ.get("CI") == "true":
            raise RuntimeError("rspamd is not installed (required on CI)")
        raise SkipTest("rspamd is not installed")
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    for _ in range(3):
        port = _free_port()
        conf = os.path.join(directory, "rspamd.conf")
        with open(conf, "w") as f:
            f.write(_CONFIG.format(dir=directory, port=port))
        with open(os.path.join(directory, "stderr.log"), "ab") as err:
            process = subprocess.Popen(
                [binary, "-f", "-u", user, "-g", group, "-c", conf],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err,
            )
        deadline = time.monotonic() + _START_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            if _answers_ping(port):
                return port, _stopper(process)
            time.sleep(0.05)
        _stopper(process)()
    raise RuntimeError(f"rspamd did not start; see {directory}/rspamd.log")


def _stopper(process: subprocess.Popen[bytes]) -> Callable[[], None]:
    def stop() -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait(timeout=10)

    return stop

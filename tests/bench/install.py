"""Installs the Debian packages the bench needs when they are missing.

``postfix`` ships the peer MTA and its load tools (``smtp-source``, ``smtp-sink`` in
/usr/sbin); ``redis-server`` backs the Redis spool variants.  Debian's postinst may
start the system Postfix on port 25: when it was not running before, it is stopped
again, so the machine is left as it was (the bench runs its own throwaway instance).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable

#: Debian package -> the programs the bench needs from it.
PACKAGES: dict[str, tuple[str, ...]] = {
    "postfix": ("postfix", "smtp-source", "smtp-sink", "postconf"),
    "redis-server": ("redis-server",),
}

_SBIN = ("/usr/sbin", "/sbin")


def which(program: str) -> str | None:
    """The program's path, also looking in sbin folders a user's PATH may lack."""
    found = shutil.which(program)
    if found:
        return found
    for folder in _SBIN:
        path = os.path.join(folder, program)
        if os.access(path, os.X_OK):
            return path
    return None


def missing_packages() -> list[str]:
    """The packages of PACKAGES with at least one program not installed."""
    return [pkg for pkg, programs in PACKAGES.items() if any(which(p) is None for p in programs)]


def _system_postfix_running() -> bool:
    postfix = which("postfix")
    if postfix is None:
        return False
    status = subprocess.run(
        [postfix, "status"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False
    )
    return status.returncode == 0


def ensure_installed(say: Callable[[str], None] = print) -> None:
    """apt-get install what is missing; stop a system Postfix the install started."""
    missing = missing_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(
            f"bench: missing Debian packages {' '.join(missing)}; install them "
            "(apt-get install) or run the bench as root"
        )
    was_running = _system_postfix_running()
    say(f"# installing {' '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *missing]):
        subprocess.run(command, stdout=subprocess.DEVNULL, env=env, check=True)
    if not was_running and _system_postfix_running():
        postfix = which("postfix")
        assert postfix is not None
        subprocess.run([postfix, "stop"], check=False, stderr=subprocess.DEVNULL)
        say("# stopped the system Postfix that the package install started")
    still = missing_packages()
    if still:
        raise SystemExit(f"bench: packages still missing after apt-get: {' '.join(still)}")

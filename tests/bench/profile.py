"""Optional py-spy profile of a Sendarix node under the smtp-source load (``--profile``).

``py-spy record --format raw`` writes collapsed stacks; ``summarize`` groups the
samples by thread and by the innermost Sendarix module on the stack (time in the
database thread's COMMIT, which waits for fsync, is shown on its own), which is the
table docs/performance.md cites.

py-spy follows the node's child processes too: with workers, the supervisor only
waits and every sample that counts comes from a worker.  ``gil=True`` keeps only the
samples of threads holding the GIL, which shows where the Python work goes rather
than where the threads wait (for a system call, or for the GIL itself).
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess

_FRAME_FILE = re.compile(r"\((.*?):(\d+)\)")
_THREAD = "thread ("


class Profiler:
    """``py-spy record`` attached to ``pid`` and its children until ``stop()``."""

    def __init__(self, pid: int, out: str, rate: int = 200, gil: bool = False) -> None:
        binary = shutil.which("py-spy")
        if binary is None:
            raise RuntimeError("--profile needs py-spy (pip install py-spy)")
        self.out = out
        #: py-spy's own messages: why a recording came out empty.
        self.log = out + ".log"
        command = [binary, "record", "--pid", str(pid), "--subprocesses", "--format", "raw",
                   "--output", out, "--rate", str(rate), "--threads", "--nonblocking"]
        if gil:
            command.append("--gil")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _thread_kind(name: str) -> str:
    if name == "MainThread":
        return "reactor"
    if name.startswith("sqlite-read:"):
        return "reader"
    if name.startswith("sqlite:"):
        return "database"
    return "other"


def summarize(raw_path: str, top: int = 14) -> list[str]:
    """Lines ``share% thread module`` for the largest groups of samples."""
    # (thread, module) -> samples; thread "?" is the root process's, named below.
    groups: collections.Counter[tuple[str, str]] = collections.Counter()
    root: collections.Counter[tuple[str, str]] = collections.Counter()
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            # With child processes each stack starts with the process chain, whose
            # command lines may hold ";": split at the thread, not before.
            processes, found, rest = stack.partition(_THREAD)
            if not found:
                continue
            thread_name, _, frames_text = rest.partition(";")
            thread = _thread_kind(thread_name.split(": ", 1)[-1])
            frames = frames_text.split(";")
            where = "twisted/other"
            for frame in reversed(frames):
                m = _FRAME_FILE.search(frame)
                if m and "sendarix/" in m.group(1):
                    where = "sendarix/" + m.group(1).split("sendarix/")[-1]
                    break
            if thread == "database" and "_run_batch" in frames[-1]:
                # The database thread's own frame: BEGIN/COMMIT; COMMIT waits
                # for the fsync.
                where = "stores/sqlite/database.py: BEGIN/COMMIT (fsync)"
            in_worker = "--worker" in processes
            (groups if in_worker else root)[(thread, where)] += n
            total += n
    # The node's own process only waits when it has workers (it is their supervisor);
    # without them it is the node itself, and its threads are named as a worker's.
    has_workers = bool(groups)
    for (thread, where), n in root.items():
        groups[("supervisor" if has_workers else thread, where)] += n
    if not total:
        return [f"(no samples{_why_empty(raw_path)})"]
    return [f"{n * 100 / total:5.1f}% {thread:8} {where}"
            for (thread, where), n in groups.most_common(top)]


def _why_empty(raw_path: str) -> str:
    """``": <py-spy's last message>"`` when its log (beside the recording) has one."""
    try:
        with open(raw_path + ".log", errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if "error" in line.lower()]
    return f": {(errors or lines)[-1]}" if lines else ""

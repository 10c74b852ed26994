"""Optional py-spy profile of a Sendarix node under the smtp-source load (``--profile``).

``py-spy record --format raw`` writes collapsed stacks; ``summarize`` groups the
samples by thread and by the innermost Sendarix module on the stack (time in the
database thread's COMMIT, which waits for fsync, is shown on its own), which is the
table docs/performance.md cites.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess

_FRAME_FILE = re.compile(r"\((.*?):(\d+)\)")


class Profiler:
    """``py-spy record`` attached to ``pid`` until ``stop()``."""

    def __init__(self, pid: int, out: str, rate: int = 200) -> None:
        binary = shutil.which("py-spy")
        if binary is None:
            raise RuntimeError("--profile needs py-spy (pip install py-spy)")
        self.out = out
        self.proc = subprocess.Popen(
            [binary, "record", "--pid", str(pid), "--format", "raw", "--output", out,
             "--rate", str(rate), "--threads", "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def summarize(raw_path: str, top: int = 14) -> list[str]:
    """Lines ``share% thread module`` for the largest groups of samples."""
    groups: collections.Counter[tuple[str, str]] = collections.Counter()
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(";")
            thread = "database" if "sqlite:" in frames[0] else "reactor"
            where = "twisted/other"
            for frame in reversed(frames[1:]):
                m = _FRAME_FILE.search(frame)
                if m and "sendarix/" in m.group(1):
                    where = "sendarix/" + m.group(1).split("sendarix/")[-1]
                    break
            if thread == "database" and "_run_batch" in frames[-1] and "COMMIT" not in where:
                # The database thread's own frame: BEGIN/SAVEPOINT/COMMIT; COMMIT waits
                # for the fsync.
                where = "stores/sqlite/database.py: BEGIN/SAVEPOINT/COMMIT (fsync)"
            groups[(thread, where)] += n
            total += n
    if not total:
        return ["(no samples)"]
    return [f"{n * 100 / total:5.1f}% {thread:8} {where}"
            for (thread, where), n in groups.most_common(top)]

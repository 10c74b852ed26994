"""Holds idle SMTP sessions open: ``python -m tests.bench.idle PORT COUNT TIMEOUT``.

Opens up to COUNT sessions to 127.0.0.1:PORT (at most 100 handshakes at a time), each
read its banner and sent EHLO, prints ``open N`` (N sessions that got their EHLO
reply within TIMEOUT seconds), and keeps them open until stdin is closed.
"""

from __future__ import annotations

import asyncio
import sys

from tests.bench.sendarix import raise_nofile

_AT_ONCE = 100


async def _open(port: int, gate: asyncio.Semaphore,
                held: list[asyncio.StreamWriter]) -> None:
    async with gate:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.readuntil(b"\r\n")
            writer.write(b"EHLO idle.bench.invalid\r\n")
            while not (await reader.readuntil(b"\r\n"))[3:4] == b" ":
                pass
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        held.append(writer)


async def _main(port: int, count: int, timeout: float) -> None:
    gate = asyncio.Semaphore(_AT_ONCE)
    held: list[asyncio.StreamWriter] = []
    tasks = [asyncio.ensure_future(_open(port, gate, held)) for _ in range(count)]
    if tasks:  # asyncio.wait refuses an empty set: none asked for, none to wait for
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
    print(f"open {len(held)}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for writer in held:
        writer.close()


def main() -> None:
    port, count, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    raise_nofile(count + 100)
    asyncio.run(_main(port, count, timeout))


if __name__ == "__main__":
    main()

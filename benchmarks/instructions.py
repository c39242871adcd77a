"""Instructions per request, counted by valgrind: a measure that a busy machine does not blur.

    python benchmarks/instructions.py [--python OLD/bin/python --python NEW/bin/python]
        [--dsn DSN] [--requests 3000]

On a shared machine, wall-clock numbers of one run can differ by half from the next.
``valgrind --tool=callgrind`` counts the client's user-space instructions instead:
the same for the same code and inputs, whatever else runs.  (The kernel's share, sending
on the loopback interface, is not counted: about a third of a query's time here.)  Each
measure runs ``N`` and ``2N`` requests after a warm-up, in fresh processes, and reports
the difference divided by ``N``, so start-up costs cancel out:

* ``standard``: 100 tasks, 10 connections, ``async with pool.connection()`` and one
  autocommit ``SELECT 1`` (one round trip) per request;
* ``acquire+release 100`` / ``1``: ``getconn``, a checkpoint, ``putconn`` (no query), 100 or
  1 tasks on 10 connections; ``semaphore 100`` / ``1``: the same with a bare
  ``trio.Semaphore`` + deque.

Each ``--python`` must have triopool installed (say the previous commit in a second
virtualenv); by default the interpreter running this script.  Needs ``valgrind``; about
a minute per measure.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

from _server import add_dsn_argument, server_dsn

# Run under valgrind by each interpreter: KIND TASKS REQUESTS DSN.
WORKLOAD = """
import sys, trio
from collections import deque
from triopool import open_pool

kind, tasks, requests, dsn = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

async def clients(body, count):
    per = count // tasks
    async def client():
        for _ in range(per):
            await body()
    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(client)

async def main():
    async with open_pool(dsn, min_size=10, max_size=10, wait=True,
                         kwargs={"autocommit": True}) as pool:
        semaphore, items = trio.Semaphore(10), deque(range(10))

        async def standard():
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")

        async def acquire_release():
            conn = await pool.getconn()
            await trio.lowlevel.checkpoint()
            await pool.putconn(conn)

        async def bare():
            async with semaphore:
                item = items.popleft()
                await trio.lowlevel.checkpoint()
                items.append(item)

        body = {"standard": standard, "acquire+release": acquire_release, "semaphore": bare}
        await clients(body[kind], 1000)  # warm up
        await clients(body[kind], requests)

trio.run(main)
"""

MEASURES = [
    ("standard", 100),
    ("acquire+release", 100),
    ("acquire+release", 1),
    ("semaphore", 100),
    ("semaphore", 1),
]


def instructions(python: str, kind: str, tasks: int, requests: int, dsn: str) -> int:
    """Instructions valgrind counts for one run (the interpreter's start included)."""
    completed = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            python,
            "-c",
            WORKLOAD,
            kind,
            str(tasks),
            str(requests),
            dsn,
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path("/"),  # the interpreter's own triopool, not a checkout here
    )
    found = re.search(r"Collected : (\d+)", completed.stderr)
    if completed.returncode != 0 or found is None:
        raise RuntimeError(f"{python} {kind} failed:\n{completed.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dsn_argument(parser)
    parser.add_argument("--python", action="append", help="an interpreter (repeatable)")
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (Debian: apt-get install valgrind)")
    pythons: list[str] = args.python or [sys.executable]
    n = args.requests
    with server_dsn(args.dsn) as dsn:
        for kind, tasks in MEASURES:
            for python in pythons:
                per_request = (
                    instructions(python, kind, tasks, 2 * n, dsn)
                    - instructions(python, kind, tasks, n, dsn)
                ) // n
                print(f"{kind:>16} {tasks:>3} tasks  {per_request:>8,} instructions  {python}")


if __name__ == "__main__":
    main()

"""Two (or more) installs of triopool side by side: throughput and acquire+release.

    python benchmarks/compare_versions.py --python OLD/bin/python --python NEW/bin/python
        [--dsn DSN] [--rounds 5] [--duration 3] [--cycles 50000]

Each interpreter must have a triopool installed (say the previous commit in a
second virtualenv: ``python -m venv old && old/bin/pip install 'git+file://$PWD@HEAD~1'``
with ``psycopg[binary]``).  Every measure runs in a fresh process of each
interpreter, alternating the order every round, against the same server:

* the standard workload (100 tasks, 10 connections, autocommit ``SELECT 1``
  per request: one round trip), through ``triopool._bench.worker``;
* acquire + checkpoint + release (no query) with 1 and 100 tasks on 10
  connections, and the same for a bare ``trio.Semaphore`` + deque in the same
  process (the measure of ``psycopg-on-trio.md``'s scheduler-actor table).

Medians are printed, with each run's value.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

from _server import add_dsn_argument, server_dsn
from triopool._bench._results import Settings

# Run by each interpreter: µs per acquire + checkpoint + release (a client holds its
# connection across at least one scheduling point) for the pool and for a bare
# Semaphore+deque, 1 task and 100 tasks.  Self-contained: the same code for every version.
ACQUIRE_RELEASE = """
import json, sys, time, trio
from collections import deque
from triopool import open_pool

async def clients(body, tasks, cycles):
    per_task = cycles // tasks
    async def client():
        for _ in range(per_task):
            await body()
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(client)
    return (time.perf_counter() - started) / (per_task * tasks) * 1e6

async def main(dsn, cycles):
    out = {}
    async with open_pool(dsn, min_size=10, max_size=10, wait=True) as pool:
        semaphore, items = trio.Semaphore(10), deque(range(10))

        async def pooled():
            conn = await pool.getconn()
            await trio.lowlevel.checkpoint()
            await pool.putconn(conn)

        async def bare():
            async with semaphore:
                item = items.popleft()
                await trio.lowlevel.checkpoint()
                items.append(item)

        for tasks in (1, 100):
            await clients(pooled, tasks, cycles // 10)  # warm up
            out[f"pool {tasks}"] = await clients(pooled, tasks, cycles)
            out[f"bare {tasks}"] = await clients(bare, tasks, cycles)
    print(json.dumps(out))

trio.run(main, sys.argv[1], int(sys.argv[2]))
"""


def run(python: str, *args: str) -> str:
    # Run from the filesystem root: the interpreter must import its own triopool,
    # not a checkout in the current folder.
    completed = subprocess.run(
        [python, *args], capture_output=True, text=True, check=False, cwd=Path("/")
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{python} failed:\n{completed.stderr[-2000:]}")
    return completed.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dsn_argument(parser)
    parser.add_argument("--python", action="append", required=True, help="an interpreter")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--cycles", type=int, default=50_000)
    args = parser.parse_args()
    pythons: list[str] = args.python
    qps: dict[str, list[float]] = {python: [] for python in pythons}
    micros: dict[str, dict[str, list[float]]] = {python: {} for python in pythons}
    with server_dsn(args.dsn) as dsn:
        settings = Settings(dsn=dsn, clients=100, pool_min=10, pool_max=10, duration=args.duration)
        for round_no in range(args.rounds):
            shift = round_no % len(pythons)
            for python in pythons[shift:] + pythons[:shift]:
                worker = ["-m", "triopool._bench.worker", "triopool", settings.to_json()]
                qps[python].append(json.loads(run(python, *worker))["qps"])
                measured = json.loads(run(python, "-c", ACQUIRE_RELEASE, dsn, str(args.cycles)))
                for key, value in measured.items():
                    micros[python].setdefault(key, []).append(value)
    print(f"{args.rounds} rounds, alternating; medians (each run in brackets)")
    for python in pythons:
        runs = ", ".join(f"{value:.0f}" for value in qps[python])
        print(
            f"\n{python}\n  standard workload: {statistics.median(qps[python]):8.0f} q/s  ({runs})"
        )
        for key, values in micros[python].items():
            runs = ", ".join(f"{value:.1f}" for value in values)
            print(f"  acquire+release, {key:<8} {statistics.median(values):6.1f} µs  ({runs})")
        for tasks in (1, 100):
            pool, bare = micros[python][f"pool {tasks}"], micros[python][f"bare {tasks}"]
            ratio = statistics.median(p / b for p, b in zip(pool, bare, strict=True))
            print(f"  pool ÷ bare, {tasks} tasks: {ratio:.2f} (median of each run's ratio)")


if __name__ == "__main__":
    main()

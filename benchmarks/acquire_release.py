"""Pure acquire + checkpoint + release cost (no query): triopool's pool vs trio.Semaphore + deque.

    python benchmarks/acquire_release.py [--dsn DSN] [--cycles N]

Prints µs per acquire + checkpoint + release with 1 and 100 tasks competing
for 10 connections, and the ratio to the bare Semaphore + deque (goal: <= 1.5
with 100 tasks).  Medians of 5 alternated runs.
"""

from __future__ import annotations

import argparse
import statistics

import trio

from _server import add_dsn_argument, server_dsn
from triopool import open_pool
from triopool._bench._workload import acquire_release_us, semaphore_deque_us

SIZE = 10


async def measure(dsn: str, cycles: int, rounds: int) -> None:
    async with open_pool(dsn, min_size=SIZE, max_size=SIZE, wait=True) as pool:
        for tasks in (1, 100):
            ours: list[float] = []
            bare: list[float] = []
            await acquire_release_us(pool, tasks, cycles // 10)  # warm up
            for _ in range(rounds):
                ours.append(await acquire_release_us(pool, tasks, cycles))
                bare.append(await semaphore_deque_us(SIZE, tasks, cycles))
            o, b = statistics.median(ours), statistics.median(bare)
            print(
                f"{tasks:>3} task(s): triopool {o:6.2f} µs   Semaphore+deque {b:6.2f} µs"
                f"   ratio {o / b:4.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dsn_argument(parser)
    parser.add_argument("--cycles", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with server_dsn(args.dsn) as dsn:
        trio.run(measure, dsn, args.cycles, args.rounds)


if __name__ == "__main__":
    main()

"""Pool throughput, side by side: triopool vs psycopg_pool on asyncio (and more).

    python benchmarks/pool_throughput.py [--dsn DSN] [--rounds 5] [--duration 3]

Two workloads, each a request = acquire, autocommit ``SELECT 1`` (one round
trip), release: *standard* (100 tasks, 10 connections) and *no contention*
(10 tasks, 10 connections).  Every stack runs in its own process, one at a
time, in rotating order over the rounds; medians and ratios to triopool are
printed.  Stacks: triopool, psycopg_pool (asyncio), and, when installed,
psycopg_pool on uvloop and asyncpg's pool twice: with its default reset
(a reset query per release: two round trips per request) and a no-op one.
"""

from __future__ import annotations

import argparse
import statistics

from _server import add_dsn_argument, server_dsn
from triopool._bench._compare import TRIOPOOL, available_stacks, compare
from triopool._bench._results import Settings

WORKLOADS = {"standard": 100, "no contention": 10}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dsn_argument(parser)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    stacks = available_stacks()
    with server_dsn(args.dsn) as dsn:
        for label, clients in WORKLOADS.items():
            settings = Settings(
                dsn=dsn, clients=clients, pool_min=10, pool_max=10, duration=args.duration
            )
            results = compare(settings, stacks, args.rounds)
            ours = statistics.median(r.qps for r in results[TRIOPOOL])
            print(f"\n{label}: {clients} tasks, 10 connections, {args.rounds} rounds (median q/s)")
            for stack in stacks:
                qps = statistics.median(r.qps for r in results[stack])
                runs = ", ".join(f"{r.qps:.0f}" for r in results[stack])
                print(f"  {stack:<30} {qps:9.0f}   triopool/this = {ours / qps:4.2f}   ({runs})")


if __name__ == "__main__":
    main()

"""One connection, sequential queries: triopool.Connection on trio vs psycopg on asyncio.

    python benchmarks/single_connection.py [--dsn DSN] [--rounds 5] [--duration 3] [--json]

Each side opens one autocommit connection and runs ``SELECT 1`` (execute + fetchone, one
round trip, psycopg's default ``prepare_threshold``) back to back for ``--duration``
seconds after a short warm-up: `triopool.Connection` under ``trio.run`` against stock
`psycopg.AsyncConnection` under ``asyncio.run``. Every run is a fresh process that imports
only its own event loop; the two sides alternate over the rounds (the first side swaps
every round) so drift on the machine hits both. Prints q/s per round, the medians and the
ratio triopool / asyncio (above 1: triopool is faster). No pool is involved: this is the
cost of the trio wait loop and cancellation machinery per round trip.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Literal, TypedDict

from _server import add_dsn_argument, server_dsn

Stack = Literal["triopool", "asyncio"]
STACKS: tuple[Stack, Stack] = ("triopool", "asyncio")
QUERY = "SELECT 1"
WARMUP_QUERIES = 200


class RunResult(TypedDict):
    queries: int
    seconds: float


# --- the workers (each runs in a process of its own) -----------------------------------


async def _triopool_run(dsn: str, duration: float) -> RunResult:
    from triopool import Connection

    async with await Connection.connect(dsn, autocommit=True) as conn:
        for _ in range(WARMUP_QUERIES):
            await (await conn.execute(QUERY)).fetchone()
        queries = 0
        start = now = time.perf_counter()
        deadline = start + duration
        while now < deadline:
            await (await conn.execute(QUERY)).fetchone()
            queries += 1
            now = time.perf_counter()
    return {"queries": queries, "seconds": now - start}


async def _asyncio_run(dsn: str, duration: float) -> RunResult:
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(WARMUP_QUERIES):
            await (await conn.execute(QUERY)).fetchone()
        queries = 0
        start = now = time.perf_counter()
        deadline = start + duration
        while now < deadline:
            await (await conn.execute(QUERY)).fetchone()
            queries += 1
            now = time.perf_counter()
    return {"queries": queries, "seconds": now - start}


def worker(stack: Stack, dsn: str, duration: float) -> None:
    """Run one side and print its `RunResult` as one JSON line on stdout."""
    if stack == "triopool":
        import trio

        result = trio.run(_triopool_run, dsn, duration)
    else:
        import asyncio

        result = asyncio.run(_asyncio_run(dsn, duration))
    print(json.dumps(result))


# --- the driver ------------------------------------------------------------------------


def run_in_subprocess(stack: Stack, dsn: str, duration: float) -> float:
    """Run one side in a fresh interpreter; return its queries per second."""
    argv = [sys.executable, __file__, "--worker", stack, "--dsn", dsn, f"--duration={duration}"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"the {stack} run failed (exit status {proc.returncode})")
    result: RunResult = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["queries"] / result["seconds"]


def compare(dsn: str, rounds: int, duration: float, *, verbose: bool) -> dict[Stack, list[float]]:
    qps: dict[Stack, list[float]] = {stack: [] for stack in STACKS}
    for round_no in range(rounds):
        order = STACKS if round_no % 2 == 0 else STACKS[::-1]
        for stack in order:
            qps[stack].append(run_in_subprocess(stack, dsn, duration))
        if verbose:
            line = "   ".join(f"{stack} {qps[stack][-1]:8.0f} q/s" for stack in STACKS)
            print(f"round {round_no + 1}/{rounds}: {line}", flush=True)
    return qps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dsn_argument(parser)
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--worker", choices=STACKS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1 or not args.duration > 0:
        parser.error("--rounds must be >= 1 and --duration > 0")
    if args.worker:
        if not args.dsn:
            parser.error("--worker needs --dsn")
        worker(args.worker, args.dsn, args.duration)
        return

    import psycopg

    if not args.json:
        print(
            f"one connection, sequential autocommit {QUERY!r}, psycopg {psycopg.__version__}:"
            f" {args.rounds} rounds x {args.duration:g} s per side",
            flush=True,
        )
    with server_dsn(args.dsn) as dsn:
        qps = compare(dsn, args.rounds, args.duration, verbose=not args.json)
    medians = {stack: statistics.median(qps[stack]) for stack in STACKS}
    ratio = medians["triopool"] / medians["asyncio"]
    if args.json:
        report = {
            "query": QUERY,
            "psycopg": psycopg.__version__,
            "rounds": args.rounds,
            "duration": args.duration,
            "qps": qps,
            "median_qps": medians,
            "ratio_triopool_to_asyncio": ratio,
        }
        print(json.dumps(report, indent=2))
        return
    print(
        f"median: triopool.Connection (trio) {medians['triopool']:.0f} q/s,"
        f" psycopg.AsyncConnection (asyncio) {medians['asyncio']:.0f} q/s,"
        f" ratio triopool/asyncio {ratio:.2f}"
    )


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the server (if ours) is already removed by then
        print("interrupted", file=sys.stderr)
        sys.exit(130)

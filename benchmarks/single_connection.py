"""One connection, sequential queries: triopool on trio, via trio-asyncio, psycopg and asyncpg.

    python benchmarks/single_connection.py [--dsn DSN] [--rounds 5] [--duration 3]
                                           [--stacks triopool,aio,asyncio,asyncpg] [--json]

Each side uses one autocommit connection and runs ``SELECT 1`` (execute + fetchone, one
round trip) back to back for ``--duration`` seconds after a short warm-up:

* ``triopool``: `triopool.Connection` under ``trio.run`` (psycopg's default
  ``prepare_threshold``);
* ``aio``: the asyncio bridge, a `triopool.aio.AsyncioPool` view (a stock
  `psycopg.AsyncConnection` on the pooled connection, borrowed once) used by asyncio code
  on ``trio_asyncio``'s loop inside ``trio.run``; the view never prepares statements
  (``prepare_threshold=None``), as users get it;
* ``asyncio``: stock `psycopg.AsyncConnection` under ``asyncio.run`` (default
  ``prepare_threshold``);
* ``asyncpg``: an asyncpg connection on uvloop, ``fetchval(QUERY)`` (asyncpg's own call
  for one value, prepared by its statement cache).

Every run is a fresh process that imports only its own event loop (the ``aio`` side
imports trio and trio-asyncio); the order of the sides rotates every round so drift on
the machine hits all of them. Prints q/s per round, the medians and the ratios to asyncio
(above 1: faster than asyncio), and where each query's time went in the client process:
user and system CPU (of all its threads), and the rest (waiting for the server, and for the
operating system to wake the process up; negative if other threads kept a CPU busy). No
pool is involved in the timed loop: this is the cost of each wait loop per round trip.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast

from _server import add_dsn_argument, server_dsn

if TYPE_CHECKING:  # the workers import only their own stack
    import psycopg

Stack = Literal["triopool", "aio", "asyncio", "asyncpg"]
STACKS: tuple[Stack, ...] = ("triopool", "aio", "asyncio", "asyncpg")
LABELS: dict[Stack, str] = {
    "triopool": "triopool.Connection (trio)",
    "aio": "AsyncioPool view (trio-asyncio)",
    "asyncio": "psycopg.AsyncConnection (asyncio)",
    "asyncpg": "asyncpg connection (uvloop)",
}
QUERY = "SELECT 1"
WARMUP_QUERIES = 200


class RunResult(TypedDict):
    queries: int
    seconds: float
    user: float  # CPU seconds of the timed loop
    system: float


# --- the workers (each runs in a process of its own) -----------------------------------


async def _triopool_run(dsn: str, duration: float) -> RunResult:
    from triopool import Connection

    async with await Connection.connect(dsn, autocommit=True) as conn:
        return await _timed_loop(conn, duration)


async def _asyncio_run(dsn: str, duration: float) -> RunResult:
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return await _timed_loop(conn, duration)


async def _timed_loop(conn: psycopg.AsyncConnection[Any], duration: float) -> RunResult:
    """The timed loop, on a `psycopg.AsyncConnection` (a `triopool.Connection` is one)."""

    async def once() -> None:
        await (await conn.execute(QUERY)).fetchone()

    return await _timed(once, duration)


async def _asyncpg_run(dsn: str, duration: float) -> RunResult:
    import asyncpg  # type: ignore[import-untyped, import-not-found, unused-ignore]

    from triopool._bench._asyncio import asyncpg_arguments

    conn = await asyncpg.connect(**asyncpg_arguments(dsn))

    async def once() -> None:
        await conn.fetchval(QUERY)

    try:
        return await _timed(once, duration)
    finally:
        await conn.close()  # noqa: ASYNC102  # asyncio code: the benchmark's own connection


async def _timed(once: Callable[[], Awaitable[None]], duration: float) -> RunResult:
    """Run `once` (one query, one round trip) back to back for `duration` seconds."""
    for _ in range(WARMUP_QUERIES):
        await once()
    queries = 0
    cpu = os.times()
    start = now = time.perf_counter()
    deadline = start + duration
    while now < deadline:
        await once()
        queries += 1
        now = time.perf_counter()
    used = os.times()
    return {  # noqa: ASYNC910  # warm-up awaits
        "queries": queries,
        "seconds": now - start,
        "user": used.user - cpu.user,
        "system": used.system - cpu.system,
    }


async def _aio_run(dsn: str, duration: float) -> RunResult:
    import trio_asyncio  # before psycopg is first imported (see triopool.aio)

    from triopool import open_pool
    from triopool.aio import AsyncioPool

    async def borrow_and_loop(apool: AsyncioPool) -> RunResult:
        async with apool.connection() as conn:
            return await _timed_loop(conn, duration)

    async with (
        trio_asyncio.open_loop(),
        open_pool(dsn, min_size=1, kwargs={"autocommit": True}, wait=True) as pool,
    ):
        result: RunResult = await trio_asyncio.aio_as_trio(borrow_and_loop)(AsyncioPool(pool))
        return result


def worker(stack: Stack, dsn: str, duration: float) -> None:
    """Run one side and print its `RunResult` as one JSON line on stdout."""
    if stack == "triopool":
        import trio

        result = trio.run(_triopool_run, dsn, duration)
    elif stack == "aio":
        import trio

        result = trio.run(_aio_run, dsn, duration)
    elif stack == "asyncpg":
        import uvloop  # type: ignore[import-untyped, import-not-found, unused-ignore]

        result = uvloop.run(_asyncpg_run(dsn, duration))
    else:
        import asyncio

        result = asyncio.run(_asyncio_run(dsn, duration))
    print(json.dumps(result))


# --- the driver ------------------------------------------------------------------------


def run_in_subprocess(stack: Stack, dsn: str, duration: float) -> RunResult:
    """Run one side in a fresh interpreter; return what it measured."""
    argv = [sys.executable, __file__, "--worker", stack, "--dsn", dsn, f"--duration={duration}"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"the {stack} run failed (exit status {proc.returncode})")
    result: RunResult = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def qps_of(run: RunResult) -> float:
    return run["queries"] / run["seconds"]


def time_split_us(runs: list[RunResult]) -> dict[str, float]:
    """Medians over `runs` of µs per query: user CPU, system CPU, and the rest."""
    user = statistics.median(run["user"] / run["queries"] * 1e6 for run in runs)
    system = statistics.median(run["system"] / run["queries"] * 1e6 for run in runs)
    total = statistics.median(run["seconds"] / run["queries"] * 1e6 for run in runs)
    return {"user": user, "system": system, "other": total - user - system}


def compare(
    dsn: str, stacks: tuple[Stack, ...], rounds: int, duration: float, *, verbose: bool
) -> dict[Stack, list[RunResult]]:
    runs: dict[Stack, list[RunResult]] = {stack: [] for stack in stacks}
    for round_no in range(rounds):
        shift = round_no % len(stacks)
        for stack in stacks[shift:] + stacks[:shift]:
            runs[stack].append(run_in_subprocess(stack, dsn, duration))
        if verbose:
            line = "   ".join(f"{stack} {qps_of(runs[stack][-1]):8.0f} q/s" for stack in stacks)
            print(f"round {round_no + 1}/{rounds}: {line}", flush=True)
    return runs


def parse_stacks(text: str) -> tuple[Stack, ...]:
    """``--stacks``: a comma-separated subset of `STACKS`, kept in `STACKS` order."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    if not names or not names <= set(STACKS):
        raise argparse.ArgumentTypeError(f"choose among {','.join(STACKS)}")
    return tuple(stack for stack in STACKS if stack in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dsn_argument(parser)
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run (default 3)")
    parser.add_argument(
        "--stacks",
        type=parse_stacks,
        default=STACKS,
        help=f"comma-separated sides to run (default {','.join(STACKS)})",
    )
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

    stacks = cast(tuple[Stack, ...], args.stacks)
    if not args.json:
        print(
            f"one connection, sequential autocommit {QUERY!r}, psycopg {psycopg.__version__}:"
            f" {args.rounds} rounds x {args.duration:g} s per side",
            flush=True,
        )
    with server_dsn(args.dsn) as dsn:
        runs = compare(dsn, stacks, args.rounds, args.duration, verbose=not args.json)
    qps = {stack: [qps_of(run) for run in runs[stack]] for stack in stacks}
    medians = {stack: statistics.median(qps[stack]) for stack in stacks}
    split = {stack: time_split_us(runs[stack]) for stack in stacks}
    ratios = {
        f"ratio_{stack}_to_asyncio": medians[stack] / medians["asyncio"]
        for stack in stacks
        if stack != "asyncio" and "asyncio" in medians
    }
    if "aio" in medians and "triopool" in medians:
        ratios["ratio_aio_to_triopool"] = medians["aio"] / medians["triopool"]
    if args.json:
        report = {
            "query": QUERY,
            "psycopg": psycopg.__version__,
            "rounds": args.rounds,
            "duration": args.duration,
            "qps": qps,
            "median_qps": medians,
            "median_us_per_query": split,
            **ratios,
        }
        print(json.dumps(report, indent=2))
        return
    print("median: " + ", ".join(f"{LABELS[s]} {medians[s]:.0f} q/s" for s in stacks))
    for stack in stacks:
        parts = ", ".join(f"{key} {value:.1f}" for key, value in split[stack].items())
        print(f"µs per query, {LABELS[stack]}: {parts}")
    if ratios:
        print(
            "ratios: " + ", ".join(f"{k.removeprefix('ratio_')} {v:.2f}" for k, v in ratios.items())
        )


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the server (if ours) is already removed by then
        print("interrupted", file=sys.stderr)
        sys.exit(130)

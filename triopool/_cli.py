"""The ``triopool`` command (also ``python -m triopool``)."""

from __future__ import annotations

import argparse
import sys

from ._bench._results import Settings

WORKLOADS = ("select1", "txn", "mixed")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="triopool", description="PostgreSQL connection pool for trio: tools."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="drive a pool with many trio tasks and report throughput and latency",
        description=(
            "Drive a triopool pool with many concurrent trio tasks (each request: acquire,"
            " query, release) and report throughput, acquire-wait and query-latency"
            " percentiles and the pool's stats. Without --dsn a throwaway PostgreSQL"
            " server is started and removed afterwards; with --dsn only SELECTs and"
            " temporary tables are used."
        ),
    )
    bench.add_argument("--dsn", help="server to use (default: a throwaway one)")
    bench.add_argument("--pool-min", type=int, default=10, help="pool min_size (default 10)")
    bench.add_argument("--pool-max", type=int, default=None, help="pool max_size (default: min)")
    bench.add_argument("--clients", type=_positive_int, default=100, help="tasks (default 100)")
    amount = bench.add_mutually_exclusive_group()
    amount.add_argument("--duration", type=_positive_float, help="seconds to run (default 5)")
    amount.add_argument("--queries", type=_positive_int, help="requests to run")
    bench.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="select1",
        help="select1: SELECT 1; txn: a short read-write transaction on a temp"
        " table; mixed: 80/20 of both (default select1)",
    )
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    bench.add_argument(
        "--compare",
        action="store_true",
        help="also run psycopg_pool on asyncio (and uvloop, asyncpg when"
        " installed), each in its own process, and print the ratios",
    )
    bench.add_argument(
        "--rounds", type=_positive_int, default=3, help="rounds for --compare (default 3)"
    )
    bench.add_argument("--plot", metavar="FILE.png", help="with --compare: draw the results")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ._bench._command import Options, run

    pool_max = args.pool_max if args.pool_max is not None else args.pool_min
    if args.pool_min < 0 or pool_max < max(args.pool_min, 1):
        print(
            "triopool bench: need 0 <= --pool-min <= --pool-max, --pool-max >= 1", file=sys.stderr
        )
        return 2
    if args.plot and not args.compare:
        print("triopool bench: --plot needs --compare", file=sys.stderr)
        return 2
    settings = Settings(
        dsn=args.dsn or "",
        workload=args.workload,
        clients=args.clients,
        pool_min=args.pool_min,
        pool_max=pool_max,
        duration=None if args.queries else (args.duration or 5.0),
        queries=args.queries,
    )
    options = Options(settings, bool(args.dsn), args.json, args.compare, args.rounds, args.plot)
    try:
        return run(options)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

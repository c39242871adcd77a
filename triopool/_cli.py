"""The ``triopool`` command (also ``python -m triopool``)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import NoReturn

from ._bench._results import Settings

WORKLOADS = ("select1", "txn", "mixed", "fetchval")
HELP_HINT = "see 'triopool bench --help'"


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the problem, then where to read more), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} ({HELP_HINT})\n")


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
    parser = _Parser(prog="triopool", description="PostgreSQL connection pool for trio: tools.")
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
        " table; mixed: 80/20 of both; fetchval: the one-shot call pool.fetchval('SELECT"
        " 1') (asyncpg's too; psycopg_pool, which has none, runs select1) (default"
        " select1)",
    )
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    bench.add_argument(
        "--compare",
        action="store_true",
        help="also run psycopg_pool on asyncio and uvloop, and asyncpg's pool with its"
        " default reset and with a no-op one (those installed), each in its own process,"
        " and print the ratios",
    )
    bench.add_argument(
        "--rounds", type=_positive_int, default=3, help="rounds for --compare (default 3)"
    )
    bench.add_argument(
        "--plot",
        metavar="FILE.png",
        help="with --compare: draw throughput, acquire-wait and latency per stack (.png, .svg"
        " or .pdf)",
    )
    return parser


def _check_dsn(dsn: str, compare: bool) -> str | None:
    """What is wrong with `dsn` for this run, if anything (nothing is connected to)."""
    import psycopg

    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as error:
        return (
            f"--dsn is no connection string ({str(error).strip()}): give a URL"
            " (postgresql://user@host:5432/dbname) or key=value pairs (host=... dbname=...)"
        )
    if compare and importlib.util.find_spec("asyncpg") is not None:
        from ._bench._asyncio import asyncpg_arguments

        try:
            asyncpg_arguments(dsn)
        except ValueError as error:
            return f"--dsn: {error}, which --compare runs: leave that parameter out"
    return None


def _check_plot(path: str) -> str | None:
    """What is wrong with writing the plot to `path`, if anything (nothing is written)."""
    if importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib: pip install 'triopool[bench]'"
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix not in kinds:
        kind = f".{suffix} files" if suffix else "files without a suffix"
        return f"--plot {path}: matplotlib cannot write {kind}: name a .png, .svg or .pdf file"
    folder = Path(path).parent
    if not folder.is_dir():
        return f"--plot {path}: no folder {folder}: create it first or pick another one"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"--plot {path}: cannot write into {folder}: pick another folder"
    return None


def main(argv: list[str] | None = None) -> int:
    """``triopool ...``: returns the exit status (2: bad usage, 1: the run failed)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    bench = parser.prog + " bench"
    pool_max = args.pool_max if args.pool_max is not None else args.pool_min
    problem = None
    if args.pool_min < 0 or pool_max < max(args.pool_min, 1):
        problem = (
            f"need 0 <= --pool-min <= --pool-max and --pool-max >= 1, got {args.pool_min}"
            f" and {pool_max}"
        )
    elif args.plot and not args.compare:
        problem = "--plot needs --compare"
    elif args.dsn is not None:
        problem = _check_dsn(args.dsn, args.compare)
    if problem is None and args.plot:
        problem = _check_plot(args.plot)
    if problem is not None:
        print(f"{bench}: {problem} ({HELP_HINT})", file=sys.stderr)
        return 2

    from ._bench._command import Options, run
    from ._bench._results import BenchFailed

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
    except BenchFailed as error:
        print(f"{bench}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:  # Ctrl-C in one of the run's tasks
        if group.subgroup(KeyboardInterrupt) is None:
            raise
    print("interrupted", file=sys.stderr)
    return 130

"""``triopool bench``: run the load, show progress, print the results.

The command line is parsed by `triopool._cli`; `run` does the work.  Without
``--dsn`` a throwaway server is started (`triopool.testing.PostgresServer`)
and removed afterwards, also on Ctrl-C.  With ``--dsn`` the benchmark only
reads (``SELECT``) and writes to temporary tables.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import trio

from ._compare import TRIOPOOL, available_stacks, compare
from ._results import BenchFailed, Result, Settings, one_line
from ._workload import run_triopool


@dataclass
class Options:
    """What ``triopool bench`` was asked to do."""

    settings: Settings
    dsn_given: bool
    as_json: bool
    compare: bool
    rounds: int
    plot: str | None


#: Under the --compare table: what the stacks' names mean.
STACKS_NOTE = (
    "Every stack uses autocommit connections: a select1 request is one round trip, plus"
    " asyncpg's reset query (RESET ALL, UNLISTEN *...) when a connection comes back with its"
    " default reset; with a no-op reset asyncpg only rolls back a connection left in a"
    " transaction, as the psycopg pools do.  fetchval: triopool's and asyncpg's"
    " pool.fetchval (no acquire wait of its own: all its time is latency), psycopg_pool"
    " select1."
)
#: Columns the --compare table needs for the stacks' names and every heading.
COMPARE_WIDTH = 96
#: Seconds to wait for the first connection to ``--dsn`` (unless it sets connect_timeout).
PROBE_TIMEOUT = 5


def _probe(dsn: str) -> None:
    """Connect once to `dsn`, so that a wrong address fails in seconds with libpq's reason.

    Raises:
        BenchFailed: the connection failed.
    """
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    try:
        with psycopg.connect(dsn, connect_timeout=params.get("connect_timeout", PROBE_TIMEOUT)):
            pass
    except psycopg.Error as error:
        raise BenchFailed(
            f"cannot connect to --dsn: {one_line(error)} (check the address, the user and"
            " that the server is running)"
        ) from None


@contextlib.contextmanager
def _server(dsn: str | None) -> Iterator[str]:
    if dsn:
        _probe(dsn)
        yield dsn
        return
    from ..testing import PostgresServer, ServerUnavailable

    print("starting a throwaway PostgreSQL server...", file=sys.stderr)
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(PostgresServer())
        except ServerUnavailable as error:
            raise BenchFailed(f"cannot start a throwaway server: {error}") from None
        yield server.dsn


def run(options: Options) -> int:
    """Run the benchmark; return the process exit status.

    Raises:
        BenchFailed: the run failed (the server is unreachable, or went away...).
    """
    with _server(options.settings.dsn if options.dsn_given else None) as dsn:
        settings = Settings(**{**options.settings.__dict__, "dsn": dsn})
        try:
            if options.compare:
                return _run_compare(settings, options)
            return _run_single(settings, options)
        except psycopg.Error as error:
            failure = f"{type(error).__name__}: {one_line(error)}"
            raise BenchFailed(f"the run failed: {failure}") from None


def _run_single(settings: Settings, options: Options) -> int:
    if options.as_json:
        result = trio.run(run_triopool, settings)
        print(json.dumps({"settings": _public(settings), "result": result.to_dict()}, indent=2))
        return 0 if result.queries else 1
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    total = settings.queries
    with Progress(
        TextColumn("[bold]triopool[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn() if total else TextColumn("{task.completed:,} requests"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(settings.workload, total=total or settings.duration)

        def update(done: int) -> None:
            if total:
                progress.update(task, completed=done)
            else:
                progress.update(task, completed=min(done, 10**12), total=None)

        result = trio.run(run_triopool, settings, update)
    _print_result(console, settings, result)
    return 0 if result.queries else 1


def _public(settings: Settings) -> dict[str, Any]:
    data = dict(settings.__dict__)
    data.pop("dsn")  # may hold a password
    return data


def _print_result(console: Any, settings: Settings, result: Result) -> None:
    from rich.table import Table

    table = Table(
        title=f"triopool bench: {settings.workload}, {settings.clients} clients, "
        f"pool {settings.pool_min}..{settings.pool_max}"
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("requests", f"{result.queries:,}")
    table.add_row("throughput", f"{result.qps:,.0f} requests/s")
    table.add_row(
        "errors", f"{result.errors}" + (f" {result.error_kinds}" if result.errors else "")
    )
    for name, values in (("acquire wait", result.acquire_ms), ("query latency", result.latency_ms)):
        for key in ("p50", "p90", "p99", "max"):
            table.add_row(f"{name} {key}", f"{values.get(key, 0.0):.2f} ms")
    console.print(table)
    stats = Table(title="pool stats (get_stats())")
    stats.add_column("key")
    stats.add_column("value", justify="right")
    for key, value in result.pool_stats.items():
        stats.add_row(key, f"{value:,}")
    console.print(stats)


def _run_compare(settings: Settings, options: Options) -> int:
    stacks = available_stacks()
    results = compare(
        settings,
        stacks,
        options.rounds,
        on_result=None
        if options.as_json
        else lambda r, res: print(
            f"round {r + 1}: {res.stack:<30} {res.qps:9,.0f} requests/s", file=sys.stderr
        ),
    )
    medians = {stack: statistics.median(r.qps for r in runs) for stack, runs in results.items()}
    ours = medians[TRIOPOOL]
    title = (
        f"{settings.workload}: {settings.clients} clients, pool {settings.pool_min}.."
        f"{settings.pool_max}, {options.rounds} round(s), each stack in its own process"
    )
    if options.as_json:
        print(
            json.dumps(
                {
                    "settings": _public(settings),
                    "rounds": options.rounds,
                    "median_qps": medians,
                    "triopool_ratio": {stack: ours / qps for stack, qps in medians.items() if qps},
                    "runs": {stack: [r.to_dict() for r in runs] for stack, runs in results.items()},
                },
                indent=2,
            )
        )
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{title} (medians)", caption=STACKS_NOTE)
        for column in ("stack", "requests/s", "triopool ÷ stack", "acquire p99", "latency p99"):
            if column == "stack":
                table.add_column(column, no_wrap=True)
            else:
                table.add_column(column, justify="right")
        for stack, runs in results.items():
            table.add_row(
                stack,
                f"{medians[stack]:,.0f}",
                f"{ours / medians[stack]:.2f}" if medians[stack] else "-",
                f"{statistics.median(r.acquire_ms['p99'] for r in runs):.2f} ms",
                f"{statistics.median(r.latency_ms['p99'] for r in runs):.2f} ms",
            )
        console = Console()
        console.width = max(console.width, COMPARE_WIDTH)  # a pipe gets 80 columns: too few
        console.print(table)
    if options.plot:
        _plot(results, options.plot, title)
        print(f"plot written to {options.plot}", file=sys.stderr)
    return 0


def _plot(results: dict[str, list[Result]], path: str, title: str) -> None:
    """Draw what a reader compares at a glance, one colour per stack: throughput (bars from
    0: the median, whiskers from the lowest to the highest round, a dot per round), then
    acquire-wait and query-latency percentiles (medians over the rounds)."""
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

    stacks = list(results)
    colours = [f"C{i}" for i in range(len(stacks))]
    rounds = max(len(runs) for runs in results.values())
    fig, (qps_ax, acquire_ax, latency_ax) = plt.subplots(1, 3, figsize=(15, 5.5))
    fig.suptitle(title)

    qps = [[r.qps for r in results[stack]] for stack in stacks]
    medians = [statistics.median(values) for values in qps]
    spread = [
        [m - min(values) for m, values in zip(medians, qps, strict=True)],
        [max(values) - m for m, values in zip(medians, qps, strict=True)],
    ]
    bars = qps_ax.bar(range(len(stacks)), medians, color=colours, yerr=spread, capsize=6)
    qps_ax.bar_label(bars, labels=[f"{m:,.0f}" for m in medians], label_type="center")
    for i, values in enumerate(qps):
        qps_ax.plot([i] * len(values), values, "k.", zorder=3)
    qps_ax.set_xticks(range(len(stacks)), [""] * len(stacks))
    qps_ax.set_ylim(bottom=0)
    qps_ax.yaxis.set_major_formatter("{x:,.0f}")
    qps_ax.set(title=f"throughput: median of {rounds} round(s), min..max", ylabel="requests/s")

    keys = ["p50", "p90", "p99"]
    width = 0.8 / len(stacks)
    for ax, name, measure in (
        (acquire_ax, "acquire wait", "acquire_ms"),
        (latency_ax, "query latency", "latency_ms"),
    ):
        for i, stack in enumerate(stacks):
            values = [
                statistics.median(getattr(r, measure)[key] for r in results[stack]) for key in keys
            ]
            offsets = [k - 0.4 + (i + 0.5) * width for k in range(len(keys))]
            ax.bar(offsets, values, width, color=colours[i], label=stack)
        ax.set_xticks(range(len(keys)), keys)
        ax.set_ylim(bottom=0)
        ax.set(title=f"{name} percentiles (median over rounds)", ylabel="ms")
    handles, labels = latency_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(stacks), 3))
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path)

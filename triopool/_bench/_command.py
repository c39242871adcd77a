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

import trio

from ._compare import TRIOPOOL, available_stacks, compare
from ._results import Result, Settings
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


@contextlib.contextmanager
def _server(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    from ..testing import PostgresServer

    print("starting a throwaway PostgreSQL server...", file=sys.stderr)
    with PostgresServer() as server:
        yield server.dsn


def run(options: Options) -> int:
    """Run the benchmark; return the process exit status."""
    with _server(options.settings.dsn if options.dsn_given else None) as dsn:
        settings = Settings(**{**options.settings.__dict__, "dsn": dsn})
        if options.compare:
            return _run_compare(settings, options)
        return _run_single(settings, options)


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
            f"round {r + 1}: {res.stack:<22} {res.qps:9,.0f} requests/s", file=sys.stderr
        ),
    )
    medians = {stack: statistics.median(r.qps for r in runs) for stack, runs in results.items()}
    ours = medians[TRIOPOOL]
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

        table = Table(
            title=f"{settings.workload}: {settings.clients} clients, pool "
            f"{settings.pool_min}..{settings.pool_max}, {options.rounds} rounds "
            "(medians; each stack in its own process)"
        )
        for column in ("stack", "requests/s", "triopool ÷ stack", "acquire p99", "latency p99"):
            table.add_column(column, justify="left" if column == "stack" else "right")
        for stack, runs in results.items():
            table.add_row(
                stack,
                f"{medians[stack]:,.0f}",
                f"{ours / medians[stack]:.2f}" if medians[stack] else "-",
                f"{statistics.median(r.acquire_ms['p99'] for r in runs):.2f} ms",
                f"{statistics.median(r.latency_ms['p99'] for r in runs):.2f} ms",
            )
        Console().print(table)
    if options.plot:
        _plot(results, options.plot)
    return 0


def _plot(results: dict[str, list[Result]], path: str) -> None:
    """Throughput per round and latency percentiles, one bar group per stack."""
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    stacks = list(results)
    for stack in stacks:
        left.plot([r.qps for r in results[stack]], marker="o", label=stack)
    left.set(title="throughput per round", xlabel="round", ylabel="requests/s")
    left.legend()
    keys = ["p50", "p90", "p99"]
    width = 0.8 / len(stacks)
    for i, stack in enumerate(stacks):
        values = [statistics.median(r.latency_ms[k] for r in results[stack]) for k in keys]
        right.bar([x + i * width for x in range(len(keys))], values, width, label=stack)
    right.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))], keys)
    right.set(title="query latency (median over rounds)", ylabel="ms")
    fig.tight_layout()
    fig.savefig(path)

"""Shared by the benchmark scripts: a DSN from ``--dsn`` or a throwaway server."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator


def add_dsn_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn", help="server to use (default: start a throwaway PostgreSQL server)"
    )


@contextlib.contextmanager
def server_dsn(dsn: str | None) -> Iterator[str]:
    """Yield `dsn`, or the DSN of a throwaway server removed afterwards."""
    if dsn:
        yield dsn
        return
    from triopool.testing import PostgresServer

    with PostgresServer() as server:
        yield server.dsn

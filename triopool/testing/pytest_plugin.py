"""pytest fixtures for a throwaway PostgreSQL server.

Enable them in a ``conftest.py``::

    pytest_plugins = ["triopool.testing.pytest_plugin"]

Fixtures:

* ``postgres_server`` (session): a started `PostgresServer`, or an
  `ExternalServer` when ``TRIOPOOL_TEST_DSN`` is set.
* ``postgres_dsn`` (session): its DSN.
* ``private_server`` (function): a throwaway server of the test's own, for
  tests that stop, restart, crash or freeze it.
* ``tcp_proxy`` (function, trio): a running `TcpProxy` in front of
  ``postgres_server``.

When no server can be started, tests using them are skipped with the reason --
except under ``CI=true`` (or ``1``), where a missing prerequisite fails them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest

from ._proxy import TcpProxy, open_tcp_proxy
from ._server import ExternalServer, PostgresServer, ServerUnavailable

DSN_ENV = "TRIOPOOL_TEST_DSN"


def _unavailable(error: ServerUnavailable) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI needs a PostgreSQL server: {error}", pytrace=False)
    pytest.skip(str(error))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer | ExternalServer]:
    """The suite's server: throwaway, or ``$TRIOPOOL_TEST_DSN``."""
    if dsn := os.environ.get(DSN_ENV):
        yield ExternalServer(dsn)
        return
    try:
        server = PostgresServer()
        server.start()
    except ServerUnavailable as error:
        _unavailable(error)
        raise  # not reached: skip/fail raise
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def postgres_dsn(postgres_server: PostgresServer | ExternalServer) -> str:
    """The DSN of ``postgres_server``."""
    return postgres_server.dsn


@pytest.fixture
def private_server() -> Iterator[PostgresServer]:
    """A throwaway server for this test alone (always throwaway, even with a DSN set)."""
    try:
        server = PostgresServer()
        server.start()
    except ServerUnavailable as error:
        _unavailable(error)
        raise
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
async def tcp_proxy(postgres_server: PostgresServer | ExternalServer) -> AsyncIterator[TcpProxy]:
    """A `TcpProxy` in front of ``postgres_server``."""
    async with open_tcp_proxy(postgres_server.host, postgres_server.port) as proxy:
        yield proxy

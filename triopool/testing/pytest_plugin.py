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
* ``replica_pair`` (function): a throwaway primary and its streaming
  `StandbyServer`, for tests that stop or promote them
  (`started_replica_pair` gives the same for a fixture of a wider scope).
* ``pgbouncer_factory`` (function): ``pgbouncer_factory(**options)`` starts a
  `PgBouncer` in front of ``postgres_server`` (options as `PgBouncer`'s);
  every one is removed after the test.
* ``pgbouncer`` (function): ``pgbouncer_factory()`` (transaction mode).

When no server (or no ``pgbouncer``) can be had, tests using them are skipped
with the reason -- except under ``CI=true`` (or ``1``), where a missing
prerequisite fails them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterator

import psycopg
import pytest

from ._pgbouncer import PgBouncer, find_pgbouncer
from ._proxy import TcpProxy, open_tcp_proxy
from ._replica import StandbyServer
from ._server import ExternalServer, PostgresServer, ServerUnavailable

DSN_ENV = "TRIOPOOL_TEST_DSN"


def _unavailable(error: ServerUnavailable, what: str = "a PostgreSQL server") -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI needs {what}: {error}", pytrace=False)
    pytest.skip(str(error))


@contextlib.contextmanager
def started_replica_pair() -> Iterator[tuple[PostgresServer, StandbyServer]]:
    """A started throwaway primary and its streaming standby, removed at the end.

    For fixtures of any scope: when they cannot be had, the test is skipped
    (or fails, under ``CI=true``).
    """
    primary = PostgresServer()
    standby = StandbyServer(primary)
    try:
        try:
            primary.start()
            standby.start()
            standby.wait_streaming()
        except ServerUnavailable as error:
            _unavailable(error)
        yield primary, standby
    finally:
        standby.cleanup()
        primary.cleanup()


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


@pytest.fixture
def replica_pair() -> Iterator[tuple[PostgresServer, StandbyServer]]:
    """A throwaway primary and its streaming standby, for this test alone."""
    with started_replica_pair() as pair:
        yield pair


@pytest.fixture
def pgbouncer_factory(
    postgres_server: PostgresServer | ExternalServer,
) -> Iterator[Callable[..., PgBouncer]]:
    """``pgbouncer_factory(**options)``: a started `PgBouncer` in front of ``postgres_server``.

    With ``TRIOPOOL_TEST_DSN`` set, PgBouncer logs into that server with the
    DSN's user, password and database.
    """
    try:
        binary = find_pgbouncer()  # now: a skip from inside a trio test would lose its reason
    except ServerUnavailable as error:
        _unavailable(error, "pgbouncer")
        raise  # not reached: skip/fail raise
    params = psycopg.conninfo.conninfo_to_dict(postgres_server.conninfo())
    login: dict[str, str] = {"user": str(params.get("user", "postgres"))}
    if "password" in params:
        login["password"] = str(params["password"])
    if "dbname" in params:
        login["dbname"] = str(params["dbname"])
    started: list[PgBouncer] = []

    def factory(**options: object) -> PgBouncer:
        options = {"binary": binary, **login, **options}
        bouncer = PgBouncer(postgres_server.host, postgres_server.port, **options)  # type: ignore[arg-type]
        started.append(bouncer)
        bouncer.start()
        return bouncer

    try:
        yield factory
    finally:
        for bouncer in started:
            bouncer.cleanup()


@pytest.fixture
def pgbouncer(pgbouncer_factory: Callable[..., PgBouncer]) -> PgBouncer:
    """A `PgBouncer` in transaction mode in front of ``postgres_server``."""
    return pgbouncer_factory()

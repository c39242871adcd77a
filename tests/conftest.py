"""The suite runs against a throwaway PostgreSQL server (see triopool.testing).

The fixtures here serve the connection tests (tests/test_connection*.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from _connection_helpers import make_app_name, opened

import triopool

pytest_plugins = ["triopool.testing.pytest_plugin"]

Conn = triopool.Connection[Any]


@pytest.fixture
def app_name(request: pytest.FixtureRequest) -> str:
    """An ``application_name`` naming the test, to find its backends on the server."""
    return make_app_name(str(request.node.name))


@pytest.fixture
async def conn(postgres_dsn: str, app_name: str) -> AsyncIterator[Conn]:
    """A connection in psycopg's default mode (autocommit off)."""
    async with opened(postgres_dsn, application_name=app_name) as connection:
        yield connection


@pytest.fixture
async def aconn(postgres_dsn: str, app_name: str) -> AsyncIterator[Conn]:
    """An autocommit connection."""
    async with opened(postgres_dsn, application_name=app_name, autocommit=True) as connection:
        yield connection


@pytest.fixture
async def admin(postgres_dsn: str) -> AsyncIterator[Conn]:
    """A second, autocommit connection to observe the first one from the outside."""
    async with opened(
        postgres_dsn, application_name=make_app_name("admin"), autocommit=True
    ) as connection:
        yield connection

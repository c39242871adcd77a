"""SQLAlchemy's asyncio engine on triopool connections, under trio-asyncio.

The engine gets its connections from an `AsyncioPool` (``async_creator``) and
keeps none of its own (``poolclass=NullPool``): when SQLAlchemy closes a
connection, it goes back to the triopool pool, whose limits govern the engine.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
import pytest
import sqlalchemy as sa
import trio
import trio_asyncio
from _fault_helpers import settle
from _pool_checks import Server, app_name
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import NullPool

import triopool
from triopool.aio import AsyncioPool

T = TypeVar("T")


@pytest.fixture
def name() -> str:
    return app_name("tp_sqla")


def engine_for(apool: AsyncioPool) -> AsyncEngine:
    """An engine whose every connection is borrowed from `apool` and given back on close."""
    return create_async_engine(
        "postgresql+psycopg://", async_creator=apool.getconn, poolclass=NullPool
    )


async def run_with_engine(
    server: Server,
    name: str,
    code: Callable[[AsyncEngine, triopool.ConnectionPool], Awaitable[T]],
    **pool_kwargs: Any,
) -> tuple[T, triopool.ConnectionPool]:
    """Run asyncio `code(engine, pool)` on trio-asyncio's loop; check the pool settled."""
    async with (
        trio_asyncio.open_loop(),
        triopool.open_pool(
            server.conninfo(application_name=name), wait=True, **pool_kwargs
        ) as pool,
    ):
        engine = engine_for(AsyncioPool(pool))

        async def main() -> T:
            try:
                return await code(engine, pool)
            finally:
                await engine.dispose()  # noqa: ASYNC102  # asyncio code

        result = await trio_asyncio.aio_as_trio(main)()
        await settle(pool, server, name)  # nothing lent, one backend per connection
        status = pool.status()
        assert status.available == status.size and status.waiting == 0
        return result, pool


async def test_core_round_trip_and_rollback(postgres_server: Server, name: str) -> None:
    """Core on one connection: a temp table, inserts, a select, and an error that
    rolls its transaction back; the connection then goes back to the pool."""
    metadata = sa.MetaData()
    items = sa.Table(
        "tp_sqla_items",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("label", sa.Text, nullable=False),
        prefixes=["TEMPORARY"],
    )

    async def code(engine: AsyncEngine, pool: triopool.ConnectionPool) -> list[Any]:
        async with engine.connect() as conn:
            await conn.run_sync(metadata.create_all)
            await conn.execute(sa.insert(items), [{"id": 1, "label": "a"}, {"id": 2, "label": "b"}])
            await conn.commit()
            assert pool.status().available == pool.status().size - 1  # lent while in use
            with pytest.raises(sa.exc.IntegrityError) as info:
                async with conn.begin():
                    await conn.execute(sa.insert(items).values(id=3, label="c"))
                    await conn.execute(sa.insert(items).values(id=1, label="duplicate"))
            assert isinstance(info.value.orig, psycopg.errors.UniqueViolation)
            rows = (await conn.execute(sa.select(items).order_by(items.c.id))).all()
            await conn.run_sync(metadata.drop_all)
            await conn.commit()
        return [tuple(row) for row in rows]

    rows, pool = await run_with_engine(postgres_server, name, code, min_size=1, max_size=1)
    assert rows == [(1, "a"), (2, "b")]  # id 3 was rolled back with the failed transaction
    stats = pool.get_stats()
    assert stats["returns_bad"] == 0 and stats["connections_num"] == 1


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "tp_sqla_notes"
    __table_args__ = {"prefixes": ["TEMPORARY"]}

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str]


async def test_orm_sessions_reuse_the_pooled_connection(postgres_server: Server, name: str) -> None:
    """ORM sessions, each on a connection borrowed and given back: with one pooled
    connection they all run on the same backend (so they see its temp table),
    and a session that fails rolls back without spoiling the connection."""

    async def code(engine: AsyncEngine, pool: triopool.ConnectionPool) -> list[str]:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        pids = set()
        async with AsyncSession(engine) as session:
            session.add_all([Note(id=1, text="first"), Note(id=2, text="second")])
            await session.commit()
            pids.add(await session.scalar(sa.text("SELECT pg_backend_pid()")))
        with pytest.raises(ZeroDivisionError):
            async with AsyncSession(engine) as session, session.begin():
                session.add(Note(id=3, text="never"))
                await session.flush()  # sent to the server, then rolled back
                raise ZeroDivisionError
        async with AsyncSession(engine) as session:
            notes = (await session.scalars(sa.select(Note).order_by(Note.id))).all()
            pids.add(await session.scalar(sa.text("SELECT pg_backend_pid()")))
            texts = [note.text for note in notes]
        assert len(pids) == 1
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
        return texts

    texts, pool = await run_with_engine(postgres_server, name, code, min_size=1, max_size=1)
    assert texts == ["first", "second"]
    stats = pool.get_stats()
    assert stats["returns_bad"] == 0 and stats["connections_num"] == 1
    assert stats["requests_num"] >= 5


async def test_pool_max_size_limits_concurrent_sessions(postgres_server: Server, name: str) -> None:
    """Five asyncio tasks each hold a connection in a transaction for a while; the
    pool's ``max_size=2`` limits them, as the server sees it too (backends of
    this pool that are in a transaction)."""
    in_use = sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name AND state <> 'idle'"
    )

    async def code(engine: AsyncEngine, pool: triopool.ConnectionPool) -> tuple[int, int, int]:
        holding = peak_tasks = peak_server = peak_lent = 0

        async def task() -> None:
            nonlocal holding, peak_tasks, peak_server, peak_lent
            async with engine.connect() as conn:
                holding += 1
                peak_tasks = max(peak_tasks, holding)
                status = pool.status()
                peak_lent = max(peak_lent, status.size - status.available)
                # SQLAlchemy begins a transaction: this backend stays 'idle in
                # transaction' until the connection is given back.
                seen = await conn.scalar(in_use, {"name": name})
                assert seen is not None
                peak_server = max(peak_server, seen)
                await asyncio.sleep(0.1)
                seen = await conn.scalar(in_use, {"name": name})
                assert seen is not None
                peak_server = max(peak_server, seen)
                holding -= 1

        await asyncio.gather(*(task() for _ in range(5)))
        return peak_tasks, peak_lent, peak_server

    (tasks, lent, server), pool = await run_with_engine(
        postgres_server, name, code, min_size=2, max_size=2
    )
    assert tasks == 2 and lent == 2 and server == 2
    stats = pool.get_stats()
    assert stats["requests_num"] == 5 and stats["requests_queued"] >= 3
    assert stats["connections_num"] == 2 and stats["returns_bad"] == 0


async def test_invalidated_connection_is_replaced(postgres_server: Server, name: str) -> None:
    """A connection that breaks under SQLAlchemy (its backend terminated) is closed
    by SQLAlchemy, which gives it back: the pool discards it and opens another."""

    async def code(engine: AsyncEngine, pool: triopool.ConnectionPool) -> bool:
        async with engine.connect() as conn:
            pid = await conn.scalar(sa.text("SELECT pg_backend_pid()"))
            await conn.commit()
            async with engine.connect() as other:  # a second pooled connection
                await other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            with pytest.raises(sa.exc.DBAPIError) as info:
                await conn.execute(sa.text("SELECT 1"))
            return info.value.connection_invalidated

    invalidated, pool = await run_with_engine(
        postgres_server, name, code, min_size=2, max_size=2, drain_on_failover=False
    )
    assert invalidated
    stats = pool.get_stats()
    assert stats["returns_bad"] == 1 and stats["connections_num"] == 3  # replaced


async def test_cancelled_query_gives_the_connection_back(
    postgres_server: Server, name: str
) -> None:
    """An asyncio timeout during a query: psycopg cancels it on the server, and
    SQLAlchemy gives the connection back in good shape (kept, not replaced)."""

    async def code(engine: AsyncEngine, pool: triopool.ConnectionPool) -> object:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2), engine.connect() as conn:
                await conn.execute(sa.text("SELECT pg_sleep(10)"))
        async with engine.connect() as conn:
            return await conn.scalar(sa.text("SELECT 1"))

    with trio.fail_after(5):  # not waiting for the sleep to end
        one, pool = await run_with_engine(postgres_server, name, code, min_size=1, max_size=1)
    assert one == 1
    stats = pool.get_stats()
    assert stats["returns_bad"] == 0 and stats["connections_num"] == 1


async def test_pool_timeout_reaches_sqlalchemy(postgres_server: Server, name: str) -> None:
    """With every pooled connection held, a new engine connection waits for the
    request's timeout (here passed by the creator), then fails with SQLAlchemy's
    `OperationalError` wrapping triopool's `PoolTimeout`."""

    async def code(engine: AsyncEngine, pool: triopool.ConnectionPool) -> BaseException | None:
        apool = AsyncioPool(pool)
        impatient = create_async_engine(
            "postgresql+psycopg://",
            async_creator=functools.partial(apool.getconn, timeout=0.2),
            poolclass=NullPool,
        )
        async with engine.connect() as held:
            await held.execute(sa.text("SELECT 1"))
            with pytest.raises(sa.exc.OperationalError) as info:
                await impatient.connect()
        return info.value.orig

    error, pool = await run_with_engine(postgres_server, name, code, min_size=1, max_size=1)
    assert isinstance(error, triopool.PoolTimeout)
    assert "couldn't get a connection after 0.20 sec" in str(error)
    assert pool.get_stats()["requests_errors"] == 1


async def test_streaming_results_use_a_server_side_cursor(
    postgres_server: Server, name: str
) -> None:
    """``stream()`` (a named, server-side cursor on the view) fetches in chunks."""

    async def code(engine: AsyncEngine, pool: triopool.ConnectionPool) -> list[int]:
        query = sa.text("SELECT generate_series(1, 1000) AS n")
        cursors = sa.text("SELECT count(*) FROM pg_cursors")
        async with engine.connect() as conn:
            result = await conn.stream(query, execution_options={"yield_per": 100})
            numbers = result.scalars()
            got = list(await numbers.fetchmany(100))
            assert await conn.scalar(cursors) == 1  # the rest is still on the server
            got += await numbers.all()
            assert await conn.scalar(cursors) == 0
        return got

    got, _ = await run_with_engine(postgres_server, name, code, min_size=1, max_size=1)
    assert got == list(range(1, 1001))

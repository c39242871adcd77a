"""How-to, asyncio interop: SQLAlchemy's asyncio engine on the trio pool's connections."""

import asyncio
import sys

import sqlalchemy as sa
import trio
import trio_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

import triopool
import triopool.aio

metadata = sa.MetaData()
events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),
    prefixes=["TEMPORARY"],
)


def engine_for(apool: triopool.aio.AsyncioPool) -> AsyncEngine:
    return create_async_engine(
        "postgresql+psycopg://",  # the dialect only: the connections come from apool
        async_creator=apool.getconn,  # borrowed from the trio pool...
        poolclass=NullPool,  # ...and given back when SQLAlchemy closes them
    )


async def record_events(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.run_sync(metadata.create_all)
        await conn.execute(sa.insert(events), [{"id": 1, "kind": "start"}, {"id": 2, "kind": "ok"}])
        await conn.commit()
        try:
            async with conn.begin():
                await conn.execute(sa.insert(events).values(id=3, kind="lost"))
                await conn.execute(sa.insert(events).values(id=1, kind="duplicate"))
        except sa.exc.IntegrityError as ex:
            print("rolled back:", type(ex.orig).__name__)
        result = await conn.execute(sa.select(events.c.kind).order_by(events.c.id))
        print("events:", result.scalars().all())
        await conn.run_sync(metadata.drop_all)
        await conn.commit()


async def many_tasks(engine: AsyncEngine, pool: triopool.ConnectionPool) -> None:
    most_lent = 0

    async def task() -> None:
        nonlocal most_lent
        async with engine.connect() as conn:
            status = pool.status()
            most_lent = max(most_lent, status.size - status.available)
            await conn.execute(sa.text("SELECT pg_sleep(0.05)"))

    await asyncio.gather(*(task() for _ in range(5)))
    print("5 tasks, never more than max_size connections:", most_lent <= pool.max_size)


async def main(dsn: str) -> None:
    async with (
        trio_asyncio.open_loop(),
        triopool.open_pool(dsn, min_size=2, max_size=2) as pool,
    ):
        engine = engine_for(triopool.aio.AsyncioPool(pool))
        await trio_asyncio.aio_as_trio(record_events)(engine)
        await trio_asyncio.aio_as_trio(many_tasks)(engine, pool)
        await trio_asyncio.aio_as_trio(engine.dispose)()
        status = pool.status()
        print("all back in the trio pool:", status.available == status.size)
        print("requests served by the trio pool:", pool.get_stats()["requests_num"])


if __name__ == "__main__":
    trio.run(main, sys.argv[1])

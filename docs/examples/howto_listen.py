"""How-to, LISTEN/NOTIFY: a listener on the pool, and the gaps it may report."""

import sys

import trio

import triopool


async def resync() -> None:
    """Catch up after a gap (e.g. re-read the jobs table): here, nothing to do."""


async def main(dsn: str) -> None:
    async with (
        triopool.open_pool(dsn, min_size=1) as pool,
        pool.listener("jobs", "events") as notifications,
    ):
        # The server is listening once the block is entered: notify something.
        async with pool.connection() as conn:  # delivered when the transaction commits
            await conn.execute("SELECT pg_notify('jobs', 'job 1')")
            await conn.execute("SELECT pg_notify('events', 'done')")

        async for n in notifications:
            if isinstance(n, triopool.ListenerGap):
                await resync()  # notifications may have been lost
                continue
            print(n.channel, n.payload)
            if n.payload == "done":
                break


if __name__ == "__main__":
    trio.run(main, sys.argv[1])

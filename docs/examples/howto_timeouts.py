"""How-to, timeouts and cancellation: cancel scopes, PoolTimeout, and what is left behind."""

import sys

import trio

import triopool

# This application's queries still running on the server.
RUNNING_SLEEPS = """
    SELECT count(*) FROM pg_stat_activity
    WHERE state = 'active' AND query = 'SELECT pg_sleep(10)'
      AND application_name = current_setting('application_name')
"""


async def main(dsn: str) -> None:
    async with triopool.open_pool(dsn, min_size=1, max_size=1, wait=True) as pool:
        # A cancel scope bounds everything inside it: the wait for a connection and the query.
        with trio.move_on_after(0.2) as scope:
            async with pool.connection() as conn:
                await conn.execute("SELECT pg_sleep(10)")
        print("gave up:", scope.cancelled_caught)

        # The query was cancelled on the server, and the connection came back usable.
        async with pool.connection() as conn:
            cur = await conn.execute(RUNNING_SLEEPS)
            print("still sleeping on the server:", await cur.fetchone())

            # `timeout` bounds only the wait for a connection (here, the pool's only one
            # is taken), and raises PoolTimeout.
            try:
                async with pool.connection(timeout=0.1):
                    pass
            except triopool.PoolTimeout as exc:
                print(str(exc).split(" (")[0])  # the message goes on with the pool's state


if __name__ == "__main__":
    trio.run(main, sys.argv[1])

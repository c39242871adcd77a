"""How-to, multi-host and failover: several hosts in one conninfo, and a read/write split."""

import socket
import sys

import psycopg
import trio

import triopool


async def show_failover(hosts: str) -> None:
    """The first host is down: libpq (driven by trio) moves on to the next one."""
    pool = triopool.ConnectionPool(
        hosts,
        kwargs={"target_session_attrs": "read-write", "connect_timeout": 2},
        check=triopool.ConnectionPool.check_connection,  # never hand out a dead connection
        min_size=1,
    )
    async with pool, pool.connection() as conn:
        cur = await conn.execute("SELECT pg_is_in_recovery()")
        print("connected to a primary:", await cur.fetchone() == (False,))


async def server_role(pool: triopool.ConnectionPool) -> str:
    """Whether `pool` is connected to the primary or to a standby."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT pg_is_in_recovery()")
        in_recovery = await cur.fetchone()
    return "standby" if in_recovery == (True,) else "primary"


async def read_write_split(hosts: str) -> None:
    """Two pools in one nursery: one for writes on the primary, one for reads on a standby
    (if there is one)."""
    primary = triopool.ConnectionPool(
        hosts, kwargs={"target_session_attrs": "read-write"}, min_size=2
    )
    replicas = triopool.ConnectionPool(
        hosts,
        kwargs={"target_session_attrs": "prefer-standby", "load_balance_hosts": "random"},
        min_size=2,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(primary.run)
        await nursery.start(replicas.run)

        print("writes go to the", await server_role(primary))
        print("reads go to the", await server_role(replicas))

        await primary.close()  # both run() tasks return: the nursery ends
        await replicas.close()


def two_hosts(dsn: str, down_port: int) -> str:
    """A conninfo listing a host that is down, then the server at `dsn`."""
    server = psycopg.conninfo.conninfo_to_dict(dsn)
    return psycopg.conninfo.make_conninfo(
        dsn,
        host=f"127.0.0.1,{server['host']}",
        port=f"{down_port},{server.get('port', 5432)}",
    )


async def main(dsn: str) -> None:
    # In production, e.g. "host=db1,db2,db3 dbname=app".  Here the first host is a port
    # that is bound but not listening (connections to it are refused), the second the
    # server at `dsn`.
    with socket.socket() as down:
        down.bind(("127.0.0.1", 0))
        hosts = two_hosts(dsn, down.getsockname()[1])
        await show_failover(hosts)
        await read_write_split(hosts)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])

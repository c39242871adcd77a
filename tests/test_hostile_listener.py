"""Hostile tests: the listener's reconnection with misbehaving callables, network
resets, several consumers and channel changes all at once.

The pools have ``min_size=0`` and the listener's connection is the only one with
the test's ``application_name``: the server's count of it tells whether it is there.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from _fault_helpers import until
from _hostile_helpers import WITHIN, Boom, Stop
from _hostile_helpers import name as name
from _pool_checks import Server, settled_backends

from triopool import ConnectionPool, ListenerGap
from triopool.listener import Notifications
from triopool.testing import TcpProxy

Item = psycopg.Notify | ListenerGap


async def notify(server: Server, channel: str, payload: str) -> None:
    await trio.to_thread.run_sync(server.execute, "SELECT pg_notify(%s, %s)", (channel, payload))


async def next_item(notifications: Notifications) -> Item:
    with trio.fail_after(WITHIN):
        return await anext(notifications)


@pytest.mark.parametrize("failure", ["exception", "base-exception"])
async def test_kwargs_callable_failing_at_reconnection(
    postgres_server: Server, name: str, failure: str
) -> None:
    """The listener's backend is terminated and the pool's ``kwargs`` callable then
    fails.  An Exception: the listener retries with backoff, and once the callable
    works again it reconnects and yields a gap.  A BaseException: it comes out of
    the listener's block, alone; the pool is unharmed and serves on."""
    broken = False

    def kwargs() -> dict[str, Any]:
        if broken:
            if failure == "exception":
                raise Boom("no credentials now")
            raise Stop
        return {"application_name": name}

    async with ConnectionPool(
        postgres_server.dsn, kwargs=kwargs, min_size=0, max_size=1, timeout=WITHIN
    ) as pool:
        try:
            async with pool.listener("tp_hostile_kw") as notifications:
                assert await settled_backends(postgres_server, name, 1) == 1
                broken = True
                await trio.to_thread.run_sync(postgres_server.terminate_backends, name)
                if failure == "exception":
                    await until(
                        lambda: isinstance(notifications._last_error, Boom), WITHIN, "retrying"
                    )
                    broken = False
                    assert await next_item(notifications) == ListenerGap("reconnected")
                    await notify(postgres_server, "tp_hostile_kw", "after")
                    item = await next_item(notifications)
                    assert isinstance(item, psycopg.Notify)
                    assert item.payload == "after"
                else:
                    await next_item(notifications)
                    pytest.fail("iteration went on")
        except Stop:
            assert failure == "base-exception"
        broken = False
        assert await pool.fetchval("SELECT 1") == 1
    assert await settled_backends(postgres_server, name, 0) == 0


async def test_network_reset_with_two_consumers_and_a_channel_change(
    tcp_proxy: TcpProxy, postgres_server: Server, name: str
) -> None:
    """Two tasks iterate one listener through a TCP proxy; every connection is
    reset while a third task adds a channel.  The listener reconnects; the gap and
    then each notification (on the old and the new channel) reach exactly one
    consumer; closing the pool ends both consumers and the ``listen()`` call."""
    conninfo = postgres_server.conninfo(
        host=tcp_proxy.host, port=tcp_proxy.port, application_name=name
    )
    got: list[tuple[str, Item]] = []
    async with ConnectionPool(conninfo, min_size=0, max_size=1, timeout=WITHIN) as pool:
        async with pool.listener("tp_hostile_a") as notifications:

            async def consumer(label: str) -> None:
                async for item in notifications:
                    got.append((label, item))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consumer, "one")
                nursery.start_soon(consumer, "two")
                await trio.testing.wait_all_tasks_blocked()
                tcp_proxy.reset_all()
                await notifications.listen("tp_hostile_b")  # returns once listening again
                await until(lambda: len(got) == 1, WITHIN, "the gap")
                await notify(postgres_server, "tp_hostile_a", "1")
                await notify(postgres_server, "tp_hostile_b", "2")
                await until(lambda: len(got) == 3, WITHIN, "both notifications")
                await pool.close()
        items = [item for _, item in got]
        assert items[0] == ListenerGap("reconnected")
        payloads = [(i.channel, i.payload) for i in items[1:] if isinstance(i, psycopg.Notify)]
        assert payloads == [("tp_hostile_a", "1"), ("tp_hostile_b", "2")]
    assert await settled_backends(postgres_server, name, 0) == 0

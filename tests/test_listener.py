"""``pool.listener()`` (LISTEN/NOTIFY) against the real server: order, channels,
payloads, run-time changes, reconnection gaps, overflow, cancellation, close.

Notifications are sent from the harness's admin connection (its own
``application_name``), and the pools have ``min_size=0``, so the only backend
with the test's ``application_name`` is the listener's: the server's count of
it says whether the listener's connection is there or gone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import psycopg
import pytest
import trio
import trio.testing
from _fault_helpers import until
from _pool_checks import Server, app_name, assert_settled, backends, settled_backends

import triopool
from triopool import ConnectionPool, ListenerGap, PoolTimeout
from triopool.listener import Notifications
from triopool.testing import PostgresServer

Item = psycopg.Notify | ListenerGap

#: How long any single expected event may take (generous: the machine is shared).
WITHIN = 10.0


@pytest.fixture
def name() -> str:
    return app_name("tp_listen")


def open_listening_pool(server: Server, name: str, **options: object) -> ConnectionPool:
    """A pool with no connections of its own, so the listener's backend is `name`'s only one."""
    options = {"min_size": 0, "max_size": 2, "timeout": 5.0, **options}
    return ConnectionPool(server.conninfo(application_name=name), **options)  # type: ignore[arg-type]


async def send(server: Server, *notifications: tuple[str, str]) -> int:
    """NOTIFY each (channel, payload) in order, in one transaction; return the sender's pid."""
    calls = ", ".join("pg_notify(%s, %s)" for _ in notifications)
    params = tuple(part for pair in notifications for part in pair)
    rows = await trio.to_thread.run_sync(
        server.execute, f"SELECT pg_backend_pid(), {calls}", params
    )
    return int(str(rows[0][0]))


async def receive(notifications: Notifications, count: int) -> list[Item]:
    """The next `count` (>= 1) items (fails after `WITHIN` seconds)."""
    assert count >= 1
    with trio.fail_after(WITHIN):
        items = [await anext(notifications)]
        while len(items) < count:
            items.append(await anext(notifications))
    return items


def pairs(items: Sequence[Item]) -> list[tuple[str, str]]:
    """(channel, payload) of each notification; a gap fails the test."""
    result = []
    for item in items:
        assert isinstance(item, psycopg.Notify), f"expected a notification, got {item!r}"
        result.append((item.channel, item.payload))
    return result


async def listener_backend(server: Server, name: str) -> None:
    """Wait until the listener's backend exists (then exactly one)."""
    assert await settled_backends(server, name, 1) == 1


async def test_delivery_order_across_channels_and_transactions(
    postgres_server: Server, name: str
) -> None:
    """Notifications arrive in commit order, in order within a transaction, across
    channels, each with the sending backend's pid."""
    sent: list[tuple[str, str]] = []
    senders: list[int] = []
    async with open_listening_pool(postgres_server, name) as pool:
        async with pool.listener("tp_o1", "tp_o2", "tp_o3") as notifications:
            for batch in range(10):
                chunk = [(f"tp_o{1 + (batch + i) % 3}", f"b{batch}-{i}") for i in range(20)]
                pid = await send(postgres_server, *chunk)
                sent += chunk
                senders += [pid] * len(chunk)
            items = await receive(notifications, len(sent))
            assert pairs(items) == sent
            assert [n.pid for n in items if isinstance(n, psycopg.Notify)] == senders
        await assert_settled(pool, postgres_server, name)


async def test_many_channels_and_names_needing_quotes(postgres_server: Server, name: str) -> None:
    """200 channels at once, including names that must be quoted, each delivered."""
    channels = [f"tp_many_{i}" for i in range(196)]
    channels += ["Mixed Case", 'with "quotes"', "ünïcødé ✓", "semi;colon"]
    async with open_listening_pool(postgres_server, name) as pool:
        async with pool.listener(*channels) as notifications:
            assert notifications.channels == channels
            sent = [(channel, f"to {channel}") for channel in reversed(channels)]
            await send(postgres_server, *sent)
            assert pairs(await receive(notifications, len(sent))) == sent
        await assert_settled(pool, postgres_server, name)


async def test_unicode_and_largest_payloads(postgres_server: Server, name: str) -> None:
    """Unicode payloads and the largest payload the server accepts (7999 bytes,
    ASCII and multi-byte) arrive intact."""
    payloads = [
        "",
        "héllo ✓ 日本語 🎉 \u0000-free \\ ' \" \n\t",
        "x" * 7999,
        "é" * 3999 + "x",  # 2-byte characters: 7999 bytes
        "🎉" * 1999 + "xyz",  # 4-byte characters: 7999 bytes
    ]
    payloads[1] = payloads[1].replace("\u0000", "")  # NUL cannot be sent
    assert [len(p.encode()) for p in payloads[2:]] == [7999, 7999, 7999]
    async with open_listening_pool(postgres_server, name) as pool:
        async with pool.listener("tp_payload") as notifications:
            for payload in payloads:
                await send(postgres_server, ("tp_payload", payload))
            got = pairs(await receive(notifications, len(payloads)))
            assert got == [("tp_payload", payload) for payload in payloads]
        await assert_settled(pool, postgres_server, name)


async def test_listen_and_unlisten_at_run_time(postgres_server: Server, name: str) -> None:
    """``listen()`` returns once the server listens; after ``unlisten()`` nothing
    more comes from that channel."""
    async with open_listening_pool(postgres_server, name) as pool:
        async with pool.listener("tp_rt_a") as notifications:
            await notifications.listen("tp_rt_b")
            await notifications.listen("tp_rt_a")  # already listening: no change
            assert notifications.channels == ["tp_rt_a", "tp_rt_b"]
            await send(postgres_server, ("tp_rt_a", "1"), ("tp_rt_b", "2"))
            assert pairs(await receive(notifications, 2)) == [("tp_rt_a", "1"), ("tp_rt_b", "2")]

            await notifications.unlisten("tp_rt_a")
            await notifications.unlisten("tp_rt_never")  # not listening: no change
            assert notifications.channels == ["tp_rt_b"]
            # Commit order is delivery order: had "3" been delivered, it would come first.
            await send(postgres_server, ("tp_rt_a", "3"))
            await send(postgres_server, ("tp_rt_b", "4"))
            assert pairs(await receive(notifications, 1)) == [("tp_rt_b", "4")]

            # Changes while the consumer is waiting for the next item.
            async with trio.open_nursery() as nursery:
                got: list[Item] = []

                async def consume() -> None:
                    got.extend(await receive(notifications, 1))

                nursery.start_soon(consume)
                await trio.testing.wait_all_tasks_blocked()
                await notifications.listen("tp_rt_c")
                await send(postgres_server, ("tp_rt_c", "5"))
            assert pairs(got) == [("tp_rt_c", "5")]
        await assert_settled(pool, postgres_server, name)


async def test_channel_changes_lose_nothing_in_flight(postgres_server: Server, name: str) -> None:
    """Notifications keep flowing, none lost or reordered, while channels are
    added and removed again and again (each change interrupts the wait for
    notifications)."""
    sent: list[tuple[str, str]] = []
    async with open_listening_pool(postgres_server, name) as pool:
        async with pool.listener("tp_flow") as notifications:

            async def sender() -> None:
                for batch in range(30):
                    chunk = [("tp_flow", f"{batch}-{i}") for i in range(10)]
                    await send(postgres_server, *chunk)
                    sent.extend(chunk)

            async def toggler() -> None:
                for _ in range(20):
                    await notifications.listen("tp_flow_other")
                    await notifications.unlisten("tp_flow_other")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                nursery.start_soon(toggler)
            assert pairs(await receive(notifications, len(sent))) == sent
        await assert_settled(pool, postgres_server, name)


async def test_concurrent_channel_changes_all_return(postgres_server: Server, name: str) -> None:
    """Many tasks calling ``listen()`` and ``unlisten()`` at once all return (each
    once its change is applied: a change queued behind another used to wait
    forever), and the server then listens on exactly the channels left."""
    channels = [f"tp_conc_{i}" for i in range(10)]
    async with open_listening_pool(postgres_server, name) as pool:
        async with pool.listener("tp_conc_base") as notifications:
            with trio.fail_after(WITHIN):
                async with trio.open_nursery() as nursery:
                    for channel in channels:
                        nursery.start_soon(notifications.listen, channel)
                async with trio.open_nursery() as nursery:
                    for channel in channels[::2]:
                        nursery.start_soon(notifications.unlisten, channel)
            kept = channels[1::2]
            assert sorted(notifications.channels) == sorted(["tp_conc_base", *kept])
            sent = [(channel, "x") for channel in ["tp_conc_base", *channels]]
            await send(postgres_server, *sent)
            # Sent in one transaction: delivered in order, the unlistened ones skipped.
            expected = [pair for pair in sent if pair[0] in notifications.channels]
            assert pairs(await receive(notifications, len(expected))) == expected
        await assert_settled(pool, postgres_server, name)


async def expect_ended(change: Callable[[str], Awaitable[None]], channel: str) -> None:
    """`change` (``listen`` or ``unlisten``) raises `trio.ClosedResourceError`, at once."""
    with trio.fail_after(WITHIN), pytest.raises(trio.ClosedResourceError):
        await change(channel)


async def test_channel_changes_after_the_end_raise(postgres_server: Server, name: str) -> None:
    """Once the listener's block is left, or the pool closed, ``listen()`` and
    ``unlisten()`` raise `trio.ClosedResourceError` (they used to hang forever)."""
    async with open_listening_pool(postgres_server, name) as pool:
        async with pool.listener("tp_end") as left:
            pass
        await expect_ended(left.listen, "tp_end_2")
        await expect_ended(left.unlisten, "tp_end")
        async with pool.listener("tp_end") as notifications:
            await pool.close()
            assert [item async for item in notifications] == []
            await expect_ended(notifications.listen, "tp_end_2")
            await expect_ended(notifications.unlisten, "tp_end")
        await assert_settled(pool, postgres_server, name)


async def expect_reconnection(
    notifications: Notifications, server: Server, listening: Sequence[str], silent: Sequence[str]
) -> None:
    """The next item is a reconnection gap, after which the server listens on every
    channel in `listening` and on none in `silent`."""
    assert await receive(notifications, 1) == [ListenerGap("reconnected")]
    # One transaction per channel, silent ones first: commit order is delivery order.
    for channel in [*silent, *listening]:
        await send(server, (channel, f"after gap to {channel}"))
    expected = [(channel, f"after gap to {channel}") for channel in listening]
    assert pairs(await receive(notifications, len(expected))) == expected


async def test_reconnects_after_backend_terminated(postgres_server: Server, name: str) -> None:
    """``pg_terminate_backend`` of the listener's backend: a new connection, a
    ``ListenerGap("reconnected")``, and every current channel LISTENed again
    (those added at run time included, those removed not)."""
    async with open_listening_pool(postgres_server, name) as pool:
        async with pool.listener("tp_term_a", "tp_term_b") as notifications:
            await notifications.listen("tp_term_c")
            await notifications.unlisten("tp_term_a")
            for _ in range(2):  # twice: the second loss is handled like the first
                await listener_backend(postgres_server, name)
                terminated = await trio.to_thread.run_sync(postgres_server.terminate_backends, name)
                assert terminated == 1
                await expect_reconnection(
                    notifications, postgres_server, ["tp_term_b", "tp_term_c"], ["tp_term_a"]
                )
            await listener_backend(postgres_server, name)
        await assert_settled(pool, postgres_server, name)


@pytest.mark.faults
async def test_reconnects_after_server_restart_and_close_ends_iteration_while_down(
    private_server: PostgresServer, name: str
) -> None:
    """A server restart: the listener reconnects (with the pool's backoff), yields
    a gap and listens again on every channel.  Then, with the server down, a
    ``listen()`` waits for the reconnection; closing the pool ends the iteration
    at once, that ``listen()`` raises `trio.ClosedResourceError` (it used to hang
    forever), and nothing is left behind."""
    async with open_listening_pool(private_server, name) as pool:
        async with pool.listener("tp_rs_a", "tp_rs_b") as notifications:
            await send(private_server, ("tp_rs_a", "before"))
            assert pairs(await receive(notifications, 1)) == [("tp_rs_a", "before")]
            await trio.to_thread.run_sync(private_server.restart)
            await expect_reconnection(notifications, private_server, ["tp_rs_a", "tp_rs_b"], [])

            await trio.to_thread.run_sync(private_server.stop)
            # The listener notices, then keeps retrying with backoff.
            await until(lambda: notifications._last_error is not None, WITHIN, "connect failed")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(expect_ended, notifications.listen, "tp_rs_c")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(pool.close)
                with trio.fail_after(WITHIN):
                    rest = [item async for item in notifications]
        assert rest == []
        await trio.to_thread.run_sync(private_server.start)
        await assert_settled(pool, private_server, name)


async def test_overflow_drops_oldest_and_says_how_many(postgres_server: Server, name: str) -> None:
    """A consumer behind by more than ``buffer_size``: the oldest are dropped, and a
    ``ListenerGap("overflow", dropped)`` comes before the newest ones kept."""
    async with open_listening_pool(postgres_server, name) as pool:
        async with pool.listener("tp_over", buffer_size=3) as notifications:
            await send(postgres_server, *[("tp_over", f"p{i}") for i in range(10)])
            # Nothing to wait on but the relay having read them all (no consumer runs).
            await until(lambda: notifications._dropped == 7, WITHIN, "7 dropped")
            items = await receive(notifications, 4)
            assert items[0] == ListenerGap("overflow", 7)
            assert pairs(items[1:]) == [("tp_over", f"p{i}") for i in (7, 8, 9)]
            # Caught up: no gap any more.
            await send(postgres_server, ("tp_over", "next"))
            assert pairs(await receive(notifications, 1)) == [("tp_over", "next")]
        await assert_settled(pool, postgres_server, name)


async def test_cancelled_consumer_leaves_nothing(postgres_server: Server, name: str) -> None:
    """Cancelling the task that iterates closes the listener's connection (its
    backend goes away); the pool goes on serving."""
    async with open_listening_pool(postgres_server, name) as pool:
        received: list[Item] = []
        with trio.CancelScope() as scope:
            async with pool.listener("tp_cancel") as notifications:
                await send(postgres_server, ("tp_cancel", "one"))
                async for item in notifications:
                    received.append(item)
                    scope.cancel()  # the next checkpoint (waiting for more) raises
        assert scope.cancelled_caught
        assert pairs(received) == [("tp_cancel", "one")]
        assert await settled_backends(postgres_server, name, 0) == 0
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        await assert_settled(pool, postgres_server, name)


async def test_cancelled_while_waiting_in_another_task(postgres_server: Server, name: str) -> None:
    """A consumer task blocked waiting for a notification is cancelled from
    outside: the block ends and the backend goes away."""
    async with open_listening_pool(postgres_server, name) as pool:
        entered = trio.Event()

        async def consume() -> None:
            async with pool.listener("tp_cancel_wait") as notifications:
                entered.set()
                async for _ in notifications:
                    raise AssertionError("nothing was sent")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await entered.wait()
            await listener_backend(postgres_server, name)
            await trio.testing.wait_all_tasks_blocked()  # in __anext__, and the relay reading
            nursery.cancel_scope.cancel()
        assert await settled_backends(postgres_server, name, 0) == 0
        await assert_settled(pool, postgres_server, name)


async def test_pool_close_ends_iteration(postgres_server: Server, name: str) -> None:
    """Closing the pool ends a consumer's iteration (after what was already
    received) and closes the listener's connection."""
    async with open_listening_pool(postgres_server, name) as pool:
        got: list[Item] = []
        async with pool.listener("tp_close") as notifications:
            async with trio.open_nursery() as nursery:

                async def consume() -> None:
                    async for item in notifications:
                        got.append(item)

                nursery.start_soon(consume)
                await send(postgres_server, ("tp_close", "last"))
                await until(lambda: len(got) == 1, WITHIN, "the notification consumed")
                await trio.testing.wait_all_tasks_blocked()  # waiting for the next one
                with trio.fail_after(WITHIN):
                    await pool.close()
        assert pairs(got) == [("tp_close", "last")]
        assert await settled_backends(postgres_server, name, 0) == 0
        await assert_settled(pool, postgres_server, name)


async def test_listener_connection_is_outside_max_size(postgres_server: Server, name: str) -> None:
    """With every pool connection lent out (``max_size=1``), the listener still
    starts on a connection of its own, which ``status()`` does not count."""
    async with open_listening_pool(postgres_server, name, min_size=1, max_size=1) as pool:
        async with pool.connection() as held:
            async with pool.listener("tp_outside") as notifications:
                assert pool.status() == triopool.PoolStatus(
                    max_size=1, size=1, available=0, waiting=0
                )
                assert await settled_backends(postgres_server, name, 2) == 2
                await held.execute("NOTIFY tp_outside, 'from the pool'")
                await held.commit()
                assert pairs(await receive(notifications, 1)) == [("tp_outside", "from the pool")]
        await assert_settled(pool, postgres_server, name)


async def test_unreachable_server_times_out_entering(name: str) -> None:
    """Entering a listener that cannot connect fails with `PoolTimeout` after the
    pool's ``timeout``, with the connection error as the cause."""
    # A port nobody listens on: bind one, keep it unlistened.
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        pool = ConnectionPool(
            f"host=127.0.0.1 port={port} user=postgres connect_timeout=1",
            min_size=0,
            max_size=1,
            timeout=0.3,
        )
        async with pool:
            t0 = trio.current_time()
            with pytest.raises(PoolTimeout, match="listener not listening") as info:
                async with pool.listener("tp_unreachable"):
                    raise AssertionError("not reached")
            assert 0.29 <= trio.current_time() - t0 < 3
            assert isinstance(info.value.__cause__, psycopg.OperationalError)
        await assert_settled(pool)


async def test_bad_arguments(postgres_server: Server, name: str) -> None:
    """No channel, an empty or non-string channel name, a bad buffer size: refused
    on entering, before any connection is made."""
    async with open_listening_pool(postgres_server, name) as pool:
        with pytest.raises(ValueError, match="at least one channel"):
            async with pool.listener():
                pass
        with pytest.raises(TypeError, match="non-empty strings"):
            async with pool.listener("ok", ""):
                pass
        with pytest.raises(TypeError, match="non-empty strings"):
            async with pool.listener(42):  # type: ignore[arg-type]
                pass
        with pytest.raises(ValueError, match="buffer_size"):
            async with pool.listener("ok", buffer_size=0):
                pass
        assert await backends(postgres_server, name) == 0
        await assert_settled(pool, postgres_server, name)

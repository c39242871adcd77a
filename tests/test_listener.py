"""``pool.listener()`` (LISTEN/NOTIFY) against the real server: order, channels,
payloads, run-time changes, reconnection gaps, overflow, cancellation, close.

Notifications are sent from the harness's admin connection (its own
``application_name``), and the pools have ``min_size=0``, so the only backend
with the test's ``application_name`` is the listener's: the server's count of
it says whether the listener's connection is there or gone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from _fault_helpers import recording_connection_class, until
from _pool_checks import Server, app_name, assert_settled, backends, settled_backends
from psycopg import sql

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


# -- concurrency: consumers, channel changes, reconnections, closing (issue 15) ------------


class Steer:
    """Pauses the listener's connection at chosen points (a real server throughout).

    ``pause(point)`` arms a gate: the next connection attempt (point ``"connect"``)
    or the next statement whose text is `point` (e.g. ``'LISTEN "ch"'``, paused
    right after the server ran it) stops there; the gate's ``reached`` event is
    set, and it goes on once ``release`` is set.
    """

    def __init__(self) -> None:
        self.gates: dict[str, tuple[trio.Event, trio.Event]] = {}
        self.connects = 0
        steer = self

        class SteeredConnection(triopool.Connection[Any]):
            @classmethod
            async def connect(cls, conninfo: str = "", **kwargs: Any) -> SteeredConnection:
                steer.connects += 1
                await steer._gate("connect")
                conn = await super().connect(conninfo, **kwargs)
                assert isinstance(conn, SteeredConnection)
                return conn

            async def execute(
                self,
                query: Any,
                params: Any = None,
                *,
                prepare: bool | None = None,
                binary: bool = False,
            ) -> psycopg.AsyncCursor[Any]:
                cur = await super().execute(query, params, prepare=prepare, binary=binary)
                if isinstance(query, sql.Composable):
                    await steer._gate(query.as_string(self))
                return cur

        self.connection_class = SteeredConnection

    def pause(self, point: str) -> tuple[trio.Event, trio.Event]:
        """Arm a gate at `point`; returns its (reached, release) events."""
        gate = self.gates[point] = (trio.Event(), trio.Event())
        return gate

    async def _gate(self, point: str) -> None:
        gate = self.gates.pop(point, None)
        if gate is None:
            await trio.lowlevel.checkpoint()
            return
        reached, release = gate
        reached.set()
        await release.wait()


def listener_tasks() -> list[str]:
    """Names of the running tasks that belong to a listener."""
    names: list[str] = []

    def walk(task: trio.lowlevel.Task) -> None:
        if task.name.startswith("triopool.listener."):
            names.append(task.name)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    walk(root)
    return names


async def test_concurrent_consumers_share_the_items(postgres_server: Server, name: str) -> None:
    """Several tasks iterating one `Notifications`: each item goes to exactly one of
    them, none crashes (two consumers woken for one item used to both try to take
    it: ``IndexError: pop from an empty deque``), and all of them end with the
    block."""
    got: dict[int, list[Item]] = {0: [], 1: [], 2: []}
    async with open_listening_pool(postgres_server, name) as pool:
        async with pool.listener("tp_multi") as notifications:
            async with trio.open_nursery() as nursery:

                async def consume(consumer: int) -> None:
                    async for item in notifications:
                        got[consumer].append(item)

                for consumer in got:
                    nursery.start_soon(consume, consumer)
                sent: list[tuple[str, str]] = []

                def all_received() -> bool:
                    return sum(map(len, got.values())) == len(sent)

                for batch in range(5):
                    await trio.testing.wait_all_tasks_blocked()  # every consumer waiting
                    chunk = [("tp_multi", f"{batch}-{i}") for i in range(1 + batch)]
                    await send(postgres_server, *chunk)
                    sent += chunk
                    await until(all_received, WITHIN, "all received")
                with trio.fail_after(WITHIN):
                    await pool.close()  # ends every consumer's iteration
        received = [pair for items in got.values() for pair in pairs(items)]
        assert sorted(received) == sorted(sent)
        assert listener_tasks() == []
        await assert_settled(pool, postgres_server, name)


async def test_concurrent_consumers_and_a_reconnection_gap(
    postgres_server: Server, name: str
) -> None:
    """Two consumers and a reconnection: the gap goes to one of them, and after it
    every notification to one of them."""
    got: list[Item] = []
    async with open_listening_pool(postgres_server, name) as pool:
        async with pool.listener("tp_multi_gap") as notifications:
            async with trio.open_nursery() as nursery:

                async def consume() -> None:
                    async for item in notifications:
                        got.append(item)

                nursery.start_soon(consume)
                nursery.start_soon(consume)
                await listener_backend(postgres_server, name)
                await trio.to_thread.run_sync(postgres_server.terminate_backends, name)
                await until(lambda: len(got) == 1, WITHIN, "the gap")
                assert got == [ListenerGap("reconnected")]
                await trio.testing.wait_all_tasks_blocked()
                sent = [("tp_multi_gap", str(i)) for i in range(6)]
                await send(postgres_server, *sent)
                await until(lambda: len(got) == 7, WITHIN, "the notifications")
                nursery.cancel_scope.cancel()
        assert sorted(pairs(got[1:])) == sent  # order across consumers: theirs to keep
        await assert_settled(pool, postgres_server, name)


async def test_consumer_cancelled_as_an_item_arrives_loses_nothing(
    postgres_server: Server, name: str
) -> None:
    """A consumer cancelled in ``__anext__`` in the same instant as an item arrives
    (woken, not yet run): the item is either returned to it or left for the next
    ``__anext__``, never lost."""

    async def consume(
        notifications: Notifications, scope: trio.CancelScope, got: list[Item]
    ) -> None:
        with scope:
            got.append(await anext(notifications))

    async with open_listening_pool(postgres_server, name) as pool:
        async with pool.listener("tp_cancel_item") as notifications:
            for arrival in range(3):
                got: list[Item] = []
                scope = trio.CancelScope()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(consume, notifications, scope, got)
                    await trio.testing.wait_all_tasks_blocked()  # it waits
                    item = psycopg.Notify("tp_cancel_item", str(arrival), 0)
                    notifications._put(item)  # the relay's hand-over, then at once:
                    scope.cancel()
                if not got:
                    got = await receive(notifications, 1)
                assert got == [item]
        await assert_settled(pool, postgres_server, name)


async def test_unlisten_while_listening_again_after_a_reconnection(
    postgres_server: Server, name: str
) -> None:
    """``unlisten()`` called while the listener LISTENs again on every channel after
    a reconnection: the channels left are all listened to (the list used to change
    under the loop walking it, which then skipped one)."""
    steer = Steer()
    pool = open_listening_pool(postgres_server, name, connection_class=steer.connection_class)
    async with pool, pool.listener("tp_rl_a", "tp_rl_b", "tp_rl_c") as notifications:
        await listener_backend(postgres_server, name)
        reached, release = steer.pause('LISTEN "tp_rl_a"')
        await trio.to_thread.run_sync(postgres_server.terminate_backends, name)
        with trio.fail_after(WITHIN):
            await reached.wait()  # the new connection listens on tp_rl_a again
            async with trio.open_nursery() as nursery:
                nursery.start_soon(notifications.unlisten, "tp_rl_a")
                await trio.testing.wait_all_tasks_blocked()  # it waits for the listener
                release.set()
        assert notifications.channels == ["tp_rl_b", "tp_rl_c"]
        assert await receive(notifications, 1) == [ListenerGap("reconnected")]
        for channel in ["tp_rl_a", "tp_rl_b", "tp_rl_c"]:
            await send(postgres_server, (channel, channel))
        # Commit order is delivery order: tp_rl_b's comes first unless it was skipped.
        assert pairs(await receive(notifications, 1)) == [("tp_rl_b", "tp_rl_b")]
        assert pairs(await receive(notifications, 1)) == [("tp_rl_c", "tp_rl_c")]
    await assert_settled(pool, postgres_server, name)


async def test_channel_changes_while_reconnecting(postgres_server: Server, name: str) -> None:
    """``listen()`` and ``unlisten()`` while the listener is connecting again: both
    return once the new connection listens, and it listens on exactly the
    channels left."""
    steer = Steer()
    pool = open_listening_pool(postgres_server, name, connection_class=steer.connection_class)
    async with pool, pool.listener("tp_rc_a", "tp_rc_b") as notifications:
        await listener_backend(postgres_server, name)
        reached, release = steer.pause("connect")
        await trio.to_thread.run_sync(postgres_server.terminate_backends, name)
        with trio.fail_after(WITHIN):
            await reached.wait()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(notifications.listen, "tp_rc_c")
                nursery.start_soon(notifications.unlisten, "tp_rc_a")
                await trio.testing.wait_all_tasks_blocked()  # both wait for the listener
                release.set()
        await expect_reconnection(
            notifications, postgres_server, ["tp_rc_b", "tp_rc_c"], ["tp_rc_a"]
        )
    await assert_settled(pool, postgres_server, name)


async def test_listen_racing_the_pool_closing(postgres_server: Server, name: str) -> None:
    """The pool closes while a ``listen()`` is being applied: that ``listen()``
    raises `trio.ClosedResourceError`, iteration ends, no listener task is left;
    and entering a listener on a closed pool raises `PoolClosed`."""
    steer = Steer()
    pool = open_listening_pool(postgres_server, name, connection_class=steer.connection_class)
    async with pool:
        async with pool.listener("tp_close_race") as notifications:
            reached, _ = steer.pause('LISTEN "tp_close_race_2"')
            async with trio.open_nursery() as nursery:
                nursery.start_soon(expect_ended, notifications.listen, "tp_close_race_2")
                with trio.fail_after(WITHIN):
                    await reached.wait()  # the server listens; listen() not returned yet
                    await pool.close()
            with trio.fail_after(WITHIN):
                assert [item async for item in notifications] == []
        assert listener_tasks() == []
        with pytest.raises(triopool.PoolClosed):
            async with pool.listener("tp_close_race"):
                raise AssertionError("not reached")
    await assert_settled(pool, postgres_server, name)


@pytest.mark.parametrize("bad", ["", 42, None, b"tp_bytes", "nul\x00inside"])
async def test_bad_channel_names_at_run_time(
    postgres_server: Server, name: str, bad: object
) -> None:
    """``listen()`` and ``unlisten()`` refuse what ``listener()`` refuses, at once,
    with the same error: the listener goes on (``listen("")`` used to end the
    whole block with the server's SyntaxError)."""
    async with open_listening_pool(postgres_server, name) as pool:
        with pytest.raises(TypeError, match="non-empty strings"):
            async with pool.listener(bad):  # type: ignore[arg-type]
                raise AssertionError("not reached")
        async with pool.listener("tp_bad_rt") as notifications:
            for change in (notifications.listen, notifications.unlisten):
                with pytest.raises(TypeError, match="non-empty strings"):
                    await change(bad)  # type: ignore[arg-type]
            assert notifications.channels == ["tp_bad_rt"]
            await send(postgres_server, ("tp_bad_rt", "still here"))
            assert pairs(await receive(notifications, 1)) == [("tp_bad_rt", "still here")]
        await assert_settled(pool, postgres_server, name)


@pytest.mark.parametrize("reconnect_timeout", [0.0, 0.001])
async def test_reconnect_backs_off_after_giving_up(
    mock_clock: trio.testing.MockClock, reconnect_timeout: float
) -> None:
    """With the server refusing connections and a (near) zero ``reconnect_timeout``,
    the listener still waits the first backoff delay (1 s ±10 %) after each
    round of attempts it gives up on: no busy loop (it used to make ~2000
    attempts a second)."""
    mock_clock.rate = 20.0  # 10 s of trio time in 0.5 s
    connection_class, attempts = recording_connection_class()
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))  # bound, never listening: refused at once
        port = sock.getsockname()[1]
        pool = ConnectionPool(
            f"host=127.0.0.1 port={port} user=postgres",
            min_size=0,
            max_size=1,
            timeout=10.0,
            reconnect_timeout=reconnect_timeout,
            connection_class=connection_class,
        )
        async with pool:
            with pytest.raises(PoolTimeout):
                async with pool.listener("tp_backoff"):
                    raise AssertionError("not reached")
        assert listener_tasks() == []
    starts = [attempt.started for attempt in attempts]
    assert all(attempt.error is not None for attempt in attempts)
    assert len(starts) >= 3, starts
    # A round is one attempt (two with a tiny reconnect_timeout: a retry after the
    # capped delay), then at least 0.9 s.  (The real time an attempt takes only
    # spreads them further apart.)
    per_round = 1 if reconnect_timeout == 0 else 2
    spans = [b - a for a, b in zip(starts, starts[per_round:], strict=False)]
    assert min(spans) >= 0.9, f"{len(starts)} attempts in 10 s: {starts}"

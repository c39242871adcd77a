"""LISTEN/NOTIFY on a dedicated connection: ``pool.listener()``.

    async with pool.listener("jobs", "events") as notifications:
        async for n in notifications:      # psycopg.Notify, or a ListenerGap
            ...

The listener owns one connection of its own (outside the pool's ``max_size``),
made with the pool's conninfo, kwargs and connection class.  A task in the
``async with`` block's nursery receives notifications into a bounded buffer;
the block's body consumes them.  When the connection is lost it reconnects
with the pool's backoff and LISTENs again on every channel; notifications sent
meanwhile are lost, so a `ListenerGap` is yielded to tell the consumer to
re-sync.  If the consumer falls behind by more than ``buffer_size``
notifications, the oldest are dropped and a `ListenerGap` says how many.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import psycopg
import trio
from psycopg import sql

from ._groups import raise_from_group
from ._policy import Backoff
from .errors import PoolTimeout

if TYPE_CHECKING:
    from .pool import ConnectionPool

__all__ = ["ListenerGap", "Notifications"]

logger = logging.getLogger("triopool")


@dataclass(frozen=True, slots=True)
class ListenerGap:
    """Notifications may have been lost just before this marker.

    Attributes:
        reason: ``"reconnected"`` (the connection was lost and re-established:
            anything sent meanwhile is lost) or ``"overflow"`` (the consumer
            fell behind; the oldest buffered notifications were dropped).
        dropped: how many notifications were dropped (overflow only; unknown,
            so 0, after a reconnection).
    """

    reason: Literal["reconnected", "overflow"]
    dropped: int = 0


class Notifications:
    """The async iterator of a `ConnectionPool.listener` block.

    Yields `psycopg.Notify` objects in the order the server sent them, and
    `ListenerGap` markers.  Iteration ends when the pool is closed.
    """

    def __init__(self, channels: tuple[str, ...], buffer_size: int) -> None:
        self._channels: list[str] = list(dict.fromkeys(channels))
        self._buffer: deque[psycopg.Notify | ListenerGap] = deque()
        self._buffer_size = buffer_size
        self._dropped = 0
        self._arrived = trio.Event()
        self._ended = False
        self._changes: deque[tuple[str, str]] = deque()
        self._interrupt_scope: trio.CancelScope | None = None
        self._listening = trio.Event()
        self._last_error: Exception | None = None

    @property
    def channels(self) -> list[str]:
        """The channels listened to (or about to be)."""
        return list(self._channels)

    async def listen(self, channel: str) -> None:
        """Start listening to `channel` too.

        Returns once the server is listening, so that a NOTIFY sent
        afterwards is received.  Checkpoints.

        Raises:
            trio.ClosedResourceError: the listener has ended (its block was
                left, or the pool closed).
        """
        await self._change("LISTEN", channel)

    async def unlisten(self, channel: str) -> None:
        """Stop listening to `channel`.  Checkpoints.

        Raises:
            trio.ClosedResourceError: the listener has ended.
        """
        await self._change("UNLISTEN", channel)

    async def _change(self, command: str, channel: str) -> None:
        if self._ended:
            await trio.lowlevel.checkpoint()
            raise trio.ClosedResourceError("the listener has ended")
        if command == "LISTEN" and channel not in self._channels:
            self._channels.append(channel)
        elif command == "UNLISTEN" and channel in self._channels:
            self._channels.remove(channel)
        self._changes.append((command, channel))
        # Callers whose changes are still pending share one event: the relay
        # applies every queued change before setting it.
        if self._listening.is_set():
            self._listening = trio.Event()
        listening = self._listening
        if self._interrupt_scope is not None:
            self._interrupt_scope.cancel()
        await listening.wait()
        if self._ended:
            raise trio.ClosedResourceError("the listener has ended")

    def __aiter__(self) -> Notifications:
        return self

    async def __anext__(self) -> psycopg.Notify | ListenerGap:
        while not self._buffer:
            if self._ended:
                raise StopAsyncIteration
            await self._arrived.wait()
            self._arrived = trio.Event()
        await trio.lowlevel.checkpoint()
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            return ListenerGap("overflow", dropped)
        return self._buffer.popleft()

    def _put(self, item: psycopg.Notify | ListenerGap) -> None:
        if len(self._buffer) >= self._buffer_size:
            self._buffer.popleft()
            self._dropped += 1
        self._buffer.append(item)
        self._arrived.set()

    def _end(self) -> None:
        self._ended = True
        self._arrived.set()
        self._listening.set()

    async def _serve(self, pool: ConnectionPool) -> None:
        """Keep a connection listening, forever; reconnect when it is lost."""
        backoff = Backoff(pool.reconnect_timeout, pool._policy.random)
        connected_before = False
        while True:
            try:
                conn = await pool._connect_listener()
            except Exception as ex:
                self._last_error = ex
                delay = backoff.failed(trio.current_time())
                logger.warning("%s: listener could not connect: %s", pool.name, ex)
                await trio.sleep(delay if delay is not None else 0)
                if delay is None:
                    backoff = Backoff(pool.reconnect_timeout, pool._policy.random)
                continue
            backoff = Backoff(pool.reconnect_timeout, pool._policy.random)
            try:
                async with conn:
                    self._changes.clear()
                    for channel in self._channels:
                        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    if connected_before:
                        self._put(ListenerGap("reconnected"))
                    connected_before = True
                    await self._relay(conn)
            except psycopg.OperationalError as ex:
                logger.warning("%s: listener connection lost: %s", pool.name, ex)

    async def _relay(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Move notifications to the buffer; apply channel changes between reads."""
        while True:
            while self._changes:
                command, channel = self._changes.popleft()
                await conn.execute(sql.SQL(command + " {}").format(sql.Identifier(channel)))
            self._listening.set()
            with trio.CancelScope() as scope:
                self._interrupt_scope = scope
                async for notify in conn.notifies():
                    self._put(notify)
            self._interrupt_scope = None


@asynccontextmanager
async def open_listener(
    pool: ConnectionPool, channels: tuple[str, ...], buffer_size: int
) -> AsyncIterator[Notifications]:
    """See `ConnectionPool.listener`."""
    if not channels:
        raise ValueError("listener() needs at least one channel")
    for channel in channels:
        if not isinstance(channel, str) or not channel:
            raise TypeError(f"channel names must be non-empty strings, got {channel!r}")
    if not isinstance(buffer_size, int) or buffer_size < 1:
        raise ValueError(f"buffer_size must be an int >= 1, got {buffer_size!r}")
    notifications = Notifications(channels, buffer_size)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_until_closed, pool, notifications)
            with trio.move_on_after(pool.timeout) as scope:
                await notifications._listening.wait()
            if scope.cancelled_caught:
                raise PoolTimeout(
                    f"listener not listening after {pool.timeout:.2f} sec"
                ) from notifications._last_error
            try:
                yield notifications
            finally:
                notifications._end()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise_from_group(group)


async def _serve_until_closed(  # noqa: ASYNC910  # the nursery waits; raise_from_group raises
    pool: ConnectionPool, notifications: Notifications
) -> None:
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on, pool._closing, nursery.cancel_scope)
            await notifications._serve(pool)
    except BaseExceptionGroup as group:
        raise_from_group(group)
    notifications._end()


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()

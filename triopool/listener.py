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

Several tasks may iterate one `Notifications` at once: each item (a
notification or a gap) goes to exactly one of them.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
import trio
from psycopg import sql

from ._groups import raise_from_group
from ._policy import BACKOFF_JITTER, INITIAL_BACKOFF, Backoff
from .errors import PoolClosed, PoolTimeout

__all__ = ["ListenerGap", "Notifications"]

logger = logging.getLogger("triopool")


@dataclass(frozen=True, slots=True)
class Source:
    """What a listener needs of its pool (which makes one: this module knows no pool).

    `connect` makes a connection for the listener (autocommit, outside the
    pool's slots); `closing` is set when the pool starts closing.
    """

    name: str
    timeout: float  # noqa: ASYNC109  # seconds: how long entering may wait
    reconnect_timeout: float
    random: Callable[[], float]
    connect: Callable[[], Awaitable[psycopg.AsyncConnection[Any]]]
    closing: trio.Event
    closed: bool


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


def check_channel(channel: object) -> str:
    """`channel` if it can name a channel, else `TypeError`.

    A non-empty string without NUL characters: the server refuses an empty
    name (``SyntaxError``), and libpq would cut a name at its first NUL.
    """
    if not isinstance(channel, str) or not channel or "\x00" in channel:
        raise TypeError(
            f"channel names must be non-empty strings without NUL characters, got {channel!r}"
        )
    return channel


class Notifications:
    """The async iterator of a `ConnectionPool.listener` block.

    Yields `psycopg.Notify` objects in the order the server sent them, and
    `ListenerGap` markers.  Iteration ends when the pool is closed or the
    block is left.  Several tasks may iterate it at once: each item goes to
    exactly one of them.
    """

    def __init__(self, channels: tuple[str, ...], buffer_size: int) -> None:
        self._channels: list[str] = list(dict.fromkeys(channels))
        self._buffer: deque[psycopg.Notify | ListenerGap] = deque()
        self._buffer_size = buffer_size
        self._dropped = 0
        self._consumers = trio.lowlevel.ParkingLot()  # tasks waiting in __anext__
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
        afterwards is received (while the listener reconnects: once the new
        connection listens).

        Checkpoints: always.  If cancelled: the change is made all the same
        (`channels` shows it at once; the server follows).

        Raises:
            TypeError: `channel` is not a non-empty string (as for
                `ConnectionPool.listener`); nothing changes.
            trio.ClosedResourceError: the listener has ended (its block was
                left, or the pool closed).
        """
        await self._change("LISTEN", check_channel(channel))

    async def unlisten(self, channel: str) -> None:
        """Stop listening to `channel`.

        Checkpoints and cancellation: as `listen`.

        Raises:
            TypeError: `channel` is not a non-empty string; nothing changes.
            trio.ClosedResourceError: the listener has ended.
        """
        await self._change("UNLISTEN", check_channel(channel))

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
        """The next item, waiting for one if need be.

        Checkpoints: always.  If cancelled: no item is taken (an item is taken
        and returned with no checkpoint in between, so none is lost).

        Raises:
            StopAsyncIteration: the listener has ended and every item it
                received was taken.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            # Take an item and return it with nothing able to interrupt in
            # between: another consumer cannot take it first, and a
            # cancellation cannot lose it.
            if self._dropped:
                dropped, self._dropped = self._dropped, 0
                item: psycopg.Notify | ListenerGap = ListenerGap("overflow", dropped)
            elif self._buffer:
                item = self._buffer.popleft()
            elif self._ended:
                await trio.lowlevel.cancel_shielded_checkpoint()
                raise StopAsyncIteration
            else:
                await self._consumers.park()
                continue
            await trio.lowlevel.cancel_shielded_checkpoint()
            return item

    def _put(self, item: psycopg.Notify | ListenerGap) -> None:
        if len(self._buffer) >= self._buffer_size:
            self._buffer.popleft()
            self._dropped += 1
        self._buffer.append(item)
        self._consumers.unpark()  # one item: one consumer (a woken one cannot be cancelled)

    def _end(self) -> None:
        self._ended = True
        self._consumers.unpark_all()
        self._listening.set()

    async def _serve(self, pool: Source) -> None:
        """Keep a connection listening, forever; reconnect when it is lost."""
        random = pool.random
        backoff = Backoff(pool.reconnect_timeout, random)
        connected_before = False
        while True:
            try:
                conn = await pool.connect()
            except Exception as ex:
                self._last_error = ex
                delay = backoff.failed(trio.current_time())
                logger.warning("%s: listener could not connect: %s", pool.name, ex)
                if delay is None:
                    # Given up on this round of attempts: the listener never
                    # stops trying, but waits the first delay before the next
                    # round (a zero reconnect_timeout must not busy-loop).
                    logger.warning(
                        "%s: listener reconnection attempts failed for %s sec",
                        pool.name,
                        pool.reconnect_timeout,
                    )
                    delay = INITIAL_BACKOFF * (1 + BACKOFF_JITTER * (2 * random() - 1))
                    backoff = Backoff(pool.reconnect_timeout, random)
                await trio.sleep(delay)
                continue
            backoff = Backoff(pool.reconnect_timeout, random)
            try:
                async with conn:
                    # Changes asked for from now on are queued for `_relay`,
                    # while this walks a copy of the channels: a channel added
                    # or removed meanwhile is LISTENed (or UNLISTENed) after.
                    self._changes.clear()
                    for channel in list(self._channels):
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
    pool: Source, channels: tuple[str, ...], buffer_size: int
) -> AsyncIterator[Notifications]:
    """See `ConnectionPool.listener`."""
    if not channels:
        raise ValueError("listener() needs at least one channel")
    for channel in channels:
        check_channel(channel)
    if not isinstance(buffer_size, int) or isinstance(buffer_size, bool):
        raise TypeError(f"buffer_size must be an int, got {type(buffer_size).__name__}")
    if buffer_size < 1:
        raise ValueError(f"buffer_size must be an int >= 1, got {buffer_size!r}")
    if pool.closed:
        raise PoolClosed(f"the pool {pool.name!r} is closed")
    notifications = Notifications(channels, buffer_size)
    body: BaseException | None = None  # what the block raised
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
            except BaseException as exc:
                body = exc
                raise
            finally:
                notifications._end()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise_from_group(group, body=body)


async def _serve_until_closed(  # noqa: ASYNC910  # the nursery waits; raise_from_group raises
    pool: Source, notifications: Notifications
) -> None:
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on, pool.closing, nursery.cancel_scope)
            await notifications._serve(pool)
    except BaseExceptionGroup as group:
        raise_from_group(group)
    notifications._end()


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()

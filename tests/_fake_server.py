"""A server-free stand-in for PostgreSQL, for pool tests under `trio.testing.MockClock`.

Why a fake here: a real server runs on real time, so it cannot take part in
tests that jump a `MockClock` hours ahead and assert the exact instant of an
idle shrink, a lifetime replacement or a backoff retry.  These tests exercise
the pool's trio shell (actors, scheduler, waits, cancellation), never
psycopg's protocol code: that is what the real-server tests are for.

`FakeServer` decides how connection attempts go (delay, failure) and records
them; `FakeConnection` is a `triopool.Connection` whose libpq object is a
`FakePGconn`, so the pool sees the states it would see on a real connection
(idle, in a transaction, broken, closed).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

import psycopg
import trio
from psycopg import pq

import triopool

OK = pq.ConnStatus.OK
BAD = pq.ConnStatus.BAD


class FakePGconn:
    """What the pool reads of a libpq connection: status, transaction status, socket.

    The socket is one end of a socket pair that never receives anything: a
    server that stays silent (the pool looks at it before lending an idle
    connection).  It is closed by `finish`, as libpq's is.
    """

    def __init__(self) -> None:
        self.status = OK
        self._transaction_status = pq.TransactionStatus.IDLE
        self._socket, self._peer = socket.socketpair()

    @property
    def transaction_status(self) -> pq.TransactionStatus:
        """As libpq's: UNKNOWN unless the connection is OK."""
        if self.status != OK:
            return pq.TransactionStatus.UNKNOWN
        return self._transaction_status

    @transaction_status.setter
    def transaction_status(self, status: pq.TransactionStatus) -> None:
        self._transaction_status = status

    @property
    def socket(self) -> int:
        if self._socket.fileno() < 0:
            raise psycopg.OperationalError("the connection is lost")
        return self._socket.fileno()

    notice_handler: object = None

    def consume_input(self) -> None:
        """Nothing ever arrives."""

    def is_busy(self) -> int:
        return 0

    def finish(self) -> None:
        self.status = BAD
        self._socket.close()
        self._peer.close()


@dataclass
class FakeServer:
    """Controls and records connection attempts made through `FakeConnection`.

    Pass it to a pool as ``kwargs={"server": fake_server}``.
    """

    connect_delay: float = 0.0
    down: bool = False
    attempts: list[float] = field(default_factory=list)
    connections: list[FakeConnection] = field(default_factory=list)

    @property
    def open_connections(self) -> list[FakeConnection]:
        return [conn for conn in self.connections if not conn.closed]

    def kill_all(self) -> None:
        """Break every open connection, as a server restart would."""
        for conn in self.open_connections:
            conn.kill()


class FakeConnection(triopool.Connection):
    """A `triopool.Connection` backed by a `FakeServer` instead of PostgreSQL."""

    pgconn: FakePGconn  # type: ignore[assignment]

    @classmethod
    async def connect(  # type: ignore[override]
        cls, conninfo: str = "", *, server: FakeServer, **kwargs: Any
    ) -> FakeConnection:
        server.attempts.append(trio.current_time())
        await trio.sleep(server.connect_delay)
        if server.down:
            raise psycopg.OperationalError("connection refused (fake server is down)")
        conn = cls(FakePGconn())  # type: ignore[arg-type]
        conn.opened_at = trio.current_time()
        server.connections.append(conn)
        return conn

    opened_at: float = 0.0
    closed_at: float | None = None

    def _close_now(self) -> None:
        if self.closed_at is None:
            self.closed_at = trio.current_time()
        super()._close_now()

    async def rollback(self) -> None:
        await self._end_transaction()

    async def commit(self) -> None:
        await self._end_transaction()

    async def _end_transaction(self) -> None:
        await trio.lowlevel.checkpoint()
        if self.closed:
            raise psycopg.OperationalError("the connection is closed")
        self.pgconn.transaction_status = pq.TransactionStatus.IDLE

    def begin(self) -> None:
        """Leave the connection in a transaction, as a user's unfinished work would."""
        self.pgconn.transaction_status = pq.TransactionStatus.INTRANS

    def kill(self) -> None:
        """Break the connection, as a terminated backend would."""
        self.pgconn.status = BAD


async def fake_check(conn: triopool.Connection) -> None:
    """A ``check`` callback: fails for a broken connection, like `check_connection`."""
    await trio.lowlevel.checkpoint()
    if conn.closed:
        raise psycopg.OperationalError("server closed the connection (fake)")

"""Issue 15's class of bugs: a cancel at every checkpoint of every psycopg operation.

For each operation (transaction blocks, cursors and server-side cursors, stream, COPY both
ways, pipeline, executemany, prepared statements, notifies, close) the sweep runs it again and
again with a cancel delivered at its k-th scheduling step, for k = 1, 2, ... until it completes
before the cancel comes:

* ``at_checkpoint``: the cancel is delivered right after the operation's task yields for the
  k-th time (it is waiting: the wait is cancelled);
* ``between_checkpoints``: the cancel arrives just before the task resumes for the k-th time,
  so it is pending while the code up to its next checkpoint runs (and fires there);
* ``pending``: the cancel is pending before the operation starts (k = 0);
* ``closed_at_checkpoint``: instead of a cancel, another task closes the connection while the
  operation waits at its k-th checkpoint: the operation must fail with a psycopg error (never
  an exception group, never a hang).

The steps are counted by a trio instrument on the operation's task, so the cancel points are
those of the real code path, I/O included. After every run the connection must be open (a
healthy local server never needs a close) and fully usable and correct (`assert_sound`):
IDLE on both sides, psycopg's transaction and pipeline bookkeeping consistent (an explicit
``commit()`` is allowed, a fresh ``transaction()`` commits visibly from another connection),
prepared statements and server-side cursors in order. Where the contract is exact (transaction
blocks, ``async with conn``), the outcome must match what the caller saw: the block's rows
are committed exactly when no ``trio.Cancelled`` came out.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import trio
from _connection_helpers import agen, connect
from psycopg import sql
from psycopg.pq import PipelineStatus, TransactionStatus

import triopool

Conn = triopool.Connection[Any]

# At most this many cancel points per operation and mode: a guard against a runaway loop
# (the longest operation here has well under 100 steps).
MAX_STEPS = 400
# Small, so a cleanup that stalls shows as a closed connection within the test's time.
CANCEL_TIMEOUT = 2.0
# A cancelled run on a local server that answers at once: anything slower is a stall.
RUN_BOUND = 1.5

PREPARED = "SELECT %s::int + 7 AS tp_sweep_prepared"
# Rows big enough to be flushed at once, then a result that never comes in time.
ROWS_THEN_SLEEP = (
    "SELECT repeat('x', 10000) FROM generate_series(1, 3) UNION ALL SELECT pg_sleep(30)::text"
)


@dataclass
class Run:
    """What one operation run gets: its connection, a table, a value unique to the run."""

    conn: Conn
    table: sql.Identifier
    value: int

    def insert(self) -> sql.Composed:
        return sql.SQL("INSERT INTO {} VALUES (%s)").format(self.table)


OpFn = Callable[[Run], Awaitable[None]]


@dataclass(frozen=True)
class Op:
    """An operation to sweep.

    `exact`: the values the run commits if it ends without ``trio.Cancelled``; with it, none
    of the values it writes is committed. `own_connection`: the run closes its connection
    (a new one each run).
    """

    fn: OpFn
    autocommit: bool = True
    exact: Callable[[Run], list[int]] | None = None
    own_connection: bool = False


# --- the operations ---------------------------------------------------------------------------


async def op_execute(run: Run) -> None:
    cur = await run.conn.execute("SELECT generate_series(1, 3)")
    assert await cur.fetchall() == [(1,), (2,), (3,)]


async def op_slow_execute(run: Run) -> None:
    # A statement still running when cancelled: a real cancel request on the server.
    cur = await run.conn.execute("SELECT pg_sleep(0.03), 1")
    assert await cur.fetchone() == ("", 1)


async def op_slow_pipeline(run: Run) -> None:
    async with run.conn.pipeline():
        await run.conn.execute("SELECT pg_sleep(0.03)")
        cur = await run.conn.execute(PREPARED, [run.value], prepare=True)
        assert await cur.fetchone() == (run.value + 7,)


async def op_implicit_transaction(run: Run) -> None:
    await run.conn.execute(run.insert(), [run.value])
    await run.conn.commit()
    await run.conn.execute("SELECT 1")
    await run.conn.rollback()


async def op_transaction(run: Run) -> None:
    async with run.conn.transaction():
        await run.conn.execute(run.insert(), [run.value])


async def op_nested_transaction(run: Run) -> None:
    async with run.conn.transaction():
        await run.conn.execute(run.insert(), [run.value])
        async with run.conn.transaction():
            await run.conn.execute(run.insert(), [run.value + 1])


async def op_server_cursor(run: Run) -> None:
    async with run.conn.transaction():
        async with run.conn.cursor("tp_sweep") as cur:
            cur.itersize = 2
            await cur.execute("SELECT generate_series(1, 5)")
            assert await cur.fetchone() == (1,)
            assert [row async for row in cur] == [(2,), (3,), (4,), (5,)]


async def op_server_cursor_implicit(run: Run) -> None:
    # Autocommit off, no block: DECLARE opens psycopg's implicit transaction.
    async with run.conn.cursor("tp_sweep_implicit") as cur:
        await cur.execute("SELECT generate_series(1, 3)")
        assert await cur.fetchall() == [(1,), (2,), (3,)]
    await run.conn.commit()


async def op_savepoint_rollback(run: Run) -> None:
    async with run.conn.transaction():
        await run.conn.execute(run.insert(), [run.value])
        with pytest.raises(LookupError):
            async with run.conn.transaction():
                await run.conn.execute(run.insert(), [run.value + 1])
                raise LookupError
        await run.conn.execute(run.insert(), [run.value + 2])


async def op_transaction_rollback(run: Run) -> None:
    async with run.conn.transaction():
        await run.conn.execute(run.insert(), [run.value])
        raise psycopg.Rollback


async def op_server_cursor_withhold(run: Run) -> None:
    async with run.conn.cursor("tp_sweep_held", withhold=True) as cur:
        await cur.execute("SELECT generate_series(1, 3)")
        assert await cur.fetchone() == (1,)
        assert await cur.fetchall() == [(2,), (3,)]


async def op_stream(run: Run) -> None:
    rows = []
    async with aclosing(agen(run.conn.cursor().stream("SELECT generate_series(1, 3)"))) as gen:
        async for row in gen:
            rows.append(row)
            await trio.lowlevel.checkpoint()  # the caller's own code
    assert rows == [(1,), (2,), (3,)]


async def op_stream_break(run: Run) -> None:
    # Leaving a stream early: psycopg cancels the rest on the server and drains.
    async with aclosing(agen(run.conn.cursor().stream(ROWS_THEN_SLEEP))) as gen:
        async for _ in gen:
            break


async def op_copy_out(run: Run) -> None:
    blocks = []
    async with run.conn.cursor().copy("COPY (SELECT generate_series(1, 3)) TO STDOUT") as copy:
        while block := await copy.read():
            blocks.append(bytes(block))
            await trio.lowlevel.checkpoint()  # the caller's own code
    assert b"".join(blocks) == b"1\n2\n3\n"


async def op_copy_out_error(run: Run) -> None:
    # The caller's code fails in the middle of a COPY TO: psycopg cancels it and drains.
    with pytest.raises(LookupError):
        async with run.conn.cursor().copy(f"COPY ({ROWS_THEN_SLEEP}) TO STDOUT") as copy:
            await copy.read()
            raise LookupError


async def op_copy_in(run: Run) -> None:
    statement = sql.SQL("COPY {} FROM STDIN").format(run.table)
    async with run.conn.cursor().copy(statement) as copy:
        for offset in range(3):
            await copy.write(f"{run.value + offset}\n".encode())
            await trio.lowlevel.checkpoint()


async def op_pipeline(run: Run) -> None:
    async with run.conn.pipeline() as pipeline:
        first = await run.conn.execute("SELECT 1")
        prepared = await run.conn.execute(PREPARED, [run.value], prepare=True)
        await run.conn.execute(run.insert(), [run.value])
        await pipeline.sync()
        assert await first.fetchone() == (1,)
        assert await prepared.fetchone() == (run.value + 7,)
        last = await run.conn.execute("SELECT 2")
        assert await last.fetchone() == (2,)


async def op_pipeline_transaction(run: Run) -> None:
    async with run.conn.pipeline():
        async with run.conn.transaction():
            await run.conn.execute(run.insert(), [run.value])
            cur = await run.conn.execute(PREPARED, [run.value], prepare=True)
            assert await cur.fetchone() == (run.value + 7,)


async def op_executemany(run: Run) -> None:
    values = [(run.value + offset,) for offset in range(3)]
    await run.conn.cursor().executemany(run.insert(), values)


async def op_executemany_returning(run: Run) -> None:
    statement = sql.SQL("INSERT INTO {} VALUES (%s) RETURNING id").format(run.table)
    cur = run.conn.cursor()
    await cur.executemany(statement, [(run.value + offset,) for offset in range(3)], returning=True)
    got = await cur.fetchall()  # one result per statement (no cur.results() in psycopg 3.2)
    while cur.nextset():
        got.extend(await cur.fetchall())
    assert got == [(run.value + offset,) for offset in range(3)]


async def op_prepare(run: Run) -> None:
    for offset in range(3):
        cur = await run.conn.execute(PREPARED, [offset], prepare=True)
        assert await cur.fetchone() == (offset + 7,)


async def op_notifies(run: Run) -> None:
    await run.conn.execute("LISTEN tp_sweep")
    await run.conn.execute("NOTIFY tp_sweep, 'hello'")
    async with aclosing(run.conn.notifies(stop_after=1)) as gen:
        async for notify in gen:
            assert notify.channel == "tp_sweep"


async def op_async_with_connection(run: Run) -> None:
    async with run.conn:
        await run.conn.execute(run.insert(), [run.value])


OPS: dict[str, Op] = {
    "execute": Op(op_execute),
    "slow_execute": Op(op_slow_execute),
    "slow_pipeline": Op(op_slow_pipeline),
    "implicit_transaction": Op(op_implicit_transaction, autocommit=False),
    "transaction": Op(op_transaction, exact=lambda run: [run.value]),
    "nested_transaction": Op(
        op_nested_transaction, autocommit=False, exact=lambda run: [run.value, run.value + 1]
    ),
    "server_cursor": Op(op_server_cursor, autocommit=False),
    "server_cursor_implicit": Op(op_server_cursor_implicit, autocommit=False),
    "server_cursor_withhold": Op(op_server_cursor_withhold),
    "savepoint_rollback": Op(op_savepoint_rollback, exact=lambda run: [run.value, run.value + 2]),
    "transaction_rollback": Op(op_transaction_rollback, exact=lambda run: []),
    "stream": Op(op_stream),
    "stream_implicit": Op(op_stream, autocommit=False),
    "stream_break": Op(op_stream_break),
    "copy_out": Op(op_copy_out),
    "copy_out_error": Op(op_copy_out_error),
    "copy_in": Op(op_copy_in),
    "copy_in_implicit": Op(op_copy_in, autocommit=False),
    "pipeline": Op(op_pipeline),
    "pipeline_implicit": Op(op_pipeline, autocommit=False),
    "pipeline_transaction": Op(op_pipeline_transaction, exact=lambda run: [run.value]),
    "executemany": Op(op_executemany),
    "executemany_implicit": Op(op_executemany, autocommit=False),
    "executemany_returning": Op(op_executemany_returning),
    "prepare": Op(op_prepare),
    "notifies": Op(op_notifies),
    "async_with_connection": Op(
        op_async_with_connection,
        autocommit=False,
        exact=lambda run: [run.value],
        own_connection=True,
    ),
}


# --- the canceller ----------------------------------------------------------------------------


class CancelAtStep(trio.abc.Instrument):
    """Cancel `scope` at the `k`-th checkpoint of `task` (see the module docstring).

    Installed while `task` runs, so its first yield ends the current step.
    """

    def __init__(self, task: trio.lowlevel.Task, scope: trio.CancelScope, k: int, mode: str):
        self.task = task
        self.scope = scope
        self.k = k
        self.between = mode == "between_checkpoints"
        self.close_instead = trio.Event() if mode == "closed_at_checkpoint" else None
        self.op_done = False
        self.closed = False
        self.yields = 0
        self.resumes = 0
        self.fired = False

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.yields += 1
            if not self.between and self.yields == self.k:
                self.fire()  # the task waits at its k-th checkpoint: that wait is cancelled

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.resumes += 1
            if self.between and self.resumes == self.k:
                self.fire()  # pending while the task runs on, until its next checkpoint

    def fire(self) -> None:
        self.fired = True
        if self.close_instead is not None:
            self.close_instead.set()  # the closer task runs while this one waits
        else:
            self.scope.cancel()


@dataclass
class Outcome:
    cancelled: bool  # trio.Cancelled came out of the operation
    reached: bool  # the operation reached its k-th checkpoint
    fired: bool  # the cancel (or close) took place before the operation ended
    elapsed: float
    error: Exception | None = None  # what the operation raised (closed_at_checkpoint)


async def run_cancelled_at(op: Op, run: Run, k: int, mode: str) -> Outcome:
    task = trio.lowlevel.current_task()
    error: Exception | None = None
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:  # noqa: ASYNC912  # the operation checkpoints
            canceller = CancelAtStep(task, scope, k, mode)
            if canceller.close_instead is not None:
                nursery.start_soon(close_when_set, run.conn, canceller)
            if mode == "pending":
                canceller.fire()
            trio.lowlevel.add_instrument(canceller)
            try:
                await op.fn(run)
            except Exception as ex:
                if canceller.close_instead is None:
                    raise
                error = ex
            finally:
                trio.lowlevel.remove_instrument(canceller)
                canceller.op_done = True
        nursery.cancel_scope.cancel()  # the closer, if it never had to close
    # When closing, the operation may have ended before the closer ran.
    fired = canceller.closed if canceller.close_instead is not None else canceller.fired
    elapsed = trio.current_time() - t0
    return Outcome(scope.cancelled_caught, canceller.fired, fired, elapsed, error)


async def close_when_set(conn: Conn, canceller: CancelAtStep) -> None:
    assert canceller.close_instead is not None
    await canceller.close_instead.wait()
    if not canceller.op_done:
        canceller.closed = True
        await conn.close()


# --- the checks -------------------------------------------------------------------------------


async def committed_ids(admin: Conn, table: sql.Identifier) -> set[int]:
    cur = await admin.execute(sql.SQL("SELECT id FROM {}").format(table))
    return {row[0] for row in await cur.fetchall()}


async def assert_sound(conn: Conn, admin: Conn, table: sql.Identifier, marker: int) -> None:
    """`conn` is open, idle, and everything about it works as on a fresh connection."""
    assert not conn.closed, "closed: a local server never needs it"
    assert conn.pgconn.pipeline_status == PipelineStatus.OFF
    status = conn.pgconn.transaction_status
    if conn.autocommit:
        assert status == TransactionStatus.IDLE, status
    else:
        # A cancelled statement may leave psycopg's implicit transaction open or failed,
        # as any error does with autocommit off: rolling back is the caller's job.
        assert status in (
            TransactionStatus.IDLE,
            TransactionStatus.INTRANS,
            TransactionStatus.INERROR,
        ), status
        await conn.rollback()
    # psycopg counts no open transaction() block (commit() would raise ProgrammingError).
    await conn.commit()
    assert conn.pgconn.transaction_status == TransactionStatus.IDLE
    # A fresh block is a real transaction, not a savepoint in a forgotten one.
    async with conn.transaction():
        await conn.execute(sql.SQL("INSERT INTO {} VALUES (%s)").format(table), [marker])
    assert marker in await committed_ids(admin, table)
    cur = await conn.execute("SELECT 1")
    assert await cur.fetchone() == (1,)
    # Prepared statements match the server (a stale name raises InvalidSqlStatementName).
    cur = await conn.execute(PREPARED, [1], prepare=True)
    assert await cur.fetchone() == (8,)
    # No server-side cursor left behind, no pipeline, nothing running, on either side.
    cur = await conn.execute("SELECT count(*) FROM pg_cursors", prepare=False)
    assert await cur.fetchone() == (0,)
    async with conn.pipeline():
        cur = await conn.execute("SELECT 3")
        assert await cur.fetchone() == (3,)
    if not conn.autocommit:
        await conn.rollback()
    assert conn.pgconn.transaction_status == TransactionStatus.IDLE
    cur = await admin.execute(
        "SELECT state FROM pg_stat_activity WHERE pid = %s", [conn.info.backend_pid]
    )
    assert await cur.fetchone() == ("idle",)


@pytest.fixture
async def sweep_table(admin: Conn) -> AsyncIterator[sql.Identifier]:
    name = sql.Identifier(f"tp_sweep_{uuid.uuid4().hex[:12]}")
    await admin.execute(sql.SQL("CREATE TABLE {} (id int)").format(name))
    try:
        yield name
    finally:
        with trio.move_on_after(5, shield=True):
            await admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(name))


@pytest.mark.parametrize(
    "mode", ["pending", "at_checkpoint", "between_checkpoints", "closed_at_checkpoint"]
)
@pytest.mark.parametrize("name", list(OPS))
async def test_cancel_everywhere(
    name: str, mode: str, postgres_dsn: str, app_name: str, admin: Conn, sweep_table: sql.Identifier
) -> None:
    op = OPS[name]

    async def new_connection() -> Conn:
        conn = await connect(postgres_dsn, app_name, autocommit=op.autocommit)
        conn.cancel_timeout = CANCEL_TIMEOUT
        # PREPARED prepared before the operation runs: its cached name must stay valid.
        cur = await conn.execute(PREPARED, [0], prepare=True)
        assert await cur.fetchone() == (7,)
        if not op.autocommit:
            await conn.rollback()
        return conn

    conn = await new_connection()
    try:
        for k in range(MAX_STEPS):
            if mode == "pending" and k > 0:
                break
            if mode != "pending" and k == 0:
                continue
            if op.own_connection and conn.closed:
                conn = await new_connection()
            run = Run(conn, sweep_table, value=1000 * k)
            outcome = await run_cancelled_at(op, run, k, mode)
            where = f"{name}, {mode}, k={k}: {outcome}"
            assert outcome.elapsed < RUN_BOUND, where
            if mode == "closed_at_checkpoint":
                if outcome.fired:
                    assert conn.closed, where
                    # psycopg's errors only: no exception group, no trio.ClosedResourceError
                    # (psycopg.Rollback: the caller's own, not swallowed when the rollback
                    # could not happen, as in psycopg).
                    assert outcome.error is None or isinstance(
                        outcome.error, (psycopg.Error, psycopg.Rollback)
                    ), where
                else:
                    assert outcome.error is None, where
                    assert conn.closed == op.own_connection, where
                if conn.closed:
                    conn = await new_connection()
                await assert_sound(conn, admin, sweep_table, marker=1000 * k + 999)
                if not outcome.reached:
                    break
                continue
            if mode == "pending":
                assert outcome.cancelled, where  # a cancelled task starts nothing
            if op.exact is not None:
                expected = set(op.exact(run))
                written = {run.value + offset for offset in range(10)}
                committed = written & await committed_ids(admin, sweep_table)
                assert committed == (set() if outcome.cancelled else expected), where
            if op.own_connection:
                assert conn.closed, where
                conn = await new_connection()
            try:
                await assert_sound(conn, admin, sweep_table, marker=1000 * k + 999)
            except AssertionError as ex:
                raise AssertionError(f"{where}: {ex}") from ex
            if not outcome.reached:
                break  # the operation completed before its k-th step: every point was hit
        else:
            raise AssertionError(f"{name}: more than {MAX_STEPS} steps")
    finally:
        with trio.move_on_after(5, shield=True):
            await conn.close()

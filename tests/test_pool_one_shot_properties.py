"""Property test of one-shot statements and borrowers sharing a pool, on the real server.

Hypothesis draws a program: a pool (sizes, ``pipeline_depth``) and a list of
callers started one after the other, a few scheduling steps apart: one-shot
calls (``fetchval``, ``fetch``, ``fetchrow``, ``execute``, ``executemany``),
some failing with a SQL error, some slow; borrowers running a few queries on
their connection; callers cancelled after a few steps; backends killed with
``pg_terminate_backend``.  Every caller asks for values only it asks for (its
*marker*), so that an answer delivered to another caller shows.  Checked:

* every caller gets exactly its own result, or its own error (a SQL error
  carries the caller's marker), or -- only if a backend was killed -- an
  `psycopg.OperationalError`, or was cancelled; nobody waits forever (the
  program is bounded in time);
* ``size <= max_size`` after every scheduling step of the program (a trio
  instrument);
* nothing leaks: once all callers are done, nothing is lent, the books
  balance, the server has one backend per pooled connection; once closed,
  none;
* ``executemany`` is all or nothing: the table holds exactly the rows of
  those that succeeded (and maybe of those cut by a kill or a cancellation).

`test_property_test_catches_planted_bugs` shows it can fail: a pipeline that
delivers results to the wrong callers, and one that forgets its callers when
its connection breaks, are caught.
"""

from __future__ import annotations

import itertools
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
import pytest
import trio
import trio.testing
from _contract_helpers import backend_pids, terminate
from _fault_helpers import pool_pids, quiesce
from _pool_checks import Server, app_name, assert_no_leaks, assert_settled
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import FlakyFailure

from triopool import ConnectionPool
from triopool._policy import SlotState
from triopool.connection import StatementPipeline

Call = Literal["fetchval", "fetch", "fetchrow", "execute", "executemany"]
Fate = Literal["ok", "sql_error", "slow"]
TABLE = "tp_prop_many"
#: A function raising an error that carries its argument (the caller's marker).
FAIL_FUNCTION = f"""
CREATE OR REPLACE FUNCTION tp_prop_fail(marker int) RETURNS int LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'tp_prop failure %', marker; END $$;
CREATE TABLE IF NOT EXISTS {TABLE} (marker int PRIMARY KEY);
"""
#: Bounds the whole program: a caller that never gets an answer fails the example.
PROGRAM_TIMEOUT = 20.0
#: Seconds a kill waits for a connection with statements in flight.
KILL_PATIENCE = 0.05


@dataclass(frozen=True)
class OneShot:
    call: Call
    fate: Fate
    cancel_after: int | None  # scheduling steps before its caller is cancelled


@dataclass(frozen=True)
class Borrow:
    queries: int
    cancel_after: int | None


@dataclass(frozen=True)
class Kill:
    pick: int  # which of the pool's backends (those with statements in flight first)


Op = OneShot | Borrow | Kill


@dataclass(frozen=True)
class Program:
    max_size: int
    depth: int
    ops: list[tuple[int, Op]]  # (steps to wait before starting it, what)


CANCEL = st.none() | st.integers(0, 12)
ONE_SHOTS = st.builds(
    OneShot,
    call=st.sampled_from(["fetchval", "fetch", "fetchrow", "execute", "executemany"]),
    fate=st.sampled_from(["ok", "ok", "ok", "sql_error", "slow"]),
    cancel_after=st.none() | st.none() | CANCEL,
)
BORROWS = st.builds(Borrow, queries=st.integers(1, 3), cancel_after=st.none() | CANCEL)
KILLS = st.builds(Kill, pick=st.integers(0, 3))


@st.composite
def programs(draw: st.DrawFn) -> Program:
    op = st.one_of(ONE_SHOTS, ONE_SHOTS, ONE_SHOTS, BORROWS, KILLS)
    ops = draw(st.lists(st.tuples(st.integers(0, 4), op), min_size=1, max_size=14))
    return Program(draw(st.integers(1, 3)), draw(st.integers(1, 4)), ops)


@dataclass
class Run:
    """What the callers of one program got."""

    killed: bool = False
    results: dict[int, object] = field(default_factory=dict)  # marker -> result
    expected: dict[int, object] = field(default_factory=dict)
    inserted: set[int] = field(default_factory=set)  # executemany that succeeded
    maybe_inserted: set[int] = field(default_factory=set)  # ...or were cut short
    problems: list[str] = field(default_factory=list)


class SizeWatch(trio.abc.Instrument):
    """Checks ``size <= max_size`` after every scheduling step."""

    def __init__(self, pool: ConnectionPool, run: Run) -> None:
        self.pool = pool
        self.run = run

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        size = self.pool._policy.size
        if size > self.pool.max_size and len(self.run.problems) < 5:
            self.run.problems.append(f"size {size} > max_size {self.pool.max_size}")


async def one_shot(pool: ConnectionPool, op: OneShot, marker: int, run: Run) -> object:
    query: Any
    if op.fate == "sql_error":
        query, params = "SELECT tp_prop_fail(%s)", [marker]
    elif op.fate == "slow":
        query, params = "SELECT %s::int FROM pg_sleep(0.02)", [marker]
    else:
        query, params = "SELECT %s::int", [marker]
    if op.call == "fetchval":
        run.expected[marker] = marker
        return await pool.fetchval(query, params)
    if op.call == "fetch":
        run.expected[marker] = [(marker,)]
        return await pool.fetch(query, params)
    if op.call == "fetchrow":
        run.expected[marker] = (marker,)
        return await pool.fetchrow(query, params)
    if op.call == "execute":
        run.expected[marker] = 1
        return await pool.execute(query, params)
    # executemany: two rows, or a duplicate key (all or nothing) for a SQL error
    rows = [[marker], [marker if op.fate == "sql_error" else -marker]]
    run.expected[marker] = 2
    run.maybe_inserted.add(marker)
    result = await pool.executemany(f"INSERT INTO {TABLE} VALUES (%s)", rows)
    run.inserted.add(marker)
    return result


async def borrow(pool: ConnectionPool, op: Borrow, marker: int, run: Run) -> object:
    run.expected[marker] = [marker * 10 + i for i in range(op.queries)]
    values = []
    async with pool.connection() as conn:
        for i in range(op.queries):
            cur = await conn.execute("SELECT %s::int", [marker * 10 + i])
            row = await cur.fetchone()
            values.append(row[0] if row else None)
    return values


def check_result(marker: int, result: object, op: Op, run: Run) -> None:
    expected = run.expected.get(marker)
    if result == "cancelled":
        return
    if isinstance(result, psycopg.errors.RaiseException):
        whose = re.search(r"tp_prop failure (-?\d+)", str(result))
        if whose and int(whose.group(1)) != marker:
            run.problems.append(f"caller {marker} got the error of caller {whose.group(1)}")
        elif not (isinstance(op, OneShot) and op.fate == "sql_error" and whose):
            run.problems.append(f"caller {marker}: unexpected {result!r}")
        return
    if isinstance(result, psycopg.errors.UniqueViolation):
        if not (isinstance(op, OneShot) and op.fate == "sql_error"):
            run.problems.append(f"caller {marker}: unexpected {result!r}")
        return
    if isinstance(result, psycopg.OperationalError):
        if not run.killed:
            run.problems.append(f"caller {marker}: {result!r} though no backend was killed")
        return
    if isinstance(result, BaseException):
        run.problems.append(f"caller {marker}: unexpected {result!r}")
    elif isinstance(op, OneShot) and op.fate == "sql_error" and op.call != "executemany":
        run.problems.append(f"caller {marker}: got {result!r} instead of its error")
    elif isinstance(op, OneShot) and op.fate == "sql_error":
        run.problems.append(f"caller {marker}: executemany with a duplicate key succeeded")
    elif result != expected:
        run.problems.append(f"caller {marker} got {result!r}, not its own {expected!r}")


async def run_program(server: Server, program: Program, timeout: float) -> Run:  # noqa: ASYNC109
    run = Run()
    name = app_name("tp_prop")
    markers = itertools.count(1)
    pool = ConnectionPool(
        server.dsn,
        kwargs={"application_name": name, "autocommit": False},
        min_size=1,
        max_size=program.max_size,
        pipeline_depth=program.depth,
        timeout=PROGRAM_TIMEOUT,
    )
    async with pool:
        await pool.execute(f"DELETE FROM {TABLE}")  # what a failed example left
        watch = SizeWatch(pool, run)
        trio.lowlevel.add_instrument(watch)
        try:
            with trio.fail_after(timeout):  # noqa: ASYNC912  # every caller gets an answer in time
                async with trio.open_nursery() as nursery:
                    for gap, op in program.ops:
                        for _ in range(gap):
                            await trio.lowlevel.checkpoint()
                        if isinstance(op, Kill):
                            await kill(server, pool, name, op.pick, run)
                        else:
                            nursery.start_soon(caller, pool, op, next(markers), run)
            await trio.testing.wait_all_tasks_blocked()
            assert_no_leaks(pool)
            if run.killed:  # idle connections killed: found and replaced
                await pool.check()
            await quiesce(pool)  # connections opened for waiters may still come
            open_connections(pool, run)
            await same_backends(pool, server, name, run)
        finally:
            trio.lowlevel.remove_instrument(watch)
        rows = await pool.fetch(f"DELETE FROM {TABLE} RETURNING marker")
    await assert_settled(pool, server, name)
    stored = {marker for (marker,) in rows if marker > 0}
    if not run.inserted <= stored <= run.maybe_inserted:
        run.problems.append(
            f"executemany not all or nothing: stored {sorted(stored)},"
            f" succeeded {sorted(run.inserted)}"
        )
    return run


async def same_backends(pool: ConnectionPool, server: Server, name: str, run: Run) -> None:
    """The server has exactly one backend per connection of the pool (polled: backends
    end a little after their connection is closed)."""
    mine: set[int] = set()
    theirs: set[int] = set()
    with trio.move_on_after(3):
        while True:
            mine = pool_pids(pool)
            theirs = await backend_pids(server, name)
            if mine == theirs:
                return
            await trio.sleep(0.02)
    states = {slot: s.state.value for slot, s in pool._policy.slots.items()}
    run.problems.append(f"pool backends {mine}, server backends {theirs} (slots {states})")


def open_connections(pool: ConnectionPool, run: Run) -> None:
    """Every connection the pool counts as usable is open."""
    for slot, state in pool._policy.slots.items():
        actor = pool._scheduler.actors.get(slot)
        if state.state in (SlotState.IDLE, SlotState.LENT, SlotState.PIPELINING) and (
            actor is None or actor.conn is None or actor.conn.closed
        ):
            run.problems.append(f"slot {slot} is {state.state.value} with no open connection")


async def caller(pool: ConnectionPool, op: OneShot | Borrow, marker: int, run: Run) -> None:
    scope = trio.CancelScope()

    async def cancel_later(steps: int) -> None:  # noqa: ASYNC910  # 0 steps: cancel at once
        for _ in range(steps):
            await trio.lowlevel.checkpoint()
        scope.cancel()

    result: object
    async with trio.open_nursery() as nursery:
        if op.cancel_after is not None:
            nursery.start_soon(cancel_later, op.cancel_after)
        with scope:
            try:
                if isinstance(op, OneShot):
                    result = await one_shot(pool, op, marker, run)
                else:
                    result = await borrow(pool, op, marker, run)
            except psycopg.Error as ex:
                result = ex
        if scope.cancelled_caught:
            result = "cancelled"
    check_result(marker, result, op, run)


def pipelining_pids(pool: ConnectionPool) -> list[int]:
    """Backends of the pool's connections with statements in flight."""
    return sorted(
        actor.conn.info.backend_pid
        for actor in pool._scheduler.actors.values()
        if actor.conn is not None
        and not actor.conn.closed  # (a broken one is closed before its statements fail)
        and actor.pipeline is not None
        and actor.pipeline.in_flight
    )


async def kill(server: Server, pool: ConnectionPool, name: str, pick: int, run: Run) -> None:  # noqa: ASYNC910  # a program's step; the callers checkpoint
    """Terminate one of the pool's backends: one with statements in flight if there is
    one within `KILL_PATIENCE` seconds, else any."""
    with trio.move_on_after(KILL_PATIENCE):  # noqa: ASYNC912  # a bounded look at the pool's state
        while not pipelining_pids(pool):  # noqa: ASYNC110  # the pool's state: no event
            await trio.lowlevel.checkpoint()
    pids = pipelining_pids(pool) or sorted(await backend_pids(server, name))
    if pids:
        run.killed = True
        await terminate(server, pids[pick % len(pids)])  # (until it is gone)


def check_program(server: Server, program: Program, timeout: float = PROGRAM_TIMEOUT) -> None:  # noqa: ASYNC109
    run = trio.run(run_program, server, program, timeout)
    assert not run.problems, "\n".join(run.problems)


PROPERTY_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)


@pytest.fixture(scope="module")
def prepared_server(postgres_server: Server) -> Server:
    with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
        conn.execute(FAIL_FUNCTION)
    return postgres_server


def test_one_shots_and_borrowers_keep_their_promises(prepared_server: Server) -> None:
    @PROPERTY_SETTINGS
    @given(program=programs())
    def check(program: Program) -> None:
        check_program(prepared_server, program)

    check()


# -- the property test can fail: planted bugs ----------------------------------------


def plant_crossed_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """The outcomes read together go to each other's callers (the first two swapped)."""
    read = StatementPipeline.read

    def crossed(self: StatementPipeline[Any]) -> list[tuple[Any, Any]]:
        done = read(self)
        if len(done) >= 2:
            (first, a), (second, b) = done[:2]
            done[:2] = [(first, b), (second, a)]
        return done

    monkeypatch.setattr(StatementPipeline, "read", crossed)


def plant_forgotten_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken pipeline forgets its callers instead of failing them."""
    abandon = StatementPipeline.abandon

    def forget(self: StatementPipeline[Any]) -> tuple[list[Any], Any]:
        _, cause = abandon(self)
        return [], cause

    monkeypatch.setattr(StatementPipeline, "abandon", forget)


PLANTS: dict[str, tuple[Callable[[pytest.MonkeyPatch], None], str]] = {
    "crossed_results": (
        plant_crossed_results,
        "not its own|error of caller|instead of its error",
    ),
    "forgotten_callers": (plant_forgotten_callers, "TooSlowError"),
}


@pytest.mark.parametrize("plant", PLANTS)
def test_property_test_catches_planted_bugs(
    plant: str,
    prepared_server: Server,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    how, expected = PLANTS[plant]
    how(monkeypatch)

    @settings(
        PROPERTY_SETTINGS,
        max_examples=60,
        derandomize=True,
        report_multiple_bugs=False,
        phases=[Phase.generate],  # the first failure is enough (no shrinking)
    )
    @given(program=programs())
    def check(program: Program) -> None:
        check_program(prepared_server, program, timeout=3.0)

    started = time.perf_counter()
    # (Hypothesis replays a failure: with real I/O it may not recur, and then it raises
    # a FlakyFailure group holding the first one.)
    with pytest.raises((AssertionError, trio.TooSlowError, FlakyFailure)) as caught:
        check()
    report = "".join(traceback.format_exception(caught.value))
    found = re.search(expected, report)
    with capsys.disabled():
        print(f"\n{plant}: caught in {time.perf_counter() - started:.1f} s: {found}")
    assert found, report

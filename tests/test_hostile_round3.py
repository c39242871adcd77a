"""Hostile tests, round 3: the code changed for speed (policy deadlines, execute, pooled block).

Attacked: the policy's deadline book-keeping (arrival-order deque, heap for
the out-of-order, lazy trimming and compaction, the running count of queued
statements) with every kind of timeout, cancellations anywhere in the queue
and resizes; `Connection.execute` reusing its spare cursor (adapters, session
settings, memory, two tasks at once); the pooled block's exit.

Findings (each test failed before its fix):

* the spare cursor was not "as new": it kept the adapters the connection had
  when it was made (a loader or dumper registered on the connection later was
  ignored, even one a pool's ``configure`` registers after a query), and for
  the same query string its transformer (so a client encoding changed by
  another cursor was ignored: text was sent in the wrong encoding);
* the spare cursor kept the last result alive after the caller dropped it:
  an idle pooled connection held the previous borrower's rows in memory;
* leaving ``pool.connection()`` while a stream of the block's own task is
  suspended (it holds the connection's lock) waited forever, where the
  contract says an ``ACTIVE`` connection is discarded (now every cleanup that
  would wait for a lock its own task holds closes the connection and raises
  `psycopg.OperationalError` at once: nothing is committed).
"""

from __future__ import annotations

import ctypes
import math
import random
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from _fake_server import FakeServer
from _hostile_helpers import fake_pool, real_pool
from _hostile_helpers import name as name
from _pool_checks import Server
from psycopg.abc import Buffer
from psycopg.adapt import Dumper
from psycopg.types.string import TextLoader

import triopool
from triopool import PoolTimeout
from triopool._policy import (
    Action,
    Close,
    Expire,
    Grant,
    Open,
    Outcome,
    PoolPolicy,
    Reject,
    Reset,
    SlotState,
    Wake,
)

Conn = triopool.Connection[Any]

# -- the policy's deadlines (sans I/O) ---------------------------------------------------------

#: A waiter of the fuzz below: (number, is a one-shot statement).
FuzzWaiter = tuple[int, bool]

#: Timeouts of every kind: none, zero, tiny, alike, decreasing, huge, infinite.
TIMEOUTS: tuple[float | None, ...] = (
    None, 0.0, 1e-12, 0.1, 0.5, 1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 5.0, 1e9, math.inf,
)  # fmt: skip


class PolicyFuzz:
    """Drive a `PoolPolicy` as the trio shell does, with many waiters, and check it.

    The model is the queue alone: who waits, since when, until when.  After
    every step: the policy's waiters are the model's, the running count of
    queued statements is right, grants go to the oldest waiter, no waiter is
    expired before its deadline or left queued after it once time passed it,
    and the timer the shell would sleep on is never later than the earliest
    deadline of a waiter.
    """

    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.seed = seed
        self.policy: PoolPolicy[FuzzWaiter] = PoolPolicy(
            min_size=0,
            max_size=self.rnd.choice([1, 2, 3]),
            pipeline_depth=self.rnd.choice([1, 2, 4]),
        )
        self.now = 0.0
        self.queued: dict[FuzzWaiter, float] = {}  # waiter -> deadline, in arrival order
        self.lent: dict[FuzzWaiter, int] = {}
        self.sent: dict[FuzzWaiter, int] = {}
        self.connecting: list[int] = []
        self.next_waiter = 0
        self.timer = math.inf
        self.most_queued = 0
        #: Crowded runs queue more than they serve.
        self.request_rate = 0.45 if seed % 2 else 0.7

    def apply(self, actions: list[Action[FuzzWaiter]]) -> None:
        for action in actions:
            if isinstance(action, Grant):
                waiter = action.waiter
                assert waiter in self.queued, (self.seed, "granted twice or never queued", waiter)
                assert next(iter(self.queued)) == waiter, (self.seed, "not FIFO", waiter)
                del self.queued[waiter]
                (self.sent if waiter[1] else self.lent)[waiter] = action.slot
            elif isinstance(action, Expire):
                deadline = self.queued.pop(action.waiter)
                assert deadline <= self.now, (self.seed, "expired early", deadline, self.now)
            elif isinstance(action, Reject):
                raise AssertionError((self.seed, "rejected, yet the pool is open"))
            elif isinstance(action, Open):
                self.connecting.append(action.slot)
            elif isinstance(action, Close):
                self.apply(self.policy.closed_slot(action.slot))
            elif isinstance(action, Reset):
                self.apply(self.policy.reset_done(action.slot, self.now, ok=True))
            elif isinstance(action, Wake):
                self.timer = self.policy.next_deadline()

    def request(self) -> None:
        waiter = (self.next_waiter, self.rnd.random() < 0.3)
        self.next_waiter += 1
        timeout = self.rnd.choice(TIMEOUTS) if self.rnd.random() < 0.6 else 1.0
        deadline = math.inf if timeout is None else self.now + timeout
        result = self.policy.request(waiter, self.now, deadline, statement=waiter[1])
        if isinstance(result, int):
            assert waiter[1] or not self.queued, (self.seed, "a borrower jumped the queue")
            (self.sent if waiter[1] else self.lent)[waiter] = result
            return
        expired_at_once = any(isinstance(a, Expire) and a.waiter == waiter for a in result)
        assert expired_at_once == (deadline <= self.now), (self.seed, "expiry at request")
        if not expired_at_once:
            self.queued[waiter] = deadline
        self.apply([a for a in result if not (isinstance(a, Expire) and a.waiter == waiter)])

    def advance(self, seconds: float) -> None:
        target = self.now + seconds
        while self.timer <= target:
            self.now = max(self.now, self.timer)
            self.apply(self.policy.tick(self.now))
            self.timer = self.policy.next_deadline()
        self.now = target
        late = [w for w, deadline in self.queued.items() if deadline < self.now]
        assert not late, (self.seed, "queued past their deadline", late[:3])

    def step(self) -> None:
        rnd, policy = self.rnd, self.policy
        roll = rnd.random()
        if roll < self.request_rate:
            self.request()
            roll = 1.0  # nothing else this step
        else:
            roll = (roll - self.request_rate) / (1 - self.request_rate) * 0.55 + 0.45
        if roll >= 1.0:
            pass
        elif roll < 0.65 and self.queued:
            waiter = rnd.choice(list(self.queued))  # front, middle or back
            del self.queued[waiter]
            self.apply(policy.cancel(waiter, self.now, timed_out=rnd.random() < 0.2))
        elif roll < 0.72 and self.lent:
            slot = self.lent.pop(rnd.choice(list(self.lent)))
            outcome = rnd.choice([Outcome.CLEAN] * 4 + [Outcome.DIRTY, Outcome.BROKEN])
            self.apply(policy.release(slot, self.now, outcome))
        elif roll < 0.8 and self.sent:
            slot = self.sent.pop(rnd.choice(list(self.sent)))
            self.apply(policy.statements_done(slot, self.now, 1))
        elif roll < 0.86 and self.connecting:
            slot = self.connecting.pop(rnd.randrange(len(self.connecting)))
            if policy.state_of(slot) is SlotState.CONNECTING:
                self.apply(policy.connected(slot, self.now, 0.0))
        elif roll < 0.88:
            low = rnd.randint(0, 2)
            self.apply(policy.resize(low, max(low, rnd.randint(1, 4))))
        else:
            self.advance(rnd.choice([0.0, 0.05, 0.3, 1.0, 2.5]))
        self.most_queued = max(self.most_queued, len(self.queued))
        assert list(policy.waiters()) == list(self.queued), (self.seed, "queue differs")
        statements = sum(1 for waiter in self.queued if waiter[1])
        assert policy._statements_queued == statements, (self.seed, "statement count")
        earliest = min(self.queued.values(), default=math.inf)
        assert self.timer <= earliest, (self.seed, "the shell's timer is late")
        assert policy.next_deadline() <= earliest, (self.seed, "next_deadline late")
        # Lazy entries stay bounded (compaction works).
        assert len(policy._in_order) <= 2 * len(self.queued) + 66, (self.seed, "deque grows")
        assert len(policy._deadlines) <= 2 * len(self.queued) + 66, (self.seed, "heap grows")


def test_policy_deadlines_with_crowds_of_waiters() -> None:
    """Dozens of waiters at once (test_policy_stateful.py's machine queues a few): every
    kind of timeout, cancels at the front, middle and back, expiries while others are
    granted, statements, resizes."""
    crowded = 0
    for seed in range(12):
        fuzz = PolicyFuzz(seed)
        fuzz.apply(fuzz.policy.open())
        fuzz.timer = fuzz.policy.next_deadline()
        for _ in range(1500):
            fuzz.step()
        crowded = max(crowded, fuzz.most_queued)
    assert crowded > 40


def test_policy_compaction_keeps_every_live_deadline() -> None:
    """Waiters cancelled by the hundred behind a live first deadline (the deque) and
    above a live earliest one (the heap): the entries left behind are compacted, and
    every waiter still queued expires exactly at its deadline, in deadline order."""
    policy: PoolPolicy[object] = PoolPolicy(min_size=0, max_size=1)
    policy.open()
    policy.request("holder", 0.0)
    policy.connected(0, 0.0, 0.0)  # lent to the holder: everyone else queues
    expected: list[tuple[float, object]] = []
    now = 0.0

    def queue(waiter: object, deadline: float) -> None:
        assert isinstance(policy.request(waiter, now, deadline), list)

    queue("front", 1000.0)  # in arrival order: the deque's live head
    queue("heap top", 5.0)  # earlier than one before it: the heap's live top
    expected += [(5.0, "heap top"), (1000.0, "front")]
    for i in range(600):
        now = i / 1000
        queue(("in order", i), 1000.0 + i)
        queue(("out of order", i), 10.0 + i / 100)
        if i % 100 == 99:  # a few stay, the rest leave
            expected += [(1000.0 + i, ("in order", i)), (10.0 + i / 100, ("out of order", i))]
        else:
            policy.cancel(("in order", i), now)
            policy.cancel(("out of order", i), now)
        assert policy.next_deadline() == 5.0
    queued = len(policy.waiters())
    assert queued == len(expected)
    assert len(policy._in_order) <= 2 * queued + 65
    assert len(policy._deadlines) <= 2 * queued + 65
    expired: list[tuple[float, object]] = []
    while (now := policy.next_deadline()) < math.inf:
        for action in policy.tick(now):
            assert isinstance(action, Expire)
            expired.append((now, action.waiter))
    assert expired == sorted(expected, key=lambda entry: entry[0])
    assert policy.waiters() == []


def test_policy_equal_and_decreasing_deadlines_expire_in_deadline_order() -> None:
    """Alike timeouts (the deque), decreasing ones (the heap), none and infinite: each
    waiter expires exactly at its deadline, the rest keep their place."""
    policy: PoolPolicy[str] = PoolPolicy(min_size=0, max_size=1)
    policy.open()
    assert policy.request("holder", 0.0) != []  # opens the one connection
    slot = 0
    policy.connected(slot, 0.0, 0.0)
    deadlines = {"a": 3.0, "b": 3.0, "c": 1.0, "d": math.inf, "e": 0.5, "f": 1e9, "g": 2.0}
    for waiter, deadline in deadlines.items():
        assert isinstance(policy.request(waiter, 0.0, deadline), list)
    policy.cancel("b", 0.1)  # middle of the deque
    policy.cancel("e", 0.1)  # top of the heap
    expired: list[tuple[float, str]] = []
    now = 0.0
    while (now := policy.next_deadline()) <= 10.0:
        for action in policy.tick(now):
            assert isinstance(action, Expire)
            expired.append((now, action.waiter))
    assert expired == [(1.0, "c"), (2.0, "g"), (3.0, "a")]
    assert now == 1e9
    assert policy.waiters() == ["d", "f"]
    granted = policy.release(slot, 10.0, Outcome.CLEAN)
    assert granted == [Grant("d", slot)]
    assert policy.next_deadline() == 1e9
    assert policy.tick(1e9) == [Expire("f", 1e9)]
    assert policy.waiters() == [] and policy.next_deadline() == math.inf


# -- the pool's shell under a mock clock (fake server) -----------------------------------------


async def test_mixed_request_timeouts_through_the_pool(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The scheduler's timer follows the policy's deadlines: clients with every kind of
    timeout behind one lent connection fail exactly at their deadline, cancelled ones leave,
    and the others are served in arrival order."""
    server = FakeServer()
    async with fake_pool(server, min_size=1, max_size=1, timeout=100.0) as pool:
        holder = await pool.getconn()
        start = trio.current_time()
        outcomes: dict[str, tuple[str, float]] = {}
        scopes: dict[str, trio.CancelScope] = {}

        async def client(label: str, wait_for: float | None) -> None:
            with trio.CancelScope() as scope:
                scopes[label] = scope
                asked = trio.current_time()
                try:
                    conn = await pool.getconn(timeout=wait_for)
                except PoolTimeout:
                    outcomes[label] = ("timeout", trio.current_time() - asked)
                    return
                outcomes[label] = ("served", trio.current_time() - start)
                try:
                    await trio.sleep(1.0)
                finally:
                    await pool.putconn(conn)
            if scope.cancelled_caught:
                outcomes[label] = ("cancelled", trio.current_time() - start)

        timeouts: dict[str, float | None] = {
            "a": 3.0,
            "b": 1.0,
            "c": 1.0,
            "d": math.inf,
            "e": 0.5,
            "f": 1e9,
            "g": 2.0,
            "h": 1.0,
            "i": 0.0,
            "j": 1e-9,
        }
        async with trio.open_nursery() as nursery:
            for label, timeout in timeouts.items():
                nursery.start_soon(client, label, timeout)
                await trio.sleep(0.001)  # one arrival order
            await trio.sleep_until(start + 0.25)
            scopes["a"].cancel()  # the front of the queue
            scopes["g"].cancel()  # its middle
            await trio.sleep_until(start + 1.5)
            await pool.putconn(holder)
    for label in "bcehij":
        kind, waited = outcomes[label]
        assert kind == "timeout", (label, outcomes[label])
        assert waited == pytest.approx(timeouts[label], abs=1e-6), label
    for label, kind, at in [
        ("a", "cancelled", 0.25),
        ("g", "cancelled", 0.25),
        ("d", "served", 1.5),  # the first still queued when the holder gives back
        ("f", "served", 2.5),  # then the next, a second later
    ]:
        assert outcomes[label][0] == kind, (label, outcomes[label])
        assert outcomes[label][1] == pytest.approx(at, abs=1e-6), label


# -- Connection.execute's spare cursor ---------------------------------------------------------


class Point:
    """A type of the user's, adapted by a dumper registered on the connection."""


class PointDumper(Dumper):
    oid = psycopg.adapters.types["text"].oid

    def dump(self, obj: Any) -> bytes:
        return b"point!"


class UpperLoader(TextLoader):
    def load(self, data: Buffer) -> str:
        return bytes(data).decode().upper()


async def test_adapters_registered_after_an_execute_apply_to_the_next(aconn: Conn) -> None:
    """As psycopg's ``conn.execute`` (a new cursor each time): adapters registered on the
    connection apply to every statement executed after."""
    cur = await aconn.execute("SELECT 'a'::text")
    assert await cur.fetchone() == ("a",)
    del cur
    aconn.adapters.register_loader("text", UpperLoader)
    aconn.adapters.register_dumper(Point, PointDumper)
    cur = await aconn.execute("SELECT 'b'::text")
    assert await cur.fetchone() == ("B",)  # got ('b',): the old loader
    del cur
    cur = await aconn.execute("SELECT %s::text", [Point()])  # ProgrammingError: cannot adapt
    assert await cur.fetchone() == ("POINT!",)


async def test_configure_registering_adapters_after_a_query(
    postgres_server: Server, name: str
) -> None:
    """The setup pgvector's README shows (``CREATE EXTENSION`` then ``register_vector``),
    done in the pool's ``configure``: the borrower's statements must see the adapters."""

    async def configure(conn: Conn) -> None:
        await conn.execute("SET TIME ZONE 'UTC'")
        await conn.commit()  # (a configure must leave the connection idle)
        conn.adapters.register_dumper(Point, PointDumper)

    async with real_pool(
        postgres_server, name, min_size=1, max_size=1, configure=configure
    ) as pool:
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT %s::text", [Point()])
            assert await cur.fetchone() == ("point!",)


#: One query object, as a statement in a loop or a module constant is.
ENCODED = "SELECT length(%s::text), %s::text = chr(233)"


async def test_client_encoding_changed_by_another_cursor(aconn: Conn) -> None:
    """A client encoding set through another cursor: the next ``execute`` of the same
    query must encode its text parameters in it (psycopg's new cursor does)."""
    for encoding in ("UTF8", "LATIN1"):
        async with aconn.cursor() as other:
            await other.execute(f"SET client_encoding TO '{encoding}'")
        cur = await aconn.execute(ENCODED, ["é", "é"])
        # LATIN1: got (2, False), the UTF-8 bytes of 'é' read as two LATIN1 characters.
        assert await cur.fetchone() == (1, True), encoding
        del cur


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (fields set below: ctypes allows it once)."""


_MallInfo2._fields_ = [
    (field, ctypes.c_size_t)
    for field in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
    )
]  # fmt: skip


def _malloc_in_use() -> int:
    """Bytes the C heap has handed out (glibc's ``mallinfo2``): libpq's results live there."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except AttributeError:
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


async def test_an_idle_connection_does_not_keep_the_last_result(
    postgres_server: Server, name: str
) -> None:
    """A borrower reads 50 MB and drops everything: once the connection is back in the
    pool, that memory is freed (it is, with psycopg's ``conn.execute``)."""
    megabytes = 50
    async with real_pool(postgres_server, name, min_size=1, max_size=1) as pool:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        before = _malloc_in_use()
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT repeat('x', 65536) FROM generate_series(1, %s)", [megabytes * 16]
            )
            assert len(await cur.fetchall()) == megabytes * 16
            del cur
        kept = (_malloc_in_use() - before) / 2**20
        assert kept < megabytes / 5, f"{kept:.0f} MB still held by the idle connection"


async def test_one_connection_shared_by_execute_cursor_and_commit_tasks(conn: Conn) -> None:
    """Three tasks on one connection: two ``execute`` (the spare cursor) with a checkpoint
    between execute and fetch, one using cursors of its own, one committing and opening
    transaction blocks: every task reads its own rows."""
    errors: list[object] = []
    rnd = random.Random(3)

    async def executes(tag: str) -> None:
        for i in range(60):
            cur = await conn.execute(
                "SELECT %s::text, generate_series(1, %s)", [f"{tag}{i}", i % 3 + 1]
            )
            if rnd.random() < 0.5:
                await trio.lowlevel.checkpoint()
            rows = await cur.fetchall()
            if rows != [(f"{tag}{i}", k) for k in range(1, i % 3 + 2)]:
                errors.append((tag, i, rows))
            del cur

    async def cursors() -> None:
        for i in range(60):
            async with conn.cursor() as cur:
                await cur.execute("SELECT %s::int", [i])
                if rnd.random() < 0.5:
                    await trio.lowlevel.checkpoint()
                if await cur.fetchone() != (i,):
                    errors.append(("cursor", i))

    async def commits() -> None:
        for _ in range(20):
            await conn.commit()
            await trio.lowlevel.checkpoint()
            async with conn.transaction():
                await conn.execute("SELECT 1")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(executes, "x")
        nursery.start_soon(executes, "y")
        nursery.start_soon(cursors)
        nursery.start_soon(commits)
    assert errors == []


# -- the pooled block's exit ----------------------------------------------------------------------


async def test_leaving_a_block_with_its_stream_suspended(
    postgres_server: Server, name: str
) -> None:
    """``break`` out of ``async for row in stream`` keeps the generator (and psycopg's
    lock) alive while it is referenced: leaving the block must not wait for it forever
    (the contract: an ``ACTIVE`` connection is discarded and replaced)."""
    async with real_pool(postgres_server, name, min_size=1, max_size=2) as pool:
        stream: Any = None
        with trio.move_on_after(0.5) as bound:
            try:
                async with pool.connection() as conn:
                    conn.cancel_timeout = 0.2  # (the cleanup once cut short)
                    stream = conn.cursor().stream("SELECT generate_series(1, 100000)")
                    async for _ in stream:
                        break
            except psycopg.Error:
                pass  # refusing to commit is fair
        assert stream is not None
        await stream.aclose()
        async with pool.connection(timeout=2.0) as conn:  # the pool serves on
            await conn.execute("SELECT 1")
        assert not bound.cancelled_caught, "leaving the block hung"


async def test_leaving_a_block_with_its_stream_suspended_commits_nothing(
    postgres_server: Server, name: str
) -> None:
    """What leaving does then: the block's transaction cannot be committed (this task's
    own stream holds the connection), so nothing is, the block's exit says so with
    `psycopg.OperationalError`, and the connection is replaced."""
    table = f"tp_{name}_suspended"
    async with real_pool(postgres_server, name, min_size=1, max_size=1) as pool:
        async with pool.connection() as conn:
            pid = conn.info.backend_pid
        stream: Any = None
        with pytest.raises(psycopg.OperationalError, match="suspended"):
            async with pool.connection() as conn:
                await conn.execute(f"CREATE TABLE {table} ()")
                stream = conn.cursor().stream("SELECT generate_series(1, 100000)")
                async for _ in stream:
                    break
        await stream.aclose()
        async with pool.connection() as conn:
            assert conn.info.backend_pid != pid
            cur = await conn.execute(f"SELECT to_regclass('{table}') IS NULL")
            assert await cur.fetchone() == (True,)

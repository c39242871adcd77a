"""`Connection.execute` reuses the cursor it returned last when nobody holds it any more.

Reuse must never show: a cursor the caller still holds keeps its results, and one
given adapters or a row factory of its own is not handed out again as it is.
"""

from __future__ import annotations

import gc
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.string import TextLoader

import triopool

Conn = triopool.Connection[Any]


async def test_a_dropped_cursor_is_used_again(aconn: Conn) -> None:
    first = await aconn.execute("SELECT 1")
    first_id = id(first)
    del first
    second = await aconn.execute("SELECT 2")
    assert id(second) == first_id
    assert await second.fetchone() == (2,)


async def test_a_held_cursor_keeps_its_results(aconn: Conn) -> None:
    first = await aconn.execute("SELECT 'first'")
    second = await aconn.execute("SELECT 'second'")
    third = await aconn.execute("SELECT 'third'")
    assert first is not second and second is not third
    assert await first.fetchall() == [("first",)]
    assert await second.fetchall() == [("second",)]
    assert await third.fetchall() == [("third",)]


async def test_a_reused_cursor_is_as_new(aconn: Conn) -> None:
    cur = await aconn.execute("SELECT 1 AS one")
    cur.row_factory = dict_row  # the caller's own choice...
    cur.arraysize = 5
    del cur
    again = await aconn.execute("SELECT 1 AS one")
    assert await again.fetchone() == (1,)  # ...not the next caller's
    assert again.arraysize == 1 and again.format == psycopg.pq.Format.TEXT
    binary = await aconn.execute("SELECT 1", binary=True)
    assert binary.format == psycopg.pq.Format.BINARY


async def test_cursors_with_adapters_of_their_own_or_closed_are_not_reused(aconn: Conn) -> None:
    class Upper(TextLoader):
        def load(self, data: Any) -> str:
            return str(super().load(data)).upper()

    cur = await aconn.execute("SELECT 'a'")
    cur.adapters.register_loader("text", Upper)
    cur_id = id(cur)
    del cur
    gc.collect()
    other = await aconn.execute("SELECT 'b'::text")
    assert await other.fetchone() == ("b",)
    assert id(other) != cur_id
    await other.close()
    other_id = id(other)
    del other
    fresh = await aconn.execute("SELECT 'c'")
    assert id(fresh) != other_id and not fresh.closed


async def test_a_cursor_class_of_the_users_keeps_its_own_execute(aconn: Conn) -> None:
    """`execute` runs psycopg's generator itself only for psycopg's own `execute`."""
    calls: list[str] = []

    class CountingCursor(psycopg.AsyncCursor[Any]):
        async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
            calls.append(query)
            return await super().execute(query, params, **kwargs)

    aconn.cursor_factory = CountingCursor
    for _ in range(3):  # the first makes the spare cursor, the next ones reuse it
        cur = await aconn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)
        del cur
    assert calls == ["SELECT 1"] * 3


async def test_a_reused_cursor_reads_the_session_settings_as_they_are_now(aconn: Conn) -> None:
    """Loaders read the session's settings when made: the same query object, run again
    on the reused cursor after ``SET TIME ZONE`` from another cursor, loads the new zone
    (as a new cursor would; the old transformer would keep the old one)."""
    query = "SELECT '2020-01-01 12:00:00+00'::timestamptz"
    await aconn.execute("SET TIME ZONE 'UTC'")
    cur = await aconn.execute(query)
    first = await cur.fetchone()
    assert first is not None
    cur_id = id(cur)
    del cur
    async with aconn.cursor() as other:
        await other.execute("SET TIME ZONE 'Asia/Tokyo'")
    again = await aconn.execute(query)
    assert id(again) == cur_id  # the same cursor...
    second = await again.fetchone()
    assert second is not None
    assert first[0] == second[0]  # ...the same instant, in the session's new zone:
    assert str(first[0].tzinfo) == "UTC" and str(second[0].tzinfo) == "Asia/Tokyo"

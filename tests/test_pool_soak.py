"""Soak: many clients, random cancellations and timeouts, backends killed twice a second.

By default (CI) a short run: 50 tasks for 4 s.  ``TRIOPOOL_SOAK=long`` (``nox -s
soak``) runs 300 tasks for 20 s.  Either way: no connection is ever held by two
clients at once (`Clients` checks every hand-out), every request is accounted
for as served, timed out, cancelled or failed, and at the end nothing leaks
(the pool's books and the server's backends agree).  The totals are printed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import trio
from _fault_helpers import call_server, clients_running, settle
from _pool_checks import Server, app_name

import triopool

LONG = os.environ.get("TRIOPOOL_SOAK", "") == "long"


@dataclass(frozen=True)
class Soak:
    tasks: int
    seconds: float
    min_size: int
    max_size: int


SOAK = Soak(300, 20.0, 5, 20) if LONG else Soak(50, 4.0, 4, 10)
#: Backends terminated per second (as psycopg's tests do: pg_terminate_backend).
KILLS_PER_SECOND = 2


async def kill_backends(server: Server, name: str, killed: list[int]) -> None:
    """Terminate one of the pool's backends, at random, `KILLS_PER_SECOND` times a second."""
    while True:
        await trio.sleep(1 / KILLS_PER_SECOND)
        rows = await call_server(
            server.execute,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s ORDER BY random() LIMIT 1",
            (name,),
        )
        killed.append(len(rows))


@pytest.mark.slow
async def test_pool_soak(postgres_dsn: str, postgres_server: Server) -> None:
    """Random cancellations, timeouts and killed backends under load: no double lend,
    every request accounted for, no leak."""
    name = app_name("tp_soak")
    killed: list[int] = []
    async with triopool.open_pool(
        postgres_dsn,
        wait=True,
        min_size=SOAK.min_size,
        max_size=SOAK.max_size,
        timeout=0.5,
        kwargs={"application_name": name},
    ) as pool:
        load_options = {
            "count": SOAK.tasks,
            "timeout": 0.5,
            "query": "SELECT pg_sleep(0.002)",
            "chaos": 0.3,  # random cancel scope (0-50 ms) and timeout (10-500 ms)
            "manual": 0.3,  # getconn/putconn, returned in a transaction: rolled back
            "pause": 0.01,
            # For the query, and for cancelling a query cut by its scope on the server.
            "slack": 1.0,
        }
        async with clients_running(pool, **load_options) as load:
            async with trio.open_nursery() as chaos:
                chaos.start_soon(kill_backends, postgres_server, name, killed)
                await trio.sleep(SOAK.seconds)  # the soak's length: nothing to wait for
                chaos.cancel_scope.cancel()
        stats = pool.get_stats()
        await settle(pool, postgres_server, name)
    await settle(pool, postgres_server, name)

    outcomes = load.outcomes
    print(
        f"\n[soak] {SOAK.tasks} tasks, {SOAK.seconds:.0f} s: {outcomes.summary()};"
        f" {sum(killed)} backends killed; at most {load.max_held} connections held at once;"
        f" pool stats {stats}"
    )
    assert outcomes.accounted == outcomes.started
    # Cut short: by the chaos's cancel scopes for sure; by timeouts when the load makes
    # clients wait long enough (not every run: a faster pool times out fewer).
    assert outcomes.served > 0 and outcomes.cancelled + outcomes.timed_out > 0
    assert sum(killed) >= KILLS_PER_SECOND * SOAK.seconds * 0.5
    assert outcomes.failed > 0  # killed backends were in use: their clients saw it
    assert load.max_held <= SOAK.max_size
    load.assert_bounded()

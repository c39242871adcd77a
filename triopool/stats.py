"""What a pool reports about itself: `PoolStatus` and the stats keys."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ._policy import Counters

__all__ = ["Holder", "PoolStatus"]

# psycopg_pool's gauge keys (the counter keys are the fields of `Counters`).
POOL_MIN = "pool_min"
POOL_MAX = "pool_max"
POOL_SIZE = "pool_size"
POOL_AVAILABLE = "pool_available"
REQUESTS_WAITING = "requests_waiting"


@dataclass(frozen=True, slots=True)
class PoolStatus:
    """A snapshot of a pool's occupancy (as psqlpy's ``status()``).

    Attributes:
        max_size: the most connections the pool may hold (0: no limit).
        size: connections open, being opened or being closed.
        available: idle connections, ready to be handed out at once.
        waiting: clients queued for a connection.
    """

    max_size: int
    size: int
    available: int
    waiting: int


@dataclass(frozen=True, slots=True)
class Holder:
    """A task holding one of a pool's connections (see ``pool.holders()``).

    Attributes:
        task_name: the trio task's name.
        held_for: seconds since it got the connection.
    """

    task_name: str
    held_for: float


def stats_dict(status: PoolStatus, min_size: int, counters: Counters) -> dict[str, int]:
    """psycopg_pool's stats: the 5 gauges and the 10 counters, all present."""
    return {
        POOL_MIN: min_size,
        POOL_MAX: status.max_size,
        POOL_SIZE: status.size,
        POOL_AVAILABLE: status.available,
        REQUESTS_WAITING: status.waiting,
        **asdict(counters),
    }

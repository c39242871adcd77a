"""What a benchmark run measured, and the statistics drawn from it."""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)

#: One request: acquire, work, release; returns (seconds to acquire, seconds of work).
Request = Callable[[], Awaitable[tuple[float, float]]]


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    """p50/p90/p99/max of `samples_ms` (all 0.0 when empty)."""
    if not samples_ms:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(samples_ms)
    out = {}
    for p in PERCENTILES:
        index = min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))
        out[f"p{p}"] = ordered[index]
    out["max"] = ordered[-1]
    return out


class BenchFailed(Exception):
    """The run failed for a reason the user can act on: the message says it in one line."""


def one_line(error: BaseException) -> str:
    """`error`'s message on one line (libpq's messages span several)."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


@dataclass
class Settings:
    """What to run: the same for every stack compared."""

    dsn: str
    workload: str = "select1"
    clients: int = 100
    pool_min: int = 10
    pool_max: int = 10
    duration: float | None = 5.0
    queries: int | None = None
    warmup: float = 0.5

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        return cls(**json.loads(text))


@dataclass
class Result:
    """One run of one stack."""

    stack: str
    queries: int
    errors: int
    seconds: float
    acquire_ms: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    pool_stats: dict[str, int] = field(default_factory=dict)
    error_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def qps(self) -> float:
        return self.queries / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["qps"] = round(self.qps, 1)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        data = dict(data)
        data.pop("qps", None)
        return cls(**data)


def median_qps(results: list[Result]) -> float:
    return statistics.median(r.qps for r in results) if results else 0.0


class Tally:
    """The book of one run, whatever the event loop: what is left to do, what was seen.

    Start it when the clients start; each runs `client`; `result` when all ended.
    """

    def __init__(self, settings: Settings) -> None:
        self.acquire_ms: list[float] = []
        self.latency_ms: list[float] = []
        self.errors: Counter[str] = Counter()
        self._remaining = settings.queries
        self.started = time.perf_counter()
        self._deadline = math.inf if settings.duration is None else self.started + settings.duration

    def more(self) -> bool:
        """Whether another request is due (and count it)."""
        if self._remaining is not None:
            if self._remaining <= 0:
                return False
            self._remaining -= 1
        return time.perf_counter() < self._deadline

    async def client(self, request: Request) -> None:  # noqa: ASYNC910  # each request awaits
        """One client: `request` after `request` until the run is over."""
        while self.more():
            try:
                acquired, ran = await request()
            except Exception as ex:
                self.errors[type(ex).__name__] += 1
            else:
                self.acquire_ms.append(acquired * 1000)
                self.latency_ms.append(ran * 1000)

    def result(self) -> Result:
        """What the run measured (``stack`` is left for the caller to name)."""
        return Result(
            stack="",
            queries=len(self.latency_ms),
            errors=sum(self.errors.values()),
            seconds=time.perf_counter() - self.started,
            acquire_ms=percentiles(self.acquire_ms),
            latency_ms=percentiles(self.latency_ms),
            error_kinds=dict(self.errors),
        )

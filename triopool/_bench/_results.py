"""What a benchmark run measured, and the statistics drawn from it."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


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

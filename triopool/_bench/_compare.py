"""Side-by-side runs: each stack in its own process, interleaved over rounds."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable

from ._results import Result, Settings

TRIOPOOL = "triopool"


def available_stacks() -> list[str]:
    """The stacks this machine can run, triopool first."""

    def have(module: str) -> bool:
        return importlib.util.find_spec(module) is not None

    stacks = [TRIOPOOL]
    if have("psycopg_pool"):
        stacks.append("psycopg_pool")
        if have("uvloop"):
            stacks.append("psycopg_pool+uvloop")
    if have("asyncpg"):
        stacks.append("asyncpg+uvloop" if have("uvloop") else "asyncpg")
    return stacks


def run_in_process(stack: str, settings: Settings) -> Result:
    """Run one stack's workload in a fresh Python process."""
    completed = subprocess.run(
        [sys.executable, "-m", "triopool._bench.worker", stack, settings.to_json()],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{stack} worker failed:\n{completed.stderr[-2000:]}")
    return Result.from_dict(json.loads(completed.stdout.strip().splitlines()[-1]))


def compare(
    settings: Settings,
    stacks: list[str],
    rounds: int,
    on_result: Callable[[int, Result], None] | None = None,
) -> dict[str, list[Result]]:
    """Run every stack once per round, in rotating order, one process at a time."""
    results: dict[str, list[Result]] = {stack: [] for stack in stacks}
    for round_no in range(rounds):
        shift = round_no % len(stacks)
        for stack in stacks[shift:] + stacks[:shift]:
            result = run_in_process(stack, settings)
            results[stack].append(result)
            if on_result is not None:
                on_result(round_no, result)
    return results

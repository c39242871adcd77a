"""Side-by-side runs: each stack in its own process, interleaved over rounds."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable

from ._results import BenchFailed, Result, Settings

TRIOPOOL = "triopool"


def available_stacks() -> list[str]:
    """The stacks this machine can run, triopool first.

    psycopg_pool on asyncio (and on uvloop), and asyncpg on uvloop (or asyncio)
    twice: with its default reset and with a no-op one (see `triopool._bench._asyncio`).
    """
    from ._asyncio import DEFAULT_RESET, NO_RESET, stack_name

    def have(module: str) -> bool:
        return importlib.util.find_spec(module) is not None

    uvloop = have("uvloop")
    stacks = [TRIOPOOL]
    if have("psycopg_pool"):
        stacks.append(stack_name("psycopg_pool", uvloop=False))
        if uvloop:
            stacks.append(stack_name("psycopg_pool", uvloop=True))
    if have("asyncpg"):
        stacks += [stack_name("asyncpg", uvloop, reset) for reset in (DEFAULT_RESET, NO_RESET)]
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
        lines = completed.stderr.strip().splitlines() or ["no message"]
        raise BenchFailed(f"the {stack} run failed: {lines[-1]}")
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

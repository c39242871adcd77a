"""``python -m triopool._bench.worker STACK SETTINGS_JSON``: run one stack, print a JSON Result."""

from __future__ import annotations

import json
import sys

import trio

from ._results import Result, Settings
from ._workload import run_triopool


def main(argv: list[str]) -> None:
    stack, settings_json = argv
    settings = Settings.from_json(settings_json)
    result: Result
    if stack == "triopool":
        result = trio.run(run_triopool, settings)
    else:
        from ._asyncio import run

        result = run(stack, settings)
    print(json.dumps(result.to_dict()))


if __name__ == "__main__":
    main(sys.argv[1:])

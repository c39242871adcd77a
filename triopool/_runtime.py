"""A clear error when triopool is used outside a trio run."""

from __future__ import annotations

import trio


def require_trio(what: str) -> None:
    """Raise `RuntimeError` unless the calling code runs in a trio task.

    Without this, trio fails deep inside with errors such as
    ``AttributeError: 'RunContext' object has no attribute 'runner'``
    (under asyncio), which do not say what is wrong.
    """
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        raise RuntimeError(
            f"{what} needs trio: call it from code running under trio.run"
            " (for a web app: hypercorn --worker-class trio, or anyio's trio backend)."
            " From asyncio code inside a trio program, use triopool.aio.AsyncioPool"
            " under trio-asyncio."
        ) from None

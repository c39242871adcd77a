"""Keeping ExceptionGroups from reaching users of our ``async with`` blocks."""

from __future__ import annotations

import trio


def single_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception worth raising instead of `group`, if there is one.

    A lone exception (after dropping `trio.Cancelled` when there is something
    else) is returned, so ``except PoolTimeout`` works around a pool's block;
    if every leaf is a `trio.Cancelled`, the first is returned so that the
    cancel scope it belongs to catches it.  None when several real errors
    happened together: then the group is the truth.
    """
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        else:
            leaves.append(exc)

    collect(group)
    others = [exc for exc in leaves if not isinstance(exc, trio.Cancelled)]
    if len(others) == 1:
        return others[0]
    if not others:
        return leaves[0]
    return None

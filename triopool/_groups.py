"""Keeping ExceptionGroups from reaching users of our ``async with`` blocks."""

from __future__ import annotations

from typing import NoReturn

import trio

from .errors import PoolClosed


def raise_from_group(
    group: BaseExceptionGroup[BaseException], body: BaseException | None = None
) -> NoReturn:
    """Raise what `group`, from a nursery of ours, stands for.

    Only the group the nursery made is unwrapped, one level: its children
    are the exception of the ``async with`` block (`body`), if any, and those
    of the pool's own tasks (each of which unwrapped its own nursery's group
    the same way).  A user's own `ExceptionGroup` is a child like any other
    exception and comes out unchanged.

    * One child but `trio.Cancelled` ones: that child.
    * Only `trio.Cancelled` children: the first, so its cancel scope catches it.
    * The block failed with `PoolClosed` (or was cancelled) because the pool's
      own task failed: the pool's failure, which is the cause.
    * Otherwise the group is the truth: it is raised.
    """
    children = [exc for exc in group.exceptions if not isinstance(exc, trio.Cancelled)]
    if not children:
        _reraise(group.exceptions[0])
    if len(children) == 1:
        child = children[0]
        # A cancelled nursery scope strips Cancelled with ``split()``, which copies
        # the groups it goes through: give the block's own group back, not a copy.
        if isinstance(body, BaseExceptionGroup) and _leaves(child) == _leaves(body):
            _reraise(body)
        _reraise(child)
    own = [exc for exc in children if exc is not body]
    if isinstance(body, PoolClosed) and len(own) == 1:
        raise own[0] from body
    raise group


def _leaves(exc: BaseException) -> list[int]:
    """The identities of the exceptions in `exc`, depth first."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [id(exc)]


def _reraise(exc: BaseException) -> NoReturn:
    """Raise `exc` as it was: raising it here must not chain the group to it."""
    context, suppress = exc.__context__, exc.__suppress_context__
    try:
        raise exc
    finally:
        exc.__context__, exc.__suppress_context__ = context, suppress

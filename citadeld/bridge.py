"""The only sanctioned way for the event loop to wait on an actor.

pykka's `Future.__await__` calls the blocking `get()`, which would stall every request; so work
messages carry a `concurrent.futures.Future` that the actor resolves, and the loop awaits it
through `asyncio.wrap_future` with a timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, TypeVar

T = TypeVar("T")


def new_reply() -> concurrent.futures.Future[Any]:
    return concurrent.futures.Future()


async def wait_reply(cf: concurrent.futures.Future[T], limit: float | None) -> T:
    """Await an actor's reply without blocking the loop; cancels the future on timeout so the
    actor can tell that nobody waits any more."""
    return await asyncio.wait_for(asyncio.wrap_future(cf), limit)


def resolve(cf: concurrent.futures.Future[T], result: T) -> None:
    """Set a result unless the waiter already gave up (cancelled or timed out)."""
    if not cf.done():
        try:
            cf.set_result(result)
        except concurrent.futures.InvalidStateError:
            pass


def reject(cf: concurrent.futures.Future[Any], exc: BaseException) -> None:
    if not cf.done():
        try:
            cf.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass

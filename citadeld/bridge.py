"""Settling the `concurrent.futures.Future` a work message carries.

pykka's `Future.__await__` calls the blocking `get()`, which would stall every request; so work
messages carry a `concurrent.futures.Future` that the actor resolves and the loop awaits through
`asyncio.wrap_future`. The waiter may have given up (cancelled, timed out) by the time the actor
answers: these helpers make a late answer a no-op instead of an error in the actor.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, TypeVar

T = TypeVar("T")


def resolve(cf: concurrent.futures.Future[T], result: T) -> None:
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


def fail_queued(actor: Any, work: Any, kind: type[Any], exc: BaseException) -> None:
    """On an actor's crash, reject the future of the `kind` message in hand (`work`) and of every
    `kind` message still in its inbox: pykka drops unprocessed ``tell`` messages silently, which
    would leave their callers waiting. Other envelopes (pykka's own ``ask``s, e.g. pings) go
    back to the inbox for pykka's teardown to answer."""
    if isinstance(work, kind):
        reject(work.future, exc)
    others = []
    inbox = actor.actor_inbox
    while not inbox.empty():
        envelope = inbox.get()
        msg: Any = envelope.message
        if isinstance(msg, kind):
            reject(msg.future, exc)
        else:
            others.append(envelope)
    for envelope in others:
        inbox.put(envelope)


def claim(fut: concurrent.futures.Future[Any]) -> bool:
    """Mark the reply running so the caller can no longer cancel it; False when it already
    did (or it is resolved), in which case the batch is not worth a backend call."""
    if fut.done():
        return False
    try:
        return fut.set_running_or_notify_cancel()
    except RuntimeError:  # already running: someone else claimed it; still ours to answer
        return not fut.done()

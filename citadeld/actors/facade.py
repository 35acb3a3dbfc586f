"""The loop-side half every supervised service actor shares: which actor serves now, and
failing the callers of a dead one at once.

The supervisor hands each (re)started actor to ``set_actor_ref`` and reports deaths to
``actor_died`` (ChildSpec.on_started / on_died). Requests carry a concurrent future that the
facade tracks while it is in flight, so a death rejects them immediately instead of leaving
callers to their timeouts (ARCHITECTURE.md rule 4). Tests and tools without a supervisor run an
actor of their own (``owned``), which the facade then also stops.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from typing import Any

import pykka

from citadeld.bridge import reject


class ActorFacade:
    #: used in error messages: "<label> replaced", "<label> died: ..."
    label = "actor"

    def __init__(self) -> None:
        self._actor: pykka.ActorRef[Any] | None = None
        self._owned = False
        self._inflight: set[concurrent.futures.Future[Any]] = set()

    def died_error(self, exc: BaseException | None) -> BaseException:
        """What callers in flight get when the actor dies (subclasses: their Unavailable)."""
        return exc or pykka.ActorDeadError(f"{self.label} stopped")

    def start_actor(self) -> pykka.ActorRef[Any]:
        """An unsupervised actor for tests and tools."""
        raise NotImplementedError

    def set_actor_ref(self, ref: pykka.ActorRef[Any] | None, *, owned: bool = False) -> None:
        """Swap in a (restarted) actor; requests in flight to the old one fail now."""
        old, self._actor, was_owned, self._owned = self._actor, ref, self._owned, owned
        if old is not None and old is not ref:
            self.actor_died(pykka.ActorDeadError(f"{self.label} replaced"))
            if was_owned:
                old.stop(block=False)

    def actor_died(self, exc: BaseException | None = None) -> None:
        """ChildSpec.on_died: fail outstanding requests at once instead of at their timeout."""
        err = self.died_error(exc)
        for cf in list(self._inflight):
            reject(cf, err)

    def start_unsupervised(self) -> None:
        self.set_actor_ref(self.start_actor(), owned=True)

    async def release_actor(self, wait_s: float | None = None) -> None:
        """At close: stop the actor if we started it (waiting up to `wait_s` when given, e.g.
        for a directory lock that goes with it), and forget it."""
        ref, owned = self._actor, self._owned
        self._actor, self._owned = None, False
        if not owned or ref is None:
            return
        if wait_s is None:
            ref.stop(block=False)
            return
        with contextlib.suppress(Exception):
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: ref.stop(block=True, timeout=wait_s))

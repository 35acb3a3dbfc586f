"""EmbedderActor: one backend slot (an endpoint, or the in-process model) executing whole batches.

Replies travel in `concurrent.futures.Future`s carried by the messages, so the event loop awaits
them with `asyncio.wrap_future` and never blocks on pykka. A backend failure (`BackendError`)
is an answer, not a crash; any other exception is a bug: the caller gets it at once and the
actor crashes so the supervisor restarts it with a fresh backend.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from citadeld.actors.backends.base import BatchResult, EmbeddingBackend
from citadeld.bridge import claim, reject, resolve
from citadeld.errors import BackendError
from citadeld.supervision import ChildLink, SupervisedActor

log = logging.getLogger("citadeld.embedder")


@dataclass(eq=False)
class EmbedBatch:
    """One batch, formed by the pool; `reply` gets the BatchResult or the whole call's error."""

    texts: list[str]
    truncate: bool
    reply: concurrent.futures.Future[BatchResult]
    batch_id: int


@dataclass(eq=False)
class Probe:
    """Liveness of the upstream (not of the actor: that is the supervisor's Ping)."""

    reply: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)


@dataclass(frozen=True)
class Warm:
    """Best-effort model load upstream; failures are logged, never raised."""


class EmbedderActor(SupervisedActor):
    """Owns one backend instance; handles one message at a time in its own thread."""

    def __init__(
        self,
        backend_factory: Callable[[], EmbeddingBackend],
        *,
        warm_on_start: bool = True,
        link: ChildLink | None = None,
    ) -> None:
        super().__init__(link=link)
        self._factory = backend_factory
        self._warm_on_start = warm_on_start
        self.backend: EmbeddingBackend | None = None

    def on_start_supervised(self) -> None:
        # Construction must not contact the upstream: an outage at start is not a crash.
        self.backend = self._factory()
        if self._warm_on_start:
            self.actor_ref.tell(Warm())  # after start, ahead of any batch in the inbox

    def on_receive_supervised(self, message: Any) -> Any:
        if isinstance(message, EmbedBatch):
            self._embed(message)
        elif isinstance(message, Probe):
            self._probe(message)
        elif isinstance(message, Warm):
            self._warm()
        else:
            return super().on_receive_supervised(message)
        return None

    def _backend(self) -> EmbeddingBackend:
        if self.backend is None:
            raise RuntimeError("embedder backend is not started")
        return self.backend

    def _embed(self, msg: EmbedBatch) -> None:
        self.current_work = msg
        if not claim(msg.reply):
            log.debug("batch %d dropped: its caller went away", msg.batch_id)
            return
        started = time.monotonic()
        try:
            result = self._backend().embed(msg.texts, msg.truncate)
            if len(result.tokens) != len(msg.texts) or result.vectors.shape[0] != len(msg.texts):
                raise RuntimeError(
                    f"backend returned {result.vectors.shape[0]} rows for {len(msg.texts)} texts"
                )
        except BackendError as exc:
            exc.endpoint = exc.endpoint or self._backend().name
            log.info(
                "batch %d (%d items) failed on %s: %s (%s)",
                msg.batch_id,
                len(msg.texts),
                exc.endpoint,
                exc.message,
                exc.kind,
            )
            reject(msg.reply, exc)
        except Exception as exc:
            reject(msg.reply, exc)
            raise  # a bug: crash, so the supervisor restarts us with a fresh backend
        else:
            log.debug(
                "batch %d: %d items in %.1f ms, %d item errors",
                msg.batch_id,
                len(msg.texts),
                (time.monotonic() - started) * 1e3,
                len(result.errors),
            )
            result.backend_s = time.monotonic() - started
            resolve(msg.reply, result)

    def _probe(self, msg: Probe) -> None:
        self.current_work = msg
        if not claim(msg.reply):
            return
        try:
            self._backend().probe()
        except BackendError as exc:
            reject(msg.reply, exc)
        except Exception as exc:
            reject(msg.reply, exc)
            raise
        else:
            resolve(msg.reply, None)

    def _warm(self) -> None:
        backend = self.backend
        if backend is None:
            return
        try:
            backend.warm()
        except Exception as exc:  # best effort: the first batch will tell the real story
            log.info("warming %s failed: %r", backend.name, exc)
        else:
            log.debug("warmed %s", backend.name)

    def fail_in_hand(self, exc: BaseException) -> None:
        work = self.current_work
        if isinstance(work, EmbedBatch | Probe):
            endpoint = self.backend.name if self.backend is not None else None
            reject(
                work.reply,
                BackendError(f"embedder actor died: {exc!r}", kind="died", endpoint=endpoint),
            )

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        super().on_failure(exception_type, exception_value, traceback)
        self._close()

    def on_stop(self) -> None:
        self._close()
        super().on_stop()

    def _close(self) -> None:
        backend, self.backend = self.backend, None
        if backend is not None:
            try:
                backend.close()
            except Exception:
                log.exception("closing backend %s failed", backend.name)

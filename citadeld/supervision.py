"""OTP-style supervision for pykka actors.

pykka restarts nothing: an exception in a ``tell`` handler stops the actor for good, one in
``on_start`` stops it silently. Workers derive from SupervisedActor, which reports its death
through a ChildLink; a Supervisor replaces it after a jittered backoff, up to a restart
intensity past which it escalates (at the root the daemon exits non-zero for systemd).
A Supervisor is one daemon thread processing jobs serially; its public methods only enqueue.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import pykka

log = logging.getLogger("citadeld.supervision")

Restart = Literal["permanent", "transient", "temporary"]
Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
ChildState = Literal["running", "restarting", "stopped", "failed"]
Job = Callable[[], None]


@dataclass(frozen=True)
class Ping:
    """Liveness probe (ask); answered after any message in hand, so a wedged handler times out."""


class ChildHung(RuntimeError):
    """The child did not answer Ping in time; its thread is abandoned and replaced."""


class SupervisorEscalated(RuntimeError):
    """A nested supervisor gave up; its parent handles that like the child crashing."""


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter in [0, min(cap, base * 2**attempt)]: children that died together (a shared
    backend went away) must not restart in lockstep; the cap bounds the wait after recovery."""
    return rng.uniform(0.0, min(cap, base * 2.0 ** min(attempt, 32)))


@dataclass(frozen=True)
class ChildLink:
    """Given to one child instance; reports carry its incarnation so late ones are ignored."""

    name: str
    incarnation: int
    _sink: Callable[[str, int, BaseException | None], None] = field(repr=False, compare=False)

    def failed(self, exc: BaseException) -> None:
        """Abnormal death (crash, failed start, hang). Thread-safe, never blocks."""
        self._sink(self.name, self.incarnation, exc)

    def exited(self) -> None:
        """Normal exit; ignored when the supervisor itself stopped the child."""
        self._sink(self.name, self.incarnation, None)


class SupervisedActor(pykka.ThreadingActor):
    """Base for every worker: reports its death to its supervisor and answers Ping.

    Subclasses implement ``on_start_supervised``/``on_receive_supervised`` and set
    ``current_work`` while handling a message, so a crash fails it instead of orphaning it.
    """

    use_daemon_thread = True  # a wedged handler must not block process exit

    def __init__(self, *, link: ChildLink | None = None) -> None:
        super().__init__()
        self.link = link
        self.current_work: Any = None

    def on_start(self) -> None:
        # pykka stops an actor whose on_start raises without calling on_failure: report here.
        try:
            self.on_start_supervised()
        except Exception as exc:
            if self.link is not None:
                self.link.failed(exc)
            raise

    def on_start_supervised(self) -> None:
        """Setup in the actor's thread; raising counts as a crash (restarted with backoff)."""

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Ping):
            return True
        self.current_work = None
        result = self.on_receive_supervised(message)
        self.current_work = None
        return result

    def on_receive_supervised(self, message: Any) -> Any:
        return super().on_receive(message)

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        exc = exception_value if exception_value is not None else RuntimeError("actor failed")
        try:
            self.fail_in_hand(exc)
        except Exception:
            log.exception("fail_in_hand raised", extra={"actor": str(self)})
        self.current_work = None
        if self.link is not None:
            self.link.failed(exc)

    def on_stop(self) -> None:
        """Subclasses overriding this must call ``super().on_stop()``."""
        if self.link is not None:
            self.link.exited()

    def fail_in_hand(self, exc: BaseException) -> None:
        """Fail the work being processed at the crash; by default ``current_work`` as a Future."""
        work = self.current_work
        if isinstance(work, Future):
            with contextlib.suppress(InvalidStateError):
                work.set_exception(exc)


@dataclass
class ChildSpec:
    """How to (re)start one child and whom to tell about its lifecycle."""

    name: str
    start: Callable[[ChildLink], pykka.ActorRef[Any]]
    on_started: Callable[[pykka.ActorRef[Any]], None] | None = None
    on_died: Callable[[BaseException | None], None] | None = None
    restart: Restart = "permanent"
    ping_interval: float | None = None
    ping_timeout: float = 2.0
    shutdown_timeout: float = 5.0
    nested: Supervisor | None = field(default=None, repr=False)  # set by as_child_spec


@dataclass(eq=False)
class _Child:
    spec: ChildSpec
    state: ChildState = "stopped"
    incarnation: int = 0
    ref: pykka.ActorRef[Any] | None = None
    restarts: int = 0
    last_failure: str | None = None
    started_at: float | None = None
    token: int = 0  # identifies the pending scheduled restart
    recent: deque[float] = field(default_factory=deque)  # this child's restarts (backoff)


class Supervisor:
    """Restarts its children per strategy, with backoff and a restart intensity limit."""

    def __init__(
        self,
        name: str,
        children: Sequence[ChildSpec],
        *,
        strategy: Strategy = "one_for_one",
        max_restarts: int = 5,
        period: float = 30.0,
        backoff_min: float = 0.1,
        backoff_max: float = 5.0,
        on_escalate: Callable[[str], None] | None = None,
        on_restart: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        names = [spec.name for spec in children]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate child names in supervisor {name!r}: {names}")
        self.name, self.strategy = name, strategy
        self.max_restarts, self.period = max_restarts, period
        self.backoff_min, self.backoff_max = backoff_min, backoff_max
        self.on_escalate, self.on_restart = on_escalate, on_restart
        self._rng = rng or random.Random()
        self._children = [_Child(spec) for spec in children]
        self._by_name = {child.spec.name: child for child in self._children}
        self._lock = threading.Lock()  # guards child fields (snapshot), _thread and submission
        self._inbox: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._timers: list[tuple[float, int, Job]] = []  # supervisor thread only
        self._seq = itertools.count(1)
        self._state: Literal["stopped", "running", "escalated"] = "stopped"
        self._restart_times: deque[float] = deque()
        self._link: ChildLink | None = None  # set when running as a child of another supervisor

    @property
    def state(self) -> str:
        return self._state

    def start(self) -> Future[None]:
        """Start the children in order; resolves once all were spawned (not necessarily up)."""
        fut: Future[None] = Future()
        self._submit(lambda: self._do_start(fut))
        return fut

    def stop(self) -> Future[None]:
        """Stop the children in reverse order without restarting them; resolves when quiet."""
        fut: Future[None] = Future()
        self._submit(lambda: self._do_stop(fut))
        return fut

    def snapshot(self) -> list[dict[str, Any]]:
        """Per-child state for /health, metrics and the admin socket."""
        keys = ("state", "restarts", "last_failure", "incarnation", "started_at")
        with self._lock:
            rows = [
                {"name": c.spec.name} | {k: getattr(c, k) for k in keys} for c in self._children
            ]
        for row, child in zip(rows, self._children, strict=True):
            inbox: Any = child.ref.actor_inbox if child.ref is not None else None
            row["mailbox"] = inbox.qsize() if inbox is not None else None
            if child.spec.nested is not None:
                row["children"] = child.spec.nested.snapshot()
        return rows

    def probe(self) -> Future[None]:
        """Resolves once this supervisor's thread, and those of nested ones, ran a no-op job:
        the systemd watchdog's proof that supervision is not wedged."""
        fut: Future[None] = Future()

        def job() -> None:
            nested = [c.spec.nested.probe() for c in self._children if c.spec.nested]
            pending, lock = [len(nested)], threading.Lock()

            def one_done(_: Future[None]) -> None:
                with lock:  # callbacks run in the nested supervisors' threads
                    pending[0] -= 1
                    if pending[0] == 0:
                        fut.set_result(None)

            if not nested:
                fut.set_result(None)
            for f in nested:
                f.add_done_callback(one_done)

        self._submit(job)
        return fut

    def as_child_spec(
        self,
        *,
        restart: Restart = "permanent",
        shutdown_timeout: float | None = None,
        on_died: Callable[[BaseException | None], None] | None = None,
    ) -> ChildSpec:
        """Make this supervisor a child of another: its escalation becomes a child failure."""
        timeout = shutdown_timeout
        if timeout is None:  # enough for the nested children to stop one after another
            timeout = sum(c.spec.shutdown_timeout for c in self._children) + 1.0

        def start(link: ChildLink) -> pykka.ActorRef[Any]:
            return _NestedSupervisor.start(self, timeout, link=link)

        return ChildSpec(
            self.name, start, None, on_died, restart, shutdown_timeout=timeout, nested=self
        )

    def _submit(self, job: Job) -> None:
        with self._lock:
            self._inbox.put(job)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name=f"supervisor-{self.name}", daemon=True
                )
                self._thread.start()

    def _schedule(self, delay: float, job: Job) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), job))

    def _loop(self) -> None:
        while True:
            timeout = max(0.0, self._timers[0][0] - time.monotonic()) if self._timers else None
            try:
                self._run(self._inbox.get(timeout=timeout))
            except queue.Empty:
                pass
            while self._timers and self._timers[0][0] <= time.monotonic():
                self._run(heapq.heappop(self._timers)[2])
            with self._lock:  # idle and not running: let the thread go (_submit respawns it)
                if self._state != "running" and not self._timers and self._inbox.empty():
                    self._thread = None
                    return

    def _run(self, job: Job) -> None:
        try:
            job()
        except Exception:
            log.exception("supervisor job failed", extra={"supervisor": self.name})

    def _call(self, callback: Callable[..., None] | None, *args: Any) -> None:
        if callback is not None:  # a bad callback must not take the supervisor down
            self._run(lambda: callback(*args))

    def _set(self, child: _Child, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(child, key, value)

    def _do_start(self, fut: Future[None], link: ChildLink | None = None) -> None:
        self._link = link or self._link
        if self._state != "running":
            self._state = "running"
            self._restart_times.clear()
            for child in self._children:
                child.recent.clear()
                self._start_child(child)
        fut.set_result(None)

    def _do_stop(self, fut: Future[None]) -> None:
        self._state = "stopped"
        self._timers.clear()
        for child in reversed(self._children):
            if child.state == "running":
                self._stop_child(child, "stopped")
            elif child.state == "restarting":
                self._set(child, state="stopped")
        self._submit(lambda: fut.set_result(None))  # after the exit reports just queued

    def _start_child(self, child: _Child) -> None:
        inc = child.incarnation + 1
        link = ChildLink(child.spec.name, inc, self._report)
        self._set(child, incarnation=inc, state="running", ref=None, started_at=time.time())
        try:
            ref = child.spec.start(link)
        except Exception as exc:
            self._report(child.spec.name, inc, exc)  # handled like any crash, with backoff
            return
        self._set(child, ref=ref)
        self._call(child.spec.on_started, ref)
        interval = child.spec.ping_interval
        if interval is not None:
            self._schedule(interval, lambda: self._ping(child, inc))

    def _stop_child(self, child: _Child, state: ChildState) -> None:
        self._set(child, state=state)  # first, so the child's exit report is ignored
        ref = child.ref
        if ref is None:
            return
        try:
            ref.stop(block=True, timeout=child.spec.shutdown_timeout)
        except pykka.Timeout:
            extra = {"supervisor": self.name, "child": child.spec.name}
            log.warning("child did not stop in time; abandoned", extra=extra)
            pykka.ActorRegistry.unregister(ref)
            self._call(child.spec.on_died, TimeoutError(f"{child.spec.name} did not stop"))

    def _report(self, name: str, incarnation: int, exc: BaseException | None) -> None:
        self._submit(lambda: self._on_report(name, incarnation, exc))

    def _live(self, child: _Child, incarnation: int) -> bool:
        """Whether a report or timer about this incarnation still matters."""
        return self._state == child.state == "running" and child.incarnation == incarnation

    def _on_report(self, name: str, incarnation: int, exc: BaseException | None) -> None:
        child = self._by_name[name]
        if self._live(child, incarnation):
            self._child_down(child, exc)
        else:
            extra = {"supervisor": self.name, "child": name, "incarnation": incarnation}
            log.debug("ignoring stale report", extra=extra)

    def _child_down(self, child: _Child, exc: BaseException | None, abandon: bool = False) -> None:
        spec = child.spec
        restart = spec.restart == "permanent" or (spec.restart == "transient" and exc is not None)
        state: ChildState = "restarting" if restart else "stopped" if exc is None else "failed"
        extra = {"supervisor": self.name, "child": spec.name, "incarnation": child.incarnation}
        log.log(
            logging.WARNING if exc is not None else logging.INFO,
            "child died" if exc is not None else "child exited",
            extra={**extra, "error": repr(exc), "restart": restart},
        )
        self._set(child, state=state, last_failure=repr(exc) if exc else child.last_failure)
        if child.ref is not None:
            child.ref.stop(block=False)  # no-op if dead; a hung one stops if it ever wakes
            if abandon:
                pykka.ActorRegistry.unregister(child.ref)  # don't let stop_all wait on it
        self._call(spec.on_died, exc)  # fail the facade's outstanding requests now
        if not restart:
            return
        now = time.monotonic()
        self._restart_times.append(now)
        for times in (self._restart_times, child.recent):
            while times and times[0] < now - self.period:
                times.popleft()
        if len(self._restart_times) > self.max_restarts:
            self._escalate(
                f"supervisor {self.name}: more than {self.max_restarts} restarts in "
                f"{self.period}s (last: {spec.name}: {exc!r})"
            )
            return
        delay = backoff_delay(len(child.recent), self.backoff_min, self.backoff_max, self._rng)
        child.recent.append(now)
        group = self._affected(child)
        for other in reversed(group):
            if other is not child and other.state == "running":
                self._stop_child(other, "restarting")
        token = next(self._seq)
        for member in group:
            self._set(member, state="restarting", token=token)
        log.info("restart scheduled", extra={**extra, "delay_s": round(delay, 3)})
        self._schedule(delay, lambda: self._restart(group, token))

    def _affected(self, child: _Child) -> list[_Child]:
        if self.strategy == "one_for_one":
            return [child]
        pool = self._children
        if self.strategy == "rest_for_one":
            pool = pool[pool.index(child) :]
        return [c for c in pool if c is child or c.state in ("running", "restarting")]

    def _restart(self, group: list[_Child], token: int) -> None:
        if self._state != "running":
            return
        for child in group:
            if child.state == "restarting" and child.token == token:
                self._set(child, restarts=child.restarts + 1)
                self._call(self.on_restart, child.spec.name)
                self._start_child(child)

    def _escalate(self, reason: str) -> None:
        log.error("restart intensity exceeded", extra={"supervisor": self.name, "reason": reason})
        self._state = "escalated"
        self._timers.clear()
        for child in reversed(self._children):
            if child.state == "running":
                self._stop_child(child, "stopped")
            elif child.state == "restarting":
                self._set(child, state="failed")
        if self._link is not None:
            self._link.failed(SupervisorEscalated(reason))
        else:
            self._call(self.on_escalate, reason)

    def _ping(self, child: _Child, inc: int) -> None:
        if not self._live(child, inc) or child.ref is None:
            return
        answer = child.ref.ask(Ping(), block=False)
        self._schedule(child.spec.ping_timeout, lambda: self._check_ping(child, inc, answer))

    def _check_ping(self, child: _Child, inc: int, answer: pykka.Future[Any]) -> None:
        if not self._live(child, inc):
            return
        try:
            answer.get(timeout=0)
        except pykka.Timeout:
            timeout = child.spec.ping_timeout
            hung = ChildHung(f"{child.spec.name} did not answer Ping within {timeout}s")
            self._child_down(child, hung, abandon=True)
            return
        except Exception as exc:  # dead: queue behind the death report it sent, if any
            self._report(child.spec.name, inc, exc)
            return
        assert child.spec.ping_interval is not None
        self._schedule(child.spec.ping_interval, lambda: self._ping(child, inc))

    def _attach(self, link: ChildLink) -> None:
        self._submit(lambda: self._do_start(Future(), link))

    def _detach(self, link: ChildLink) -> Future[None]:
        fut: Future[None] = Future()
        # A late detach from a replaced _NestedSupervisor must not stop the new incarnation.
        self._submit(lambda: self._do_stop(fut) if self._link is link else fut.set_result(None))
        return fut


class _NestedSupervisor(SupervisedActor):
    """Stands for a nested Supervisor in its parent, which supervises actor refs."""

    def __init__(self, sup: Supervisor, timeout: float, *, link: ChildLink | None = None) -> None:
        super().__init__(link=link)
        self._sup = sup
        self._timeout = timeout

    def on_start_supervised(self) -> None:
        if self.link is not None:
            self._sup._attach(self.link)

    def on_stop(self) -> None:
        if self.link is not None:
            with contextlib.suppress(TimeoutError):
                self._sup._detach(self.link).result(timeout=self._timeout)
        super().on_stop()

"""Supervision with real pykka actors: restarts, intensity, escalation, watchdog, nesting."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pykka
import pytest

from citadeld.supervision import (
    ChildHung,
    ChildLink,
    ChildSpec,
    Ping,
    SupervisedActor,
    Supervisor,
    SupervisorEscalated,
    backoff_delay,
)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


@dataclass(frozen=True)
class Crash:
    pass


@dataclass(frozen=True)
class Work:
    future: Future[str]
    fail: bool = False


@dataclass(frozen=True)
class Block:
    event: threading.Event


@dataclass(frozen=True)
class Exit:
    pass


class Worker(SupervisedActor):
    def __init__(
        self, name: str, journal: list[tuple[str, str]], fail_start: bool, *, link: ChildLink
    ) -> None:
        super().__init__(link=link)
        self.name = name
        self.journal = journal
        self.fail_start = fail_start

    def on_start_supervised(self) -> None:
        self.journal.append(("start", self.name))
        if self.fail_start:
            raise RuntimeError(f"{self.name} start failed")

    def on_receive_supervised(self, message: Any) -> Any:
        if isinstance(message, Work):
            self.current_work = message.future
            if message.fail:
                raise RuntimeError("boom")
            message.future.set_result(self.name)
        elif isinstance(message, Crash):
            raise RuntimeError("boom")
        elif isinstance(message, Block):
            message.event.wait()
        elif isinstance(message, Exit):
            self.stop()
        return None

    def on_stop(self) -> None:
        self.journal.append(("stop", self.name))
        super().on_stop()


class Probe:
    """One child: starts Workers and records what the supervisor told the facade."""

    def __init__(self, name: str, journal: list[tuple[str, str]], fail_starts: int = 0) -> None:
        self.name = name
        self.journal = journal
        self.fail_starts = fail_starts  # -1: always
        self.links: list[ChildLink] = []
        self.start_times: list[float] = []
        self.refs: list[pykka.ActorRef[Any]] = []
        self.died: list[BaseException | None] = []

    def start(self, link: ChildLink) -> pykka.ActorRef[Any]:
        self.links.append(link)
        self.start_times.append(time.monotonic())
        fail = self.fail_starts != 0
        if self.fail_starts > 0:
            self.fail_starts -= 1
        return Worker.start(self.name, self.journal, fail, link=link)

    def spec(self, **kwargs: Any) -> ChildSpec:
        return ChildSpec(
            self.name,
            self.start,
            on_started=self.refs.append,
            on_died=self.died.append,
            shutdown_timeout=2.0,
            **kwargs,
        )

    @property
    def ref(self) -> pykka.ActorRef[Any]:
        return self.refs[-1]


def started(probe: Probe, times: int) -> Callable[[], bool]:
    return lambda: len(probe.refs) == times and probe.ref.is_alive()


class MaxRandom(random.Random):
    """Deterministic 'jitter': always the upper bound, so backoff delays are observable."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Harness:
    def __init__(self) -> None:
        self.supervisors: list[Supervisor] = []
        self.events: list[threading.Event] = []
        self.escalations: list[str] = []
        self.restarts: list[str] = []
        self.journal: list[tuple[str, str]] = []

    def probe(self, name: str, fail_starts: int = 0) -> Probe:
        return Probe(name, self.journal, fail_starts)

    def sup(self, name: str, children: list[ChildSpec], **kwargs: Any) -> Supervisor:
        options: dict[str, Any] = {
            "max_restarts": 5,
            "period": 5.0,
            "backoff_min": 0.001,
            "backoff_max": 0.005,
            "on_escalate": self.escalations.append,
            "on_restart": self.restarts.append,
            "rng": random.Random(1),
        }
        options.update(kwargs)
        sup = Supervisor(name, children, **options)
        self.supervisors.append(sup)
        return sup

    def event(self) -> threading.Event:
        self.events.append(threading.Event())
        return self.events[-1]

    def row(self, sup: Supervisor, name: str) -> dict[str, Any]:
        return next(r for r in sup.snapshot() if r["name"] == name)


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    for event in harness.events:
        event.set()
    for sup in reversed(harness.supervisors):
        sup.stop().result(timeout=5)
    pykka.ActorRegistry.stop_all()


def test_crashed_child_is_replaced_and_facade_told(h: Harness) -> None:
    a = h.probe("a")
    sup = h.sup("root", [a.spec()], backoff_min=0.3, backoff_max=0.3, rng=MaxRandom())
    sup.start().result(timeout=2)
    wait_for(lambda: len(a.refs) == 1, "first start")
    old = a.ref
    work: Future[str] = Future()
    old.tell(Work(work, fail=True))

    with pytest.raises(RuntimeError, match="boom"):
        work.result(timeout=2)  # the work in hand is failed, not left hanging
    wait_for(lambda: len(a.died) == 1, "on_died")
    assert len(a.refs) == 1, "on_died must come before the (0.3 s) backoff, not after"
    assert isinstance(a.died[0], RuntimeError)

    wait_for(lambda: len(a.refs) == 2, "restart")
    assert a.ref is not old and a.ref.is_alive() and not old.is_alive()
    ok: Future[str] = Future()
    a.ref.tell(Work(ok))
    assert ok.result(timeout=2) == "a"
    row = h.row(sup, "a")
    assert row["state"] == "running" and row["restarts"] == 1 and row["incarnation"] == 2
    assert "boom" in row["last_failure"] and row["started_at"] is not None
    assert h.restarts == ["a"] and h.escalations == []


def test_intensity_exceeded_stops_in_reverse_order_and_escalates(h: Harness) -> None:
    a, b, c = h.probe("a"), h.probe("b"), h.probe("c")
    sup = h.sup("root", [a.spec(), b.spec(), c.spec()], max_restarts=2)
    sup.start().result(timeout=2)
    for crash in range(3):
        wait_for(started(a, crash + 1), "a running")
        a.ref.tell(Crash())

    wait_for(lambda: len(h.escalations) == 1, "escalation")
    assert "more than 2 restarts" in h.escalations[0]
    assert [e for e in h.journal if e[0] == "stop"] == [("stop", "c"), ("stop", "b")]
    assert len(a.refs) == 3 and not any(p.ref.is_alive() for p in (a, b, c))
    assert [r["state"] for r in sup.snapshot()] == ["failed", "stopped", "stopped"]
    assert sup.state == "escalated"


def test_nested_supervisor_escalates_to_parent_which_restarts_it(h: Harness) -> None:
    p1, i1 = h.probe("p1"), h.probe("i1")
    inner = h.sup("inner", [i1.spec()], max_restarts=1)
    root = h.sup("root", [p1.spec(), inner.as_child_spec()])
    root.start().result(timeout=2)
    for crash in range(2):
        wait_for(started(i1, crash + 1), "i1 running")
        i1.ref.tell(Crash())

    wait_for(lambda: len(i1.refs) == 3, "inner supervisor restarted with a fresh i1")
    wait_for(lambda: h.row(root, "inner")["state"] == "running", "inner row running")
    row = h.row(root, "inner")
    assert row["restarts"] == 1 and row["incarnation"] == 2
    assert row["children"][0]["state"] == "running" and row["children"][0]["incarnation"] == 3
    assert "more than 1 restarts" in (row["last_failure"] or "")
    assert h.escalations == [], "a nested supervisor reports to its parent, not on_escalate"
    assert len(p1.refs) == 1 and p1.ref.is_alive(), "one_for_one leaves siblings alone"
    assert i1.ref.is_alive()


def test_nested_escalation_propagates_to_root(h: Harness) -> None:
    p1, i1 = h.probe("p1"), h.probe("i1")
    inner = h.sup("inner", [i1.spec()], max_restarts=0)
    died: list[BaseException | None] = []
    root = h.sup("root", [p1.spec(), inner.as_child_spec(on_died=died.append)], max_restarts=0)
    root.start().result(timeout=2)
    wait_for(lambda: len(i1.refs) == 1, "i1 running")
    i1.ref.tell(Crash())

    wait_for(lambda: len(h.escalations) == 1, "root escalation")
    assert "inner" in h.escalations[0]
    assert len(died) == 1 and isinstance(died[0], SupervisorEscalated)
    assert ("stop", "p1") in h.journal and not p1.ref.is_alive()
    assert root.state == "escalated"
    wait_for(lambda: inner.state == "stopped", "parent stopped the escalated inner supervisor")


def test_failing_start_is_restarted_with_growing_backoff(h: Harness) -> None:
    a = h.probe("a", fail_starts=3)
    sup = h.sup("root", [a.spec()], backoff_min=0.02, backoff_max=0.06, rng=MaxRandom())
    sup.start().result(timeout=2)

    wait_for(lambda: h.row(sup, "a")["restarts"] == 3 and len(a.refs) == 4, "4th start")
    wait_for(lambda: ("start", "a") in h.journal[-1:] and a.ref.is_alive(), "a up")
    gaps = [t1 - t0 for t0, t1 in zip(a.start_times, a.start_times[1:], strict=False)]
    for gap, delay in zip(gaps, [0.02, 0.04, 0.06], strict=True):  # 0.08 capped at 0.06
        assert gap >= delay * 0.95, (gaps, delay)
    assert a.ref.ask(Ping(), timeout=2) is True
    assert len(a.died) == 3 and "start failed" in h.row(sup, "a")["last_failure"]


def test_failing_start_counts_toward_intensity(h: Harness) -> None:
    a = h.probe("a", fail_starts=-1)
    h.sup("root", [a.spec()], max_restarts=2).start().result(timeout=2)
    wait_for(lambda: len(h.escalations) == 1, "escalation")
    assert len(a.start_times) == 3  # the first start + 2 restarts


def test_spec_start_raising_is_a_failure(h: Harness) -> None:
    calls: list[ChildLink] = []

    def start(link: ChildLink) -> pykka.ActorRef[Any]:
        calls.append(link)
        raise OSError("cannot spawn")

    h.sup("root", [ChildSpec("x", start)], max_restarts=1).start().result(timeout=2)
    wait_for(lambda: len(h.escalations) == 1, "escalation")
    assert [link.incarnation for link in calls] == [1, 2]


def test_backoff_is_full_jitter_growing_and_capped() -> None:
    rng, ref = random.Random(42), random.Random(42)
    for attempt in range(8):
        expected = ref.uniform(0.0, min(1.0, 0.1 * 2**attempt))
        assert backoff_delay(attempt, 0.1, 1.0, rng) == expected

    def mean(attempt: int) -> float:
        rng = random.Random(7)
        return sum(backoff_delay(attempt, 0.1, 1.0, rng) for _ in range(500)) / 500

    assert mean(0) < mean(1) < mean(2) < mean(3)
    samples = [backoff_delay(10_000, 0.1, 1.0, random.Random(s)) for s in range(200)]
    assert all(0.0 <= s <= 1.0 for s in samples) and max(samples) > 0.9


def test_hung_child_is_detected_by_watchdog_and_replaced(h: Harness) -> None:
    a = h.probe("a")
    sup = h.sup("root", [a.spec(ping_interval=0.02, ping_timeout=0.2)])
    sup.start().result(timeout=2)
    wait_for(lambda: len(a.refs) == 1, "start")
    time.sleep(0.3)  # several ping rounds while healthy
    assert h.row(sup, "a")["restarts"] == 0 and a.died == []

    old = a.ref
    old.tell(Block(h.event()))
    wait_for(lambda: len(a.refs) == 2, "replacement")
    assert len(a.died) == 1 and isinstance(a.died[0], ChildHung)
    assert a.ref.ask(Ping(), timeout=2) is True
    assert pykka.ActorRegistry.get_by_urn(old.actor_urn) is None, "hung actor is abandoned"
    assert "Ping" in h.row(sup, "a")["last_failure"]


def test_orderly_stop_does_not_restart(h: Harness) -> None:
    a, b, c = h.probe("a"), h.probe("b"), h.probe("c")
    sup = h.sup("root", [a.spec(), b.spec(), c.spec()])
    sup.start().result(timeout=2)
    wait_for(lambda: len(h.journal) == 3, "all started")
    sup.stop().result(timeout=5)  # resolves after the children's exit reports were handled

    assert h.journal[3:] == [("stop", "c"), ("stop", "b"), ("stop", "a")]
    assert [r["state"] for r in sup.snapshot()] == ["stopped"] * 3
    assert h.restarts == [] and a.died == b.died == c.died == []
    assert [len(p.refs) for p in (a, b, c)] == [1, 1, 1]


def test_stale_reports_from_old_incarnations_are_ignored(h: Harness) -> None:
    a = h.probe("a")
    sup = h.sup("root", [a.spec()])
    sup.start().result(timeout=2)
    wait_for(lambda: len(a.refs) == 1, "start")
    a.ref.tell(Crash())
    wait_for(lambda: len(a.refs) == 2, "restart")

    a.links[0].failed(RuntimeError("stale"))
    a.links[0].exited()
    a.ref.tell(Crash())  # reports are handled in order: the stale ones come first
    wait_for(lambda: len(a.refs) == 3, "second restart")
    row = h.row(sup, "a")
    assert row["restarts"] == 2 and row["incarnation"] == 3 and "stale" not in row["last_failure"]
    assert len(a.died) == 2


@pytest.mark.parametrize(
    ("restart", "message", "restarted", "state"),
    [
        ("permanent", Exit(), True, "running"),
        ("transient", Exit(), False, "stopped"),
        ("transient", Crash(), True, "running"),
        ("temporary", Crash(), False, "failed"),
    ],
)
def test_restart_types(h: Harness, restart: str, message: Any, restarted: bool, state: str) -> None:
    a = h.probe("a")
    sup = h.sup("root", [a.spec(restart=restart)])
    sup.start().result(timeout=2)
    wait_for(lambda: len(a.refs) == 1, "start")
    a.ref.tell(message)

    wait_for(lambda: len(a.died) == 1, "on_died")
    assert (a.died[0] is None) == isinstance(message, Exit)
    if restarted:
        wait_for(lambda: len(a.refs) == 2, "restart")
    row = h.row(sup, "a")
    assert row["state"] == state and row["restarts"] == int(restarted)


def test_one_for_all_restarts_everyone(h: Harness) -> None:
    a, b, c = h.probe("a"), h.probe("b"), h.probe("c")
    sup = h.sup("root", [a.spec(), b.spec(), c.spec()], strategy="one_for_all")
    sup.start().result(timeout=2)
    wait_for(lambda: len(h.journal) == 3, "all started")
    b.ref.tell(Crash())

    wait_for(lambda: all(len(p.refs) == 2 for p in (a, b, c)), "all restarted")
    assert h.journal[3:5] == [("stop", "c"), ("stop", "a")]
    assert h.restarts == ["a", "b", "c"]
    assert a.died == c.died == [] and len(b.died) == 1


def test_rest_for_one_restarts_later_siblings(h: Harness) -> None:
    a, b, c = h.probe("a"), h.probe("b"), h.probe("c")
    sup = h.sup("root", [a.spec(), b.spec(), c.spec()], strategy="rest_for_one")
    sup.start().result(timeout=2)
    wait_for(lambda: len(h.journal) == 3, "all started")
    b.ref.tell(Crash())

    wait_for(lambda: len(b.refs) == 2 and len(c.refs) == 2, "b and c restarted")
    assert len(a.refs) == 1 and a.ref.is_alive()
    assert h.journal[3] == ("stop", "c") and ("stop", "a") not in h.journal
    assert [r["incarnation"] for r in sup.snapshot()] == [1, 2, 2]

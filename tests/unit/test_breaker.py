"""CircuitBreaker (resilience4j semantics) and RetryBudget, driven by a fake clock."""

from __future__ import annotations

import random

import pytest

from citadeld.llm.breaker import BreakerState, CircuitBreaker, Permit, Transition
from citadeld.llm.budget import RetryBudget, full_jitter
from citadeld.llm.config import BreakerConfig


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def make(clock: Clock, **kw: object) -> tuple[CircuitBreaker, list[Transition]]:
    base: dict[str, object] = {"window_size": 10, "minimum_calls": 4,
                               "failure_rate_threshold": 50, "wait_open_s": 1.0,
                               "wait_open_multiplier": 2.0, "wait_open_max_s": 8.0,
                               "wait_open_jitter": 0.0, "half_open_calls": 2}
    seen: list[Transition] = []
    b = CircuitBreaker("s1", BreakerConfig.model_validate({**base, **kw}), clock=clock,
                       rng=random.Random(7), on_transition=seen.append)
    return b, seen


def ok(b: CircuitBreaker, duration: float = 0.01) -> None:
    p = b.try_acquire()
    assert p is not None
    b.on_success(p, duration)


def fail(b: CircuitBreaker, duration: float = 0.01) -> None:
    p = b.try_acquire()
    assert p is not None
    b.on_failure(p, duration, "boom")


def test_no_verdict_below_minimum_calls() -> None:
    clock = Clock()
    b, _ = make(clock)
    for _ in range(3):
        fail(b)
    assert b.state is BreakerState.CLOSED  # 3 < minimum_calls, even at 100% failures
    fail(b)
    assert b.state is BreakerState.OPEN
    assert b.try_acquire() is None


def test_failure_rate_threshold_is_inclusive_over_the_window() -> None:
    clock = Clock()
    b, _ = make(clock)
    for _ in range(6):
        ok(b)
    for _ in range(3):
        fail(b)
    assert b.state is BreakerState.CLOSED  # 3/9 = 33%
    ok(b)  # 3/10
    for _ in range(2):
        fail(b)  # the window slides: oldest successes fall out -> 5/10 = 50%
    assert b.state is BreakerState.OPEN
    assert "failure rate 50%" in b.last_transition_reason


def test_open_wait_grows_on_repeated_trips_and_is_capped() -> None:
    clock = Clock()
    b, _ = make(clock)
    for _ in range(4):
        fail(b)
    waits = []
    for _ in range(6):
        at = b.retry_at()
        assert at is not None
        waits.append(round(at - clock(), 6))
        clock.advance(waits[-1])
        assert b.state is BreakerState.HALF_OPEN
        fail(b)
        fail(b)  # both probes fail -> OPEN again, longer
        assert b.state is BreakerState.OPEN
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert b.trips == 7


def test_jitter_stays_within_bounds_and_cap() -> None:
    clock = Clock()
    b, _ = make(clock, wait_open_jitter=0.5, wait_open_s=2.0, wait_open_max_s=3.0)
    seen = set()
    for _ in range(40):
        b.reset()
        for _ in range(4):
            fail(b)
        at = b.retry_at()
        assert at is not None
        wait = at - clock()
        assert 1.0 <= wait <= 3.0  # 2 +/- 50%, capped at 3
        seen.add(round(wait, 3))
    assert len(seen) > 10  # actually random


def test_half_open_admits_a_bounded_number_of_probes_then_closes() -> None:
    clock = Clock()
    b, seen = make(clock)
    for _ in range(4):
        fail(b)
    clock.advance(1.0)
    p1, p2 = b.try_acquire(), b.try_acquire()
    assert p1 is not None and p2 is not None and p1.half_open
    assert b.try_acquire() is None  # only half_open_calls probes at once
    b.on_success(p1, 0.01)
    assert b.state is BreakerState.HALF_OPEN  # verdict only once all probes are back
    b.on_success(p2, 0.01)
    assert b.state is BreakerState.CLOSED
    assert b.trips == 0
    assert b.rates()[0] == 0  # a fresh window
    assert [(t.from_state, t.to_state) for t in seen] == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]


def test_half_open_failure_reopens_with_longer_wait() -> None:
    clock = Clock()
    b, _ = make(clock)
    for _ in range(4):
        fail(b)
    clock.advance(1.0)
    p1, p2 = b.try_acquire(), b.try_acquire()
    assert p1 is not None and p2 is not None
    b.on_success(p1, 0.01)
    b.on_failure(p2, 0.01, "refused")  # 1/2 = 50% >= threshold
    assert b.state is BreakerState.OPEN
    at = b.retry_at()
    assert at is not None and at - clock() == pytest.approx(2.0)


def test_release_returns_a_probe_slot_and_stale_permits_do_not_count() -> None:
    clock = Clock()
    b, _ = make(clock)
    old = b.try_acquire()  # admitted while CLOSED, still in flight at the trip
    assert old is not None
    for _ in range(4):
        fail(b)
    clock.advance(1.0)
    p1 = b.try_acquire()
    p2 = b.try_acquire()
    assert p1 is not None and p2 is not None
    b.release(p2)  # e.g. the client went away: the slot is free again
    p3 = b.try_acquire()
    assert p3 is not None
    b.on_success(old, 0.01)  # a CLOSED-era call finishing now says nothing about recovery
    assert b.state is BreakerState.HALF_OPEN
    b.on_success(p1, 0.01)
    b.on_success(p3, 0.01)
    assert b.state is BreakerState.CLOSED


def test_slow_call_rate_trips_even_when_calls_succeed() -> None:
    clock = Clock()
    b, _ = make(clock, slow_call_duration_s=0.5, slow_call_rate_threshold=50)
    ok(b, 0.1)
    ok(b, 0.1)
    ok(b, 0.6)
    assert b.state is BreakerState.CLOSED
    ok(b, 0.7)  # 2/4 slow
    assert b.state is BreakerState.OPEN
    assert "slow-call rate" in b.last_transition_reason


def test_time_window_forgets_old_calls() -> None:
    clock = Clock()
    b, _ = make(clock, window_type="time", window_size=5, minimum_calls=4)
    for _ in range(3):
        fail(b)
    clock.advance(6)  # those failures left the 5 s window
    ok(b)
    fail(b)
    ok(b)
    assert b.rates()[0] == 3
    assert b.state is BreakerState.CLOSED
    fail(b)  # 2/4 in the window
    assert b.state is BreakerState.OPEN


def test_forced_states_and_reset() -> None:
    clock = Clock()
    b, seen = make(clock)
    b.force_open()
    assert b.state is BreakerState.FORCED_OPEN
    assert b.try_acquire() is None
    assert b.retry_at() is None
    clock.advance(100)
    assert b.state is BreakerState.FORCED_OPEN  # no timed exit
    b.force_closed()
    for _ in range(10):
        fail(b)  # nothing is recorded while forced
    assert b.state is BreakerState.FORCED_CLOSED
    b.reset()
    assert b.state is BreakerState.CLOSED and b.trips == 0
    assert [t.to_state for t in seen] == [BreakerState.FORCED_OPEN, BreakerState.FORCED_CLOSED,
                                          BreakerState.CLOSED]


def test_trip_from_outside_and_half_open_timeout() -> None:
    clock = Clock()
    b, _ = make(clock, half_open_max_s=3.0)
    b.trip("probe failed")
    assert b.state is BreakerState.OPEN and b.last_failure == "probe failed"
    clock.advance(1.0)
    assert b.try_acquire() is not None  # HALF_OPEN; this probe never reports back
    clock.advance(3.0)
    assert b.state is BreakerState.OPEN  # half_open_max_s elapsed
    assert b.trips == 2


def test_outcomes_while_open_are_ignored() -> None:
    clock = Clock()
    b, _ = make(clock)
    for _ in range(4):
        fail(b)
    b.on_success(Permit(0, False), 0.01)
    assert b.state is BreakerState.OPEN


def test_snapshot() -> None:
    clock = Clock()
    b, _ = make(clock)
    for _ in range(4):
        fail(b)
    snap = b.snapshot()
    assert snap["state"] == "open" and snap["half_open_in_s"] == 1.0
    assert snap["failure_rate"] == 100.0 and snap["last_failure"] == "boom"


def test_config_rejects_inconsistent_windows() -> None:
    with pytest.raises(ValueError, match="minimum_calls"):
        BreakerConfig(window_size=3, minimum_calls=5)
    with pytest.raises(ValueError, match="wait_open_max_s"):
        BreakerConfig(wait_open_s=10, wait_open_max_s=5)


# ---- retry budget and backoff ------------------------------------------------------------


def test_budget_allows_the_ratio_of_requests() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_s=0.0, window_s=10, clock=clock)
    for _ in range(100):
        budget.deposit()
    granted = sum(budget.try_withdraw() for _ in range(50))
    assert granted == 20
    assert budget.exhausted == 30


def test_budget_minimum_rate_when_quiet_and_window_expiry() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_s=3.0, window_s=10, clock=clock)
    granted = sum(budget.try_withdraw() for _ in range(100))
    assert granted == 30  # 3/s over a 10 s window, with no traffic at all
    assert not budget.try_withdraw()
    clock.advance(11)  # the old retries left the window
    assert budget.try_withdraw()


def test_budget_bounds_an_outage_to_a_fraction_of_traffic() -> None:
    """Every request of a long outage wants to retry: only ~ratio of them may."""
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_s=3.0, window_s=10, clock=clock)
    retries = 0
    for _ in range(60 * 100):  # 60 s at 100 requests/s
        budget.deposit()
        retries += budget.try_withdraw()
        clock.advance(0.01)
    assert retries <= 0.2 * 6000 + 30


def test_full_jitter() -> None:
    rng = random.Random(1)
    samples = [full_jitter(3, 0.1, 10.0, rng) for _ in range(1000)]
    assert 0 <= min(samples) and max(samples) <= 0.8
    assert sum(samples) / len(samples) == pytest.approx(0.4, rel=0.1)
    assert all(full_jitter(40, 0.1, 2.0, rng) <= 2.0 for _ in range(100))

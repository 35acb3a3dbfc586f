"""A circuit breaker with resilience4j semantics, as a pure class: no I/O, no threads, no
locks, an injectable clock and random source, so every transition is unit-testable.

CLOSED: every call is admitted; outcomes go into a sliding window (the last N calls, or the
last N seconds in one-second buckets). Once the window holds `minimum_calls`, a failure rate or
slow-call rate at or above its threshold opens the breaker.

OPEN: nothing is admitted for a wait that grows with each consecutive trip
(`wait_open_s * multiplier^(trips-1)`, +/- `wait_open_jitter` at random, capped at
`wait_open_max_s`); it then turns HALF_OPEN lazily, on the next look at its state.

HALF_OPEN: `half_open_calls` probe calls are admitted. When all of them have an outcome the
rates over those calls decide: at or above a threshold -> OPEN again (the wait grows), else
CLOSED with a fresh window and the trip count reset. Outcomes of calls admitted before the
breaker went half-open do not count there (they say nothing about the recovered server).

FORCED_OPEN / FORCED_CLOSED: an operator's override; nothing is recorded until `reset()`.

Callers take a `Permit` from `try_acquire()` and hand it back with exactly one of
`on_success`, `on_failure` or `release` (an outcome that says nothing about the server, such as
a client error or a caller that went away), so HALF_OPEN probe slots are never leaked.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from citadeld.llm.config import BreakerConfig


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    FORCED_CLOSED = "forced_closed"


# gauge values for citadel_llm_breaker_state
STATE_CODE = {
    BreakerState.CLOSED: 0,
    BreakerState.OPEN: 1,
    BreakerState.HALF_OPEN: 2,
    BreakerState.FORCED_OPEN: 3,
    BreakerState.FORCED_CLOSED: 4,
}


@dataclass(frozen=True)
class Transition:
    breaker: str
    from_state: BreakerState
    to_state: BreakerState
    at: float
    reason: str


class Permit:
    """Admission of one call; `generation` ties it to the state episode that admitted it.
    (A plain slotted class: one is made per request.)"""

    __slots__ = ("generation", "half_open")

    def __init__(self, generation: int, half_open: bool) -> None:
        self.generation = generation
        self.half_open = half_open


class _CountWindow:
    """The outcomes of the last `size` calls."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ring: deque[int] = deque()  # bit 0: failed, bit 1: slow
        self.calls = self.failures = self.slow = 0

    def record(self, failed: bool, slow: bool, now: float) -> None:
        if len(self._ring) == self.size:
            old = self._ring.popleft()
            self.calls -= 1
            self.failures -= old & 1
            self.slow -= (old >> 1) & 1
        self._ring.append(int(failed) | (int(slow) << 1))
        self.calls += 1
        self.failures += int(failed)
        self.slow += int(slow)

    def totals(self, now: float) -> tuple[int, int, int]:
        return self.calls, self.failures, self.slow

    def clear(self) -> None:
        self._ring.clear()
        self.calls = self.failures = self.slow = 0


class _TimeWindow:
    """The outcomes of the calls of the last `size` seconds, in one-second buckets."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._buckets: deque[list[int]] = deque()  # [second, calls, failures, slow]
        self.calls = self.failures = self.slow = 0

    def _evict(self, now: float) -> None:
        oldest = int(now) - self.size + 1
        while self._buckets and self._buckets[0][0] < oldest:
            _, c, f, s = self._buckets.popleft()
            self.calls -= c
            self.failures -= f
            self.slow -= s

    def record(self, failed: bool, slow: bool, now: float) -> None:
        self._evict(now)
        sec = int(now)
        if not self._buckets or self._buckets[-1][0] != sec:
            self._buckets.append([sec, 0, 0, 0])
        b = self._buckets[-1]
        b[1] += 1
        b[2] += int(failed)
        b[3] += int(slow)
        self.calls += 1
        self.failures += int(failed)
        self.slow += int(slow)

    def totals(self, now: float) -> tuple[int, int, int]:
        self._evict(now)
        return self.calls, self.failures, self.slow

    def clear(self) -> None:
        self._buckets.clear()
        self.calls = self.failures = self.slow = 0


def _rate(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


class CircuitBreaker:
    """One server's breaker. Not thread-safe by itself: the registry serializes access."""

    def __init__(
        self,
        name: str,
        cfg: BreakerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_transition: Callable[[Transition], None] | None = None,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self._clock = clock
        self._rng = rng or random.Random()
        self._on_transition = on_transition
        self._window: _CountWindow | _TimeWindow = (
            _CountWindow(cfg.window_size) if cfg.window_type == "count"
            else _TimeWindow(cfg.window_size)
        )
        self._state = BreakerState.CLOSED
        self._generation = 0
        self._since = clock()
        self.trips = 0  # consecutive openings without a close in between
        self._open_until = 0.0
        self._permits = 0  # HALF_OPEN probe slots left
        self._ho = [0, 0, 0]  # HALF_OPEN outcomes: calls, failures, slow
        self.last_failure: str | None = None
        self.last_transition_reason = "start"

    # ---- state ---------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        self._advance(self._clock())
        return self._state

    def _advance(self, now: float) -> None:
        if self._state is BreakerState.OPEN and now >= self._open_until:
            self._half_open(now)
        elif (
            self._state is BreakerState.HALF_OPEN
            and self.cfg.half_open_max_s > 0
            and now - self._since >= self.cfg.half_open_max_s
        ):
            self._open(now, "half-open probes did not finish in time")

    def _transition(self, to: BreakerState, now: float, reason: str) -> None:
        before = self._state
        self._state = to
        self._generation += 1
        self._since = now
        self.last_transition_reason = reason
        if self._on_transition is not None and before is not to:
            self._on_transition(Transition(self.name, before, to, now, reason))

    def _open(self, now: float, reason: str) -> None:
        self.trips += 1
        cfg = self.cfg
        wait = cfg.wait_open_s * cfg.wait_open_multiplier ** min(self.trips - 1, 64)
        wait = min(wait, cfg.wait_open_max_s)
        if cfg.wait_open_jitter:
            wait *= 1.0 + self._rng.uniform(-cfg.wait_open_jitter, cfg.wait_open_jitter)
        self._open_until = now + min(wait, cfg.wait_open_max_s)
        self._transition(BreakerState.OPEN, now, reason)

    def _half_open(self, now: float) -> None:
        self._permits = self.cfg.half_open_calls
        self._ho = [0, 0, 0]
        self._transition(BreakerState.HALF_OPEN, now, "open wait elapsed")

    def _close(self, now: float, reason: str) -> None:
        self.trips = 0
        self._window.clear()
        self._transition(BreakerState.CLOSED, now, reason)

    # ---- calls ---------------------------------------------------------------------------

    def try_acquire(self) -> Permit | None:
        """Admit one call, or None. In HALF_OPEN this takes one of the probe slots."""
        self._advance(self._clock())
        st = self._state
        if st is BreakerState.CLOSED or st is BreakerState.FORCED_CLOSED:
            return Permit(self._generation, False)
        if st is BreakerState.HALF_OPEN and self._permits > 0:
            self._permits -= 1
            return Permit(self._generation, True)
        return None

    def would_admit(self) -> bool:
        """try_acquire's answer without taking a slot."""
        self._advance(self._clock())
        st = self._state
        return st in (BreakerState.CLOSED, BreakerState.FORCED_CLOSED) or (
            st is BreakerState.HALF_OPEN and self._permits > 0
        )

    def release(self, permit: Permit) -> None:
        """The admitted call ended without saying anything about the server."""
        if (
            permit.half_open
            and self._state is BreakerState.HALF_OPEN
            and permit.generation == self._generation
        ):
            self._permits = min(self.cfg.half_open_calls, self._permits + 1)

    def on_success(self, permit: Permit, duration_s: float) -> None:
        self._record(permit, False, duration_s, "")

    def on_failure(self, permit: Permit, duration_s: float, reason: str) -> None:
        self._record(permit, True, duration_s, reason)

    def _record(self, permit: Permit, failed: bool, duration_s: float, reason: str) -> None:
        now = self._clock()
        self._advance(now)
        if failed:
            self.last_failure = reason
        slow = duration_s >= self.cfg.slow_call_duration_s
        st = self._state
        cfg = self.cfg
        if st is BreakerState.CLOSED:
            self._window.record(failed, slow, now)
            calls, failures, slows = self._window.totals(now)
            if calls >= cfg.minimum_calls:
                fr, sr = _rate(failures, calls), _rate(slows, calls)
                if fr >= cfg.failure_rate_threshold:
                    self._open(now, f"failure rate {fr:.0f}% >= {cfg.failure_rate_threshold:g}%"
                               f" over {calls} calls (last: {reason or 'n/a'})")
                elif sr >= cfg.slow_call_rate_threshold:
                    self._open(now, f"slow-call rate {sr:.0f}% >= "
                               f"{cfg.slow_call_rate_threshold:g}% over {calls} calls")
        elif (
            st is BreakerState.HALF_OPEN
            and permit.half_open
            and permit.generation == self._generation
        ):
            ho = self._ho
            ho[0] += 1
            ho[1] += int(failed)
            ho[2] += int(slow)
            if ho[0] >= cfg.half_open_calls:
                fr, sr = _rate(ho[1], ho[0]), _rate(ho[2], ho[0])
                if fr >= cfg.failure_rate_threshold:
                    self._open(now, f"half-open probes failed ({ho[1]}/{ho[0]};"
                               f" last: {reason or 'n/a'})")
                elif sr >= cfg.slow_call_rate_threshold:
                    self._open(now, f"half-open probes slow ({ho[2]}/{ho[0]})")
                else:
                    self._close(now, f"half-open probes succeeded ({ho[0] - ho[1]}/{ho[0]})")
        # OPEN, FORCED_*, or a stale HALF_OPEN permit: nothing to learn

    # ---- operator and probes ---------------------------------------------------------------

    def trip(self, reason: str) -> None:
        """Open now (e.g. active probes find the server dead); no-op unless CLOSED/HALF_OPEN."""
        now = self._clock()
        self._advance(now)
        if self._state in (BreakerState.CLOSED, BreakerState.HALF_OPEN):
            self.last_failure = reason
            self._open(now, reason)

    def force_open(self, reason: str = "forced open by operator") -> None:
        self._transition(BreakerState.FORCED_OPEN, self._clock(), reason)

    def force_closed(self, reason: str = "forced closed by operator") -> None:
        self._transition(BreakerState.FORCED_CLOSED, self._clock(), reason)

    def reset(self, reason: str = "reset by operator") -> None:
        """Back to CLOSED with an empty window and no trip history, whatever the state."""
        now = self._clock()
        self.trips = 0
        self._window.clear()
        self._transition(BreakerState.CLOSED, now, reason)

    # ---- reading ---------------------------------------------------------------------------

    def retry_at(self) -> float | None:
        """When a call may next be admitted: now, the end of the OPEN wait, or None (unknown:
        forced open, or every HALF_OPEN slot taken)."""
        now = self._clock()
        self._advance(now)
        st = self._state
        if st is BreakerState.OPEN:
            return self._open_until
        if st is BreakerState.FORCED_OPEN or (st is BreakerState.HALF_OPEN and not self._permits):
            return None
        return now

    def rates(self) -> tuple[int, float, float]:
        calls, failures, slows = self._window.totals(self._clock())
        return calls, _rate(failures, calls), _rate(slows, calls)

    def snapshot(self) -> dict[str, Any]:
        now = self._clock()
        self._advance(now)
        calls, fr, sr = self.rates()
        out: dict[str, Any] = {
            "state": self._state.value,
            "since_s": round(now - self._since, 3),
            "reason": self.last_transition_reason,
            "trips": self.trips,
            "window_calls": calls,
            "failure_rate": round(fr, 1),
            "slow_call_rate": round(sr, 1),
            "last_failure": self.last_failure,
        }
        if self._state is BreakerState.OPEN:
            out["half_open_in_s"] = round(max(0.0, self._open_until - now), 3)
        if self._state is BreakerState.HALF_OPEN:
            out["probe_slots_left"] = self._permits
        return out

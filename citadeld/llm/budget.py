"""Retry budget and backoff: what keeps an outage from turning into a retry storm.

The budget counts requests and retries over a sliding window of one-second buckets; a retry is
allowed while retries in the window stay below max(ratio * requests, min_per_s * window_s), i.e.
retries are at most `ratio` of the traffic, but a trickle of `min_per_s` is always allowed so a
quiet daemon can still fail over. Pure and clock-injected like the breaker; the router touches it
only from the event loop.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable


def full_jitter(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """AWS "full jitter": uniform(0, min(cap, base * 2**attempt)), attempt counted from 0."""
    return rng.uniform(0.0, min(cap, base * 2.0 ** min(attempt, 32)))


class RetryBudget:
    def __init__(
        self,
        ratio: float,
        min_per_s: float,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.window = max(1, round(window_s))
        self._clock = clock
        self._buckets: deque[list[int]] = deque()  # [second, requests, retries]
        self.requests = 0
        self.retries = 0
        self.exhausted = 0  # retries refused, ever

    def _bucket(self) -> list[int]:
        sec = int(self._clock())
        oldest = sec - self.window + 1
        while self._buckets and self._buckets[0][0] < oldest:
            _, req, ret = self._buckets.popleft()
            self.requests -= req
            self.retries -= ret
        if not self._buckets or self._buckets[-1][0] != sec:
            self._buckets.append([sec, 0, 0])
        return self._buckets[-1]

    def allowance(self) -> float:
        self._bucket()
        return max(self.ratio * self.requests, self.min_per_s * self.window)

    def deposit(self) -> None:
        """One new client request."""
        self._bucket()[1] += 1
        self.requests += 1

    def try_withdraw(self) -> bool:
        """Take one retry if the budget allows; False (and counted) when it is spent."""
        bucket = self._bucket()
        if self.retries + 1 > max(self.ratio * self.requests, self.min_per_s * self.window):
            self.exhausted += 1
            return False
        bucket[2] += 1
        self.retries += 1
        return True

    def snapshot(self) -> dict[str, float]:
        allowance = self.allowance()
        return {
            "window_s": self.window,
            "requests": self.requests,
            "retries": self.retries,
            "allowance": round(allowance, 1),
            "exhausted_total": self.exhausted,
        }

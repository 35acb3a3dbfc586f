"""Rate-limit bucket math: GCRA (the generic cell rate algorithm), in-process and as one Redis
Lua script, so both enforce exactly the same rule.

GCRA is a token bucket stored as a single number per key, the "theoretical arrival time"
(TAT): with ``interval = 60 / per_min`` seconds and a capacity of ``burst`` requests, a request
at ``now`` is allowed iff ``max(TAT, now) - now <= (burst - 1) * interval``; allowing it moves
TAT on by one interval. One number instead of (tokens, last refill) makes the Redis side
a single GET/SET under the script's atomicity, and the key expires exactly when the bucket is
full again (an idle client costs no memory).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

_EPS = 1e-6  # seconds: float rounding must never refuse a request that is exactly on time


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one check; times in seconds."""

    allowed: bool
    limit: float  # requests per minute of the policy applied
    burst: int
    remaining: int  # requests that could still be made at once after this one
    reset_s: float  # until the bucket is full again
    retry_after_s: float  # 0 when allowed


@dataclass(frozen=True, slots=True)
class Policy:
    per_min: float
    burst: int

    @property
    def interval_s(self) -> float:
        return 60.0 / self.per_min


def gcra(tat: float | None, now: float, policy: Policy) -> tuple[float | None, Decision]:
    """One check against a bucket whose state is ``tat`` (None: never seen / full).

    Returns the new TAT (None when the request is refused: the state is unchanged) and the
    decision. Pure: no clock, no storage, so the tests can drive it exactly.
    """
    interval, burst = policy.interval_s, policy.burst
    base = now if tat is None or tat < now else tat
    ahead = base - now  # how far behind "full" the bucket is, in seconds of refill
    slack = (burst - 1) * interval
    if ahead > slack + _EPS:  # compared as a difference: no rounding of large epoch sums
        return None, Decision(False, policy.per_min, burst, 0, ahead, ahead - slack)
    remaining = math.floor((slack - ahead) / interval + 1e-9)
    return base + interval, Decision(True, policy.per_min, burst,
                                     max(0, min(remaining, burst - 1)), ahead + interval, 0.0)


class LocalBuckets:
    """In-process GCRA buckets: the limiter without Redis, and its fallback while Redis is away.

    Loop-only state (no lock). Bounded: past ``max_keys`` buckets, the full (expired) ones are
    dropped, and if that is not enough the oldest-inserted ones - forgetting a bucket can only
    let its owner through a little earlier, never refuse someone wrongly.
    """

    def __init__(self, max_keys: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self.max_keys = max_keys
        self.clock = clock
        self._tat: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._tat)

    def check(self, key: str, policy: Policy) -> Decision:
        now = self.clock()
        new_tat, decision = gcra(self._tat.get(key), now, policy)
        if new_tat is not None:
            if key not in self._tat and len(self._tat) >= self.max_keys:
                self._prune(now)
            self._tat[key] = new_tat
        return decision

    def _prune(self, now: float) -> None:
        full = [k for k, t in self._tat.items() if t <= now]
        for k in full:
            del self._tat[k]
        excess = len(self._tat) - self.max_keys // 2
        if excess > 0:  # dicts keep insertion order: the oldest buckets go first
            for k in list(self._tat)[:excess]:
                del self._tat[k]


# KEYS[1]: the bucket; ARGV[1]: interval in microseconds; ARGV[2]: burst.
# Time comes from the Redis server (TIME), so instances with skewed clocks still agree; Redis 7
# replicates a script's effects, which makes TIME before a write allowed. Microseconds since the
# epoch (~1.7e15) are exact in Lua's doubles; '%.0f' keeps them exact in the stored string.
# Returns {allowed 0|1, remaining, retry_after_us, reset_us}.
GCRA_LUA = """\
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = now
local stored = redis.call('GET', KEYS[1])
if stored then
  tat = tonumber(stored)
  if tat < now then tat = now end
end
local ahead = tat - now
local slack = (burst - 1) * interval
if ahead > slack + 1 then
  return {0, 0, math.ceil(ahead - slack), math.ceil(ahead)}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX',
           math.ceil((ahead + interval) / 1000) + 1)
local remaining = math.floor((slack - ahead) / interval + 1e-9)
if remaining > burst - 1 then remaining = burst - 1 end
if remaining < 0 then remaining = 0 end
return {1, remaining, 0, math.ceil(ahead + interval)}
"""


def decision_from_script(reply: list[int], policy: Policy) -> Decision:
    allowed, remaining, retry_us, reset_us = (int(x) for x in reply)
    return Decision(bool(allowed), policy.per_min, policy.burst, max(0, remaining),
                    reset_us / 1e6, retry_us / 1e6)

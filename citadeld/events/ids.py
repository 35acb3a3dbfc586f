"""Event ids shaped like Redis Stream ids (``<ms>-<seq>``) so that resume (SSE Last-Event-ID,
websocket ``after``) means the same on both buses, and ids compare as (ms, seq) pairs."""

from __future__ import annotations

import re
import time

_ID = re.compile(r"([0-9]{1,15})-([0-9]{1,19})")  # ASCII digits only, like Redis
ZERO = (0, 0)

Key = tuple[int, int]


def parse_id(value: str) -> Key:
    """``"1732623000000-3"`` -> (1732623000000, 3); ValueError for anything else."""
    m = _ID.fullmatch(value)
    if m is None:
        raise ValueError(f"not an event id (expected <ms>-<seq>): {value[:40]!r}")
    return int(m.group(1)), int(m.group(2))


def is_id(value: object) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def format_id(key: Key) -> str:
    return f"{key[0]}-{key[1]}"


class IdClock:
    """Monotonic ids from the wall clock: the same millisecond (or a clock that stepped back)
    bumps the sequence, exactly as Redis does for ``XADD *``."""

    def __init__(self) -> None:
        self.last: Key = ZERO

    def next(self) -> str:
        ms = int(time.time() * 1000)
        last_ms, seq = self.last
        self.last = (ms, 0) if ms > last_ms else (last_ms, seq + 1)
        return format_id(self.last)

    def observe(self, key: Key) -> None:
        """Never hand out an id at or below one already used."""
        if key > self.last:
            self.last = key

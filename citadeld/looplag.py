"""Event-loop lag monitor: the loop's health is the daemon's health, so measure it always."""

from __future__ import annotations

import asyncio
import collections
import contextlib

from citadeld.metrics import Metrics


class LoopLag:
    def __init__(self, metrics: Metrics, interval: float = 0.05, window: int = 1200) -> None:
        self.metrics = metrics
        self.interval = interval
        self.recent: collections.deque[float] = collections.deque(maxlen=window)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(self.interval)
            lag = max(0.0, loop.time() - t0 - self.interval)
            self.recent.append(lag)
            self.metrics.loop_lag.observe(lag)

    def snapshot(self) -> dict[str, float]:
        """p50/p99/max of the last minute or so, in milliseconds."""
        data = sorted(self.recent)
        if not data:
            return {"p50": 0.0, "p99": 0.0, "max": 0.0}

        def q(p: float) -> float:
            return round(data[min(len(data) - 1, int(p * len(data)))] * 1000, 3)

        return {"p50": q(0.5), "p99": q(0.99), "max": round(data[-1] * 1000, 3)}

"""Counters and histograms for the per-request hot path, exported through prometheus-client.

prometheus-client guards every value with a mutex and checks observability on each call: ~1 us
for ``Counter.inc`` and ~3 us for ``Histogram.observe`` (two values and a bucket search), paid
several times per request - about a tenth of a cache hit. The metrics here are written only on
the event loop thread, so a child is a plain Python number (a list of bucket counts for a
histogram) with no lock. The library still owns the exposition format: each family is a
custom collector turned into ``CounterMetricFamily`` / ``HistogramMetricFamily`` at scrape
time. Do not write to these from other threads (an increment could be lost); actors hand their
numbers to the loop first, as they already do for results.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric


class LoopCounter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LoopHistogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bucket i counts values <= bounds[i]: the first bound not below the value
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Family:
    """A custom collector (prometheus-client's protocol: ``describe`` and ``collect``)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry | None) -> None:
        self.name, self.documentation = name, documentation
        self.labelnames = tuple(labelnames)
        if registry is not None:
            registry.register(self)

    def _key(self, values: tuple[object, ...]) -> tuple[str, ...]:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        return tuple(str(v) for v in values)

    def describe(self) -> Iterator[Metric]:
        yield self._family()  # its name and type, so the registry refuses a duplicate

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        self._samples(family)
        yield family

    def _family(self) -> Metric:
        raise NotImplementedError

    def _samples(self, family: Metric) -> None:
        raise NotImplementedError


class LoopCounterFamily(_Family):
    """Like ``prometheus_client.Counter`` (``name`` without ``_total``), loop-only."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None) -> None:
        super().__init__(name, documentation, labelnames, registry)
        self._children: dict[tuple[str, ...], LoopCounter] = {}

    def labels(self, *values: object) -> LoopCounter:
        key = self._key(values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = LoopCounter()
        return child

    def inc(self, amount: float = 1.0) -> None:  # the unlabelled case
        self.labels().inc(amount)

    def _family(self) -> Metric:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _samples(self, family: Metric) -> None:
        assert isinstance(family, CounterMetricFamily)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)


class LoopHistogramFamily(_Family):
    """Like ``prometheus_client.Histogram`` with fixed buckets, loop-only."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 buckets: Sequence[float] = (), registry: CollectorRegistry | None = None
                 ) -> None:
        super().__init__(name, documentation, labelnames, registry)
        self.bounds = tuple(sorted(float(b) for b in buckets if b != float("inf")))
        self._children: dict[tuple[str, ...], LoopHistogram] = {}

    def labels(self, *values: object) -> LoopHistogram:
        key = self._key(values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = LoopHistogram(self.bounds)
        return child

    def observe(self, value: float) -> None:  # the unlabelled case
        self.labels().observe(value)

    def _family(self) -> Metric:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _samples(self, family: Metric) -> None:
        assert isinstance(family, HistogramMetricFamily)
        les = [*(_le(b) for b in self.bounds), "+Inf"]
        for values, child in list(self._children.items()):
            counts, total, cumulative = list(child.counts), 0, []
            for le, n in zip(les, counts, strict=True):
                total += n
                cumulative.append((le, total))
            family.add_metric(list(values), cumulative, child.sum)


def _le(bound: float) -> str:
    """Bucket labels as prometheus-client writes them (0.005, 1.0, 30.0)."""
    return repr(float(bound))

"""The loop-only metric families expose what prometheus-client's own would (bar _created)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.registry import DuplicateTimeseries

from citadeld.loopmetrics import LoopCounterFamily, LoopHistogramFamily


def _without_created(text: str) -> list[str]:
    return [line for line in text.splitlines() if "_created" not in line]


def test_same_exposition_as_prometheus_client() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    buckets = (0.001, 0.01, 1)
    h1 = Histogram("x_seconds", "help", ["route"], buckets=buckets, registry=theirs)
    c1 = Counter("reqs", "help", ["a"], registry=theirs)
    u1 = Counter("hits", "help", registry=theirs)
    h2 = LoopHistogramFamily("x_seconds", "help", ["route"], buckets=buckets, registry=ours)
    c2 = LoopCounterFamily("reqs", "help", ["a"], registry=ours)
    u2 = LoopCounterFamily("hits", "help", registry=ours)
    for v in (0.0005, 0.001, 0.005, 2.0, 0.01, 1.0):  # edges land in the bucket they bound
        h1.labels("/a").observe(v)
        h2.labels("/a").observe(v)
    h1.labels("/b").observe(0.5)
    h2.labels("/b").observe(0.5)
    c1.labels("x").inc(3)
    c2.labels("x").inc(3)
    u1.inc()
    u2.inc()
    assert _without_created(generate_latest(ours).decode()) == \
        _without_created(generate_latest(theirs).decode())


def test_registry_refuses_a_duplicate_and_labels_are_checked() -> None:
    reg = CollectorRegistry()
    fam = LoopCounterFamily("reqs", "help", ["a"], registry=reg)
    with pytest.raises(DuplicateTimeseries):
        LoopCounterFamily("reqs", "help", ["a"], registry=reg)
    with pytest.raises(ValueError, match="expected labels"):
        fam.labels("x", "y")
    assert fam.labels("x") is fam.labels("x")  # children are cached

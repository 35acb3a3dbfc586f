"""LLM routing metrics, registered on the daemon's own registry (`Metrics.registry`)."""

from __future__ import annotations

import re
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from citadeld.llm.breaker import STATE_CODE, Transition

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_CALLER_OK = re.compile(r"[^A-Za-z0-9._@:-]")
MAX_CALLERS = 200  # distinct caller label values; later ones are counted as "other"


class LLMMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.requests = Counter(
            "citadel_llm_requests", "LLM requests answered, by outcome", ["model", "outcome"],
            registry=r,
        )
        self.attempts = Counter(
            "citadel_llm_upstream_attempts", "Upstream attempts by outcome",
            ["server", "outcome"], registry=r,
        )
        self.failures = Counter(
            "citadel_llm_upstream_failures", "Failed upstream attempts by kind",
            ["server", "kind"], registry=r,
        )
        self.latency = Histogram(
            "citadel_llm_upstream_duration_seconds", "Upstream attempt duration", ["server"],
            buckets=_LATENCY, registry=r,
        )
        self.ttft = Histogram(
            "citadel_llm_time_to_first_token_seconds", "Upstream time to first generated text",
            ["server"], buckets=_TTFT, registry=r,
        )
        self.breaker_state = Gauge(
            "citadel_llm_breaker_state",
            "Breaker state: 0 closed, 1 open, 2 half_open, 3 forced_open, 4 forced_closed",
            ["server"], registry=r,
        )
        self.transitions = Counter(
            "citadel_llm_breaker_transitions", "Breaker state transitions",
            ["server", "from_state", "to_state"], registry=r,
        )
        self.retries = Counter(
            "citadel_llm_retries", "Retried attempts (any server)", ["model"], registry=r,
        )
        self.failovers = Counter(
            "citadel_llm_failovers", "Retries that went to another server than the last try",
            ["from_server", "to_server"], registry=r,
        )
        self.budget_exhausted = Counter(
            "citadel_llm_retry_budget_exhausted", "Retries refused by the retry budget",
            registry=r,
        )
        self.no_server = Counter(
            "citadel_llm_no_server_available",
            "Requests that found every server open, rate-limited or full", ["model"], registry=r,
        )
        self.tokens = Counter(
            "citadel_llm_tokens", "Tokens by server, model, caller and kind (prompt/completion)",
            ["server", "model", "caller", "kind"], registry=r,
        )
        self.cost = Counter(
            "citadel_llm_cost", "Cost of served requests, in llm.currency units",
            ["server", "model", "caller"], registry=r,
        )
        self.inflight = Gauge(
            "citadel_llm_inflight", "Upstream attempts in progress", ["server"], registry=r,
        )
        self._callers: set[str] = set()
        self._lock = threading.Lock()
        self._servers: dict[str, ServerMetrics] = {}
        self._usage: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
        self._outcomes: dict[tuple[str, str], Any] = {}

    # Children are resolved once and kept: `labels()` takes a lock and hashes its labels, and
    # the request path would otherwise call it a dozen times per request.

    def server(self, name: str) -> ServerMetrics:
        sm = self._servers.get(name)
        if sm is None:
            sm = self._servers[name] = ServerMetrics(self, name)
        return sm

    def usage(self, server: str, model: str, caller: str) -> tuple[Any, Any, Any]:
        """(prompt tokens, completion tokens, cost) counters."""
        key = (server, model, caller)
        children = self._usage.get(key)
        if children is None:
            children = self._usage[key] = (
                self.tokens.labels(server, model, caller, "prompt"),
                self.tokens.labels(server, model, caller, "completion"),
                self.cost.labels(server, model, caller),
            )
        return children

    def outcome(self, model: str, outcome: str) -> None:
        child = self._outcomes.get((model, outcome))
        if child is None:
            child = self._outcomes[(model, outcome)] = self.requests.labels(model, outcome)
        child.inc()

    def caller_label(self, caller: str) -> str:
        """Bounded label cardinality: sanitized, at most MAX_CALLERS distinct values."""
        if caller in self._callers:  # the common case; a set lookup is atomic under the GIL
            return caller
        label = _CALLER_OK.sub("_", caller)[:64] or "anonymous"
        with self._lock:
            if label in self._callers:
                return label
            if len(self._callers) >= MAX_CALLERS:
                return "other"
            self._callers.add(label)
        return label

    def on_transition(self, t: Transition) -> None:
        self.breaker_state.labels(t.breaker).set(STATE_CODE[t.to_state])
        self.transitions.labels(t.breaker, t.from_state.value, t.to_state.value).inc()


class ServerMetrics:
    """One server's metric children."""

    def __init__(self, m: LLMMetrics, name: str) -> None:
        self.inflight = m.inflight.labels(name)
        self.latency = m.latency.labels(name)
        self.ttft = m.ttft.labels(name)
        self.ok = m.attempts.labels(name, "ok")
        self.failed = m.attempts.labels(name, "failure")
        self.rejected = m.attempts.labels(name, "rejected")
        self.cancelled = m.attempts.labels(name, "cancelled")

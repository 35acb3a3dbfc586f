"""Per-server routing state and the choice of a server: breakers, in-flight counts, rate-limit
cooldowns, latency estimates and the last probe result, behind one lock.

The registry is shared by the event loop (each attempt: acquire, then record or release) and the
RouterActor's thread (probe results, periodic state advance, operator commands). Every method
holds the lock for microseconds and never does I/O, so the loop can call it directly; breaker
transitions are collected under the lock and delivered to listeners (metrics, logs) after it
is released.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from citadeld.llm.breaker import BreakerState, CircuitBreaker, Permit, Transition
from citadeld.llm.config import LLMConfig, canonical_model
from citadeld.llm.upstream import ServerInfo

log = logging.getLogger("citadeld.llm")

_EWMA = 0.2


@dataclass(eq=False)
class Server:
    info: ServerInfo
    priority: int
    weight: float
    max_inflight: int
    breaker: CircuitBreaker
    inflight: int = 0
    cooldown_until: float = 0.0  # honouring an upstream Retry-After
    ewma_ttft: float | None = None
    probe: dict[str, Any] = field(default_factory=dict)
    probe_failures: int = 0
    served_requests: int = 0
    failed_requests: int = 0

    @property
    def name(self) -> str:
        return self.info.name


@dataclass(frozen=True)
class Blocked:
    """Why no server could take a request, and when one might."""

    retry_in: float | None  # seconds until the soonest server may admit; None if unknown
    rate_limited: bool  # every blocked server is waiting out a Retry-After
    details: list[str]


class Registry:
    def __init__(
        self,
        cfg: LLMConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.rng = rng or random.Random()
        self._lock = threading.Lock()
        self._pending: list[Transition] = []
        self.listeners: list[Callable[[Transition], None]] = []
        self.servers: dict[str, Server] = {}
        for s in cfg.servers:
            breaker = CircuitBreaker(
                s.name, cfg.breaker_for(s), clock=clock, rng=self.rng,
                on_transition=self._pending.append,
            )
            self.servers[s.name] = Server(ServerInfo.from_config(s), s.priority, s.weight,
                                          s.max_inflight, breaker)
        self.by_model: dict[str, list[Server]] = {}
        for server in self.servers.values():
            for model in server.info.served:
                self.by_model.setdefault(model, []).append(server)
        for servers in self.by_model.values():
            servers.sort(key=lambda sv: sv.priority)
        # per model: servers grouped by priority, best first (precomputed for acquire)
        self.groups: dict[str, list[list[Server]]] = {}
        for model, servers in self.by_model.items():
            groups: list[list[Server]] = []
            for server in servers:
                if groups and groups[-1][0].priority == server.priority:
                    groups[-1].append(server)
                else:
                    groups.append([server])
            self.groups[model] = groups
        self.aliases: dict[str, str] = {}
        for name, policy in cfg.models.items():
            for alias in policy.aliases:
                self.aliases[canonical_model(alias)] = canonical_model(name)

    # ---- lookup ----------------------------------------------------------------------------

    def resolve(self, model: str) -> str | None:
        name = canonical_model(model)
        name = self.aliases.get(name, name)
        return name if name in self.by_model else None

    def models(self) -> list[str]:
        return sorted(self.by_model)

    # ---- transitions -------------------------------------------------------------------------

    def _flush(self) -> None:
        """Deliver transitions collected under the lock; call without holding it."""
        if not self._pending:
            return
        with self._lock:
            events, self._pending[:] = list(self._pending), []
        for t in events:
            for listener in self.listeners:
                try:
                    listener(t)
                except Exception:
                    log.exception("breaker listener failed")

    # ---- choosing --------------------------------------------------------------------------

    def _order(self, model: str, strategy: str) -> list[Server]:
        """Priority groups in order; within a group, by the routing strategy."""
        out: list[Server] = []
        rnd = self.rng.random
        for group in self.groups.get(model, ()):
            if len(group) == 1:
                out.append(group[0])
                continue
            if strategy == "least_busy":
                out.extend(sorted(group, key=lambda s: (s.inflight / s.weight, rnd())))
            elif strategy == "lowest_latency":  # unmeasured servers first, so each gets measured
                out.extend(sorted(group, key=lambda s: (s.ewma_ttft or 0.0, rnd())))
            else:  # weighted random order (Efraimidis-Spirakis keys)
                out.extend(sorted(group, key=lambda s: rnd() ** (1.0 / s.weight), reverse=True))
        return out

    def acquire(
        self, model: str, tried: Iterable[str] = (), prefer: str | None = None,
        strategy: str = "priority",
    ) -> tuple[Server, Permit] | None:
        """A server for the next attempt, with its breaker permit and an in-flight slot.
        Servers not tried yet by this request come first; then any that admits."""
        with self._lock:
            now = self.clock()
            ordered = self._order(model, strategy)
            if prefer is not None:
                ordered.sort(key=lambda s: s.name != prefer)  # stable: the rest keep order
            if tried:
                seen = set(tried)
                ordered = ([s for s in ordered if s.name not in seen]
                           + [s for s in ordered if s.name in seen])
            chosen: tuple[Server, Permit] | None = None
            for server in ordered:
                if server.cooldown_until > now:
                    continue
                if server.max_inflight and server.inflight >= server.max_inflight:
                    continue
                permit = server.breaker.try_acquire()
                if permit is not None:
                    server.inflight += 1
                    chosen = (server, permit)
                    break
        self._flush()
        return chosen

    def blocked(self, model: str) -> Blocked:
        with self._lock:
            now = self.clock()
            soonest: float | None = None
            rate_limited = True
            details = []
            for server in self.by_model.get(model, ()):
                at = server.breaker.retry_at()
                st = server.breaker._state
                if at is None:
                    if st is BreakerState.HALF_OPEN:
                        at = now + 0.25  # probe slots taken: one frees within a call's time
                        details.append(f"{server.name} half-open (probe slots busy)")
                    else:
                        details.append(f"{server.name} {st.value}")
                        rate_limited = False
                        continue
                elif at > now:
                    details.append(f"{server.name} {st.value} (half-open in {at - now:.1f}s)")
                if server.cooldown_until > now:
                    details.append(f"{server.name} rate-limited for "
                                   f"{server.cooldown_until - now:.1f}s")
                    at = max(at, server.cooldown_until)
                else:
                    rate_limited = False
                if server.max_inflight and server.inflight >= server.max_inflight:
                    details.append(f"{server.name} at max_inflight={server.max_inflight}")
                    at = max(at, now + 0.05)
                soonest = at if soonest is None else min(soonest, at)
        self._flush()
        retry_in = None if soonest is None else max(0.0, soonest - now)
        return Blocked(retry_in, rate_limited and soonest is not None, details)

    # ---- outcomes ----------------------------------------------------------------------------

    def success(self, server: Server, permit: Permit, ttft: float) -> None:
        with self._lock:
            server.inflight -= 1
            server.served_requests += 1
            server.breaker.on_success(permit, ttft)
            e = server.ewma_ttft
            server.ewma_ttft = ttft if e is None else e + _EWMA * (ttft - e)
        self._flush()

    def failure(self, server: Server, permit: Permit, duration: float, reason: str,
                counts: bool, retry_after: float | None = None) -> None:
        with self._lock:
            server.inflight -= 1
            server.failed_requests += 1
            if retry_after:
                server.cooldown_until = max(server.cooldown_until, self.clock() + retry_after)
            if counts:
                server.breaker.on_failure(permit, duration, reason)
            else:
                server.breaker.release(permit)
        self._flush()

    def release(self, server: Server, permit: Permit) -> None:
        with self._lock:
            server.inflight -= 1
            server.breaker.release(permit)
        self._flush()

    # ---- probes and operators -----------------------------------------------------------------

    def record_probe(self, name: str, ok: bool, latency_ms: float | None, error: str | None,
                     missing: list[str] | None = None) -> BreakerState:
        server = self.servers[name]
        with self._lock:
            server.probe = {
                "ok": ok, "latency_ms": None if latency_ms is None else round(latency_ms, 2),
                "error": error, "at": time.time(), "missing_models": missing or [],
            }
            b = server.breaker
            if ok:
                server.probe_failures = 0
            else:
                server.probe_failures += 1
                n = self.cfg.probes.failures_to_open
                st = b.state
                if n and (
                    (st is BreakerState.CLOSED and server.probe_failures >= n)
                    or st is BreakerState.HALF_OPEN
                ):
                    b.trip(f"health probe failed: {error}")
            state = b.state
        self._flush()
        return state

    def command(self, name: str, action: str) -> dict[str, Any]:
        """Operator override: force_open | force_closed | reset. KeyError for unknown servers."""
        server = self.servers[name]
        with self._lock:
            b = server.breaker
            if action == "force_open":
                b.force_open()
            elif action == "force_closed":
                b.force_closed()
            elif action == "reset":
                b.reset()
                server.cooldown_until = 0.0
                server.probe_failures = 0
            else:
                raise ValueError(f"unknown breaker action {action!r}")
            snap = b.snapshot()
        self._flush()
        return snap

    def states(self) -> dict[str, BreakerState]:
        """Current states (advancing lazy OPEN -> HALF_OPEN transitions)."""
        with self._lock:
            out = {name: s.breaker.state for name, s in self.servers.items()}
        self._flush()
        return out

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            now = self.clock()
            out = {}
            for name, s in self.servers.items():
                out[name] = {
                    "kind": s.info.kind,
                    "url": s.info.url,
                    "models": sorted(s.info.served),
                    "priority": s.priority,
                    "weight": s.weight,
                    "inflight": s.inflight,
                    "served": s.served_requests,
                    "failed": s.failed_requests,
                    "ttft_ewma_ms": None if s.ewma_ttft is None else round(s.ewma_ttft * 1e3, 2),
                    "rate_limited_s": round(max(0.0, s.cooldown_until - now), 3),
                    "breaker": s.breaker.snapshot(),
                    "probe": dict(s.probe),
                }
        self._flush()
        return out

"""LLMRouter: the loop-side facade that sends each generation request to a healthy server.

Shape, and why. Generation is streaming I/O that lasts seconds to minutes, one request at a
time per caller: it does not fit an actor's "one message, one reply" (an actor thread per
stream, or a reply per chunk through futures, would add thread hops to every chunk and a
thread per concurrent stream). So the upstream HTTP streams run as aiohttp client requests on
the front's event loop, which is non-blocking I/O and never blocks the loop. What must be
shared and consistent, the breakers and the per-server state, lives in a `Registry` whose
methods take a lock for microseconds and never do I/O; the loop consults it directly on every
attempt (an actor round trip per attempt would cost two thread hops against a 2 ms overhead
budget). The `RouterActor` (see `actor.py`), a supervised child of the root, owns the work
that takes time outside requests: active health probes on its own private loop, advancing the
breakers' timed transitions, and publishing their state to /health and metrics. If it crashes
the supervisor restarts it; routing goes on meanwhile, only without probes.

The commit point is the first byte sent to the client. A streaming request is held until
the first generated text arrives from some server; failures before that (refused connection,
5xx, 429, hang after headers, error line, malformed or truncated stream) are retried on
another server transparently. After it, a failure ends the stream with a well-formed error
event in the caller's dialect. A non-streaming request commits only when it is complete, so it
can be retried after any failure. A caller that goes away cancels its handler, which aborts
the upstream request and hands the breaker permit back unused.

Retries: at most `max_attempts` per request, each preceded by full-jitter backoff, each
allowed by the retry budget; every retry prefers a server this request has not tried. A server
that answered with Retry-After is not chosen until it has passed. When no server admits a
request: fail at once with 503 and Retry-After = the soonest half-open time (429 when every
server is only rate-limited), or, with `when_all_open: wait`, wait up to `max_wait_s` for one.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from citadeld.errors import (
    BadRequest,
    CitadelError,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from citadeld.llm.breaker import Permit, Transition
from citadeld.llm.budget import RetryBudget, full_jitter
from citadeld.llm.config import LLMConfig, canonical_model
from citadeld.llm.metrics import LLMMetrics
from citadeld.llm.registry import Blocked, Registry, Server
from citadeld.llm.upstream import Chunk, GenRequest, UpstreamCall, UpstreamFailure, new_session
from citadeld.supervision import ChildSpec

log = logging.getLogger("citadeld.llm")

MAX_COOLDOWN_S = 300.0  # an upstream Retry-After longer than this is capped


def estimate_tokens(chars: int) -> int:
    return chars // 4 + 1


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    estimated: bool
    cost: float | None
    currency: str

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "estimated": self.estimated,
            "cost": None if self.cost is None else round(self.cost, 8),
            "currency": self.currency,
        }


@dataclass
class Result:
    model: str
    server: str
    attempts: int
    tried: list[str]
    text: str
    finish_reason: str
    usage: Usage
    ttft_s: float  # request start -> first text, failovers included
    upstream_ttft_s: float  # of the attempt that served
    total_s: float

    def timings(self) -> dict[str, float]:
        return {
            "total_ms": round(self.total_s * 1e3, 3),
            "ttft_ms": round(self.ttft_s * 1e3, 3),
            "upstream_ttft_ms": round(self.upstream_ttft_s * 1e3, 3),
        }


class MidStreamError(Exception):
    """The stream failed after its first byte went out; the handler ends it with an error
    event in its dialect."""

    def __init__(self, failure: UpstreamFailure) -> None:
        super().__init__(str(failure))
        self.failure = failure
        self.code = "upstream_timeout" if failure.kind.endswith("timeout") else "upstream_error"
        self.message = f"upstream stream failed after it started: {failure}"


class UsageLedger:
    """Tokens and cost per (server, model, caller) since start; thread-safe for readers."""

    def __init__(self, cfg: LLMConfig) -> None:
        self.currency = cfg.currency
        self._prices = {canonical_model(name): policy.prices()
                        for name, policy in cfg.models.items()
                        if any(p is not None for p in policy.prices())}
        self._rows: dict[tuple[str, str, str], list[float]] = {}
        self._lock = threading.Lock()

    def cost(self, model: str, prompt: int, completion: int) -> float | None:
        p, c = self._prices.get(model, (None, None))
        if p is None and c is None:
            return None
        return (prompt * (p or 0.0) + completion * (c or 0.0)) / 1000.0

    def add(self, server: str, model: str, caller: str, prompt: int, completion: int,
            cost: float | None) -> None:
        with self._lock:
            row = self._rows.setdefault((server, model, caller), [0, 0, 0, 0.0])
            row[0] += 1
            row[1] += prompt
            row[2] += completion
            row[3] += cost or 0.0

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {"server": s, "model": m, "caller": c, "requests": int(r[0]),
                 "prompt_tokens": int(r[1]), "completion_tokens": int(r[2]),
                 "cost": round(r[3], 8) if self._prices.get(m) else None}
                for (s, m, c), r in sorted(self._rows.items())
            ]


@dataclass(eq=False)
class _Call:
    req: GenRequest
    caller: str
    started: float
    deadline: float
    attempts: int = 0
    tried: list[str] = field(default_factory=list)
    waited: float = 0.0
    last: UpstreamFailure | None = None


class LLMRouter:
    """Everything here runs on the event loop, except `snapshot`/`command` (any thread)."""

    def __init__(
        self,
        cfg: LLMConfig,
        registry: Registry,
        metrics: LLMMetrics,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.routing = cfg.routing
        self.registry = registry
        self.metrics = metrics
        self.rng = rng or random.Random()
        rb = cfg.routing.retry_budget
        self.budget = RetryBudget(rb.ratio, rb.min_per_s, rb.window_s, clock=registry.clock)
        self.ledger = UsageLedger(cfg)
        self._session: aiohttp.ClientSession | None = None
        self.child_spec: ChildSpec | None = None  # the RouterActor, set by wiring.build_llm
        registry.listeners.append(metrics.on_transition)
        registry.listeners.append(_log_transition)
        for name in registry.servers:
            metrics.breaker_state.labels(name).set(0)

    # ---- lifecycle ---------------------------------------------------------------------------

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = new_session()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- requests ----------------------------------------------------------------------------

    def models(self) -> list[str]:
        return self.registry.models()

    def resolve(self, model: str) -> str:
        name = self.registry.resolve(model)
        if name is None:
            raise ModelNotFound(f"model {model!r} is not served by any configured LLM server",
                                param="model")
        return name

    def check(self, req: GenRequest) -> None:
        """Validation shared by every dialect; raises the client's 4xx."""
        lim = self.cfg.limits
        if req.messages is not None:
            if not req.messages:
                raise BadRequest("messages must not be empty", param="messages")
            if len(req.messages) > lim.max_messages:
                raise BadRequest(f"too many messages: {len(req.messages)} (at most "
                                 f"{lim.max_messages})", param="messages")
        elif req.prompt is None or not req.prompt.strip():
            raise BadRequest("prompt must not be empty", param="prompt")
        if req.prompt_chars > lim.max_prompt_chars:
            raise PayloadTooLarge(
                f"prompt is {req.prompt_chars} characters (at most {lim.max_prompt_chars})",
                code="prompt_too_large",
            )
        if req.server is not None:
            server = self.registry.servers.get(req.server)
            if server is None:
                raise BadRequest(f"unknown server {req.server!r}", param="server",
                                 code="unknown_server")
            if req.model not in server.info.served:
                raise BadRequest(f"server {req.server!r} does not serve model {req.model!r}",
                                 param="server", code="unknown_server")

    async def complete(self, req: GenRequest) -> Result:
        """A whole answer; retried on another server after any failure."""
        try:
            out = await self._run(req, streaming=False)
        except CitadelError as exc:
            self.metrics.outcome(req.model, exc.code)
            raise
        except asyncio.CancelledError:
            self.metrics.outcome(req.model, "cancelled")
            raise
        assert isinstance(out, Result)
        self.metrics.outcome(req.model, "ok")
        return out

    async def open_stream(self, req: GenRequest) -> LLMStream:
        """Returns at the commit point: the first generated text is in hand."""
        try:
            out = await self._run(req, streaming=True)
        except CitadelError as exc:
            self.metrics.outcome(req.model, exc.code)
            raise
        except asyncio.CancelledError:
            self.metrics.outcome(req.model, "cancelled")
            raise
        assert isinstance(out, LLMStream)
        return out

    async def _run(self, req: GenRequest, streaming: bool) -> Result | LLMStream:
        loop = asyncio.get_running_loop()
        now = loop.time()
        call = _Call(req, self.metrics.caller_label(req.caller), now,
                     now + self.routing.request_timeout_s)
        self.budget.deposit()
        while True:
            server, permit = await self._pick(call)
            info = server.info
            start = loop.time()
            total = start + info.total_s
            if not streaming:
                total = min(total, call.deadline)
            up = UpstreamCall(self.session(), info, req,
                              min(start + info.first_token_s, call.deadline), total)
            self.metrics.server(info.name).inflight.inc()
            try:
                await up.start()
                chunk = await up.next()
                if streaming:
                    return LLMStream(self, call, server, permit, up, chunk)
                parts = [chunk.text]
                while not chunk.done:
                    chunk = await up.next()
                    parts.append(chunk.text)
                self._settle_ok(server, permit, up)
                return self._result(call, server, up, chunk, "".join(parts))
            except UpstreamFailure as failure:
                up.abort()
                self._settle_fail(call, server, permit, up, failure)
                await self._before_retry(call, failure)
            except BaseException:
                up.abort()
                self._settle_release(server, permit)
                raise

    async def _pick(self, call: _Call) -> tuple[Server, Permit]:
        loop = asyncio.get_running_loop()
        req = call.req
        while True:
            got = self.registry.acquire(req.model, call.tried, req.server, self.routing.strategy)
            if got is not None:
                server = got[0]
                call.attempts += 1
                if call.tried:
                    self.metrics.retries.labels(req.model).inc()
                    if server.name != call.tried[-1]:
                        self.metrics.failovers.labels(call.tried[-1], server.name).inc()
                call.tried.append(server.name)
                return got
            blocked = self.registry.blocked(req.model)
            wait = blocked.retry_in
            remaining = call.deadline - loop.time()
            may_wait = wait is not None and wait < remaining and (
                (blocked.rate_limited and wait <= self.routing.max_retry_after_s)
                or (self.routing.when_all_open == "wait"
                    and call.waited + wait <= self.routing.max_wait_s)
            )
            if not may_wait:
                self.metrics.no_server.labels(req.model).inc()
                raise self._unavailable(call, blocked)
            assert wait is not None
            wait = max(wait, 0.005)
            call.waited += wait
            await asyncio.sleep(wait)

    async def _before_retry(self, call: _Call, failure: UpstreamFailure) -> None:
        """Return to try again, or raise what the client gets."""
        call.last = failure
        if not failure.retryable or call.attempts >= self.routing.max_attempts:
            raise self._final_error(call, failure)
        if not self.budget.try_withdraw():
            self.metrics.budget_exhausted.inc()
            raise Unavailable(
                f"retry budget exhausted (retries are capped at "
                f"{self.budget.ratio:.0%} of requests); last error: {failure}",
                code="retry_budget_exhausted", retry_after=1.0,
            )
        delay = full_jitter(call.attempts - 1, self.routing.backoff_base_s,
                            self.routing.backoff_max_s, self.rng)
        loop = asyncio.get_running_loop()
        if loop.time() + delay >= call.deadline:
            raise self._final_error(call, failure)
        if delay > 0:
            await asyncio.sleep(delay)

    # ---- outcomes ----------------------------------------------------------------------------

    def _settle_ok(self, server: Server, permit: Permit, up: UpstreamCall) -> None:
        ttft = up.ttft if up.ttft is not None else up.elapsed
        self.registry.success(server, permit, ttft)
        sm = self.metrics.server(server.name)
        sm.inflight.dec()
        sm.ok.inc()
        sm.latency.observe(up.elapsed)
        sm.ttft.observe(ttft)

    def _settle_fail(self, call: _Call, server: Server, permit: Permit, up: UpstreamCall,
                     f: UpstreamFailure) -> None:
        retry_after = None if f.retry_after is None else min(f.retry_after, MAX_COOLDOWN_S)
        self.registry.failure(server, permit, up.elapsed, f"{f.kind}: {f.message}", f.counts,
                              retry_after)
        name = server.name
        sm = self.metrics.server(name)
        sm.inflight.dec()
        (sm.failed if f.counts else sm.rejected).inc()
        sm.latency.observe(up.elapsed)
        self.metrics.failures.labels(name, f.kind).inc()
        log.info("llm attempt failed", extra={
            "server": name, "kind": f.kind, "error": f.message, "attempt": call.attempts,
            "model": call.req.model, "status": f.status,
        })

    def _settle_release(self, server: Server, permit: Permit) -> None:
        self.registry.release(server, permit)
        sm = self.metrics.server(server.name)
        sm.inflight.dec()
        sm.cancelled.inc()

    def _result(self, call: _Call, server: Server, up: UpstreamCall, final: Chunk,
                text: str) -> Result:
        req = call.req
        estimated = final.prompt_tokens is None or final.completion_tokens is None
        prompt = (final.prompt_tokens if final.prompt_tokens is not None
                  else estimate_tokens(req.prompt_chars))
        completion = final.completion_tokens if final.completion_tokens is not None else up.chunks
        cost = self.ledger.cost(req.model, prompt, completion)
        self.ledger.add(server.name, req.model, call.caller, prompt, completion, cost)
        prompt_c, completion_c, cost_c = self.metrics.usage(server.name, req.model, call.caller)
        prompt_c.inc(prompt)
        completion_c.inc(completion)
        if cost is not None:
            cost_c.inc(cost)
        loop = asyncio.get_running_loop()
        upstream_ttft = up.ttft if up.ttft is not None else up.elapsed
        return Result(
            model=req.model, server=server.name, attempts=call.attempts, tried=list(call.tried),
            text=text, finish_reason=final.finish_reason or "stop",
            usage=Usage(prompt, completion, estimated, cost, self.ledger.currency),
            ttft_s=up.started + upstream_ttft - call.started, upstream_ttft_s=upstream_ttft,
            total_s=loop.time() - call.started,
        )

    # ---- errors ------------------------------------------------------------------------------

    def _unavailable(self, call: _Call, blocked: Blocked) -> CitadelError:
        retry_after = (blocked.retry_in if blocked.retry_in is not None
                       else self.routing.default_retry_after_s)
        what = "; ".join(blocked.details) or "no server serves it"
        msg = f"no LLM server can take model {call.req.model!r} now: {what}"
        if call.last is not None:
            msg += f"; last error: {call.last}"
        if blocked.rate_limited:
            return Overloaded(msg, code="upstream_rate_limited", retry_after=retry_after)
        return Unavailable(msg, code="no_server_available", retry_after=retry_after)

    def _final_error(self, call: _Call, f: UpstreamFailure) -> CitadelError:
        tries = f" ({call.attempts} attempt{'s' if call.attempts > 1 else ''}: " \
                f"{', '.join(call.tried)})"
        if f.kind == "client":
            return CitadelError(f"upstream rejected the request: {f}", code="upstream_rejected",
                                status=413 if f.status == 413 else 400)
        if f.kind == "not_found":
            return ModelNotFound(f"model {call.req.model!r} not found upstream: {f}{tries}",
                                 param="model")
        if f.kind == "rate_limited":
            return Overloaded(f"upstream rate limit: {f}{tries}", code="upstream_rate_limited",
                              retry_after=f.retry_after or 1.0)
        if f.kind in ("connect", "connect_timeout"):
            blocked = self.registry.blocked(call.req.model)
            return Unavailable(f"LLM server unreachable: {f}{tries}", code="upstream_unreachable",
                               retry_after=blocked.retry_in or 1.0)
        if f.kind.endswith("timeout"):
            return UpstreamTimeout(f"LLM server timed out: {f}{tries}")
        return UpstreamError(f"LLM server failed: {f}{tries}")

    # ---- operators ---------------------------------------------------------------------------

    def command(self, server: str, action: str) -> dict[str, Any]:
        """Breaker override from any thread: force_open | force_closed | reset."""
        if server not in self.registry.servers:
            raise KeyError(f"unknown LLM server {server!r}")
        return self.registry.command(server, action)

    def force_open(self, server: str) -> dict[str, Any]:
        return self.command(server, "force_open")

    def force_closed(self, server: str) -> dict[str, Any]:
        return self.command(server, "force_closed")

    def reset(self, server: str) -> dict[str, Any]:
        return self.command(server, "reset")

    def snapshot(self) -> dict[str, Any]:
        return {
            "strategy": self.routing.strategy,
            "when_all_open": self.routing.when_all_open,
            "servers": self.registry.snapshot(),
            "retry_budget": self.budget.snapshot(),
            "models": self.models(),
        }


class LLMStream:
    """A committed stream: iterate `chunks()`, always `close()` in a finally."""

    def __init__(self, router: LLMRouter, call: _Call, server: Server, permit: Permit,
                 up: UpstreamCall, first: Chunk) -> None:
        self._router = router
        self._call = call
        self._server = server
        self._permit = permit
        self._up = up
        self._first = first
        self._settled = False
        self.server = server.name
        self.attempts = call.attempts
        self.model = call.req.model
        self.result: Result | None = None

    async def chunks(self) -> AsyncIterator[str]:
        """Generated text; raises MidStreamError when the upstream fails part way."""
        router = self._router
        chunk = self._first
        try:
            while True:
                if chunk.text:
                    yield chunk.text
                if chunk.done:
                    break
                chunk = await self._up.next()
        except UpstreamFailure as f:
            self._up.abort()
            self._settled = True
            router._settle_fail(self._call, self._server, self._permit, self._up, f)
            router.metrics.outcome(self.model, "mid_stream_error")
            raise MidStreamError(f) from None
        self._settled = True
        router._settle_ok(self._server, self._permit, self._up)
        self.result = router._result(self._call, self._server, self._up, chunk, "")
        router.metrics.outcome(self.model, "ok")

    def close(self) -> None:
        """Abort the upstream unless the stream ended; a caller gone mid-stream lands here."""
        if not self._settled:
            self._settled = True
            self._up.abort()
            self._router._settle_release(self._server, self._permit)
            self._router.metrics.outcome(self.model, "cancelled")


def _log_transition(t: Transition) -> None:
    level = logging.WARNING if t.to_state.value in ("open", "forced_open") else logging.INFO
    log.log(level, "llm breaker transition", extra={
        "server": t.breaker, "from": t.from_state.value, "to": t.to_state.value,
        "reason": t.reason,
    })

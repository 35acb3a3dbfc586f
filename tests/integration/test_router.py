"""LLM router: failover, circuit breakers, retries, Retry-After, the retry budget, all-down
behaviour, routing policy and accounting, against the fake Ollama/OpenAI servers."""

from __future__ import annotations

import asyncio
import time

import pytest

from citadeld.llm.actor import RouterActor
from citadeld.llm.config import ProbeConfig
from tests.integration.llm_harness import MODEL, dead_url, fake, llm_env


async def test_failover_when_primary_refuses_connections() -> None:
    async with llm_env([("p", "ollama", dead_url()), ("s", "openai", fake("openai"))]) as env:
        r = await env.generate()
        body = await r.json()
        assert r.status == 200, body
        assert body["server"] == "s" and body["attempts"] == 2
        assert body["text"] == "Echo: hello world"
        assert r.headers["X-Citadel-Upstream"] == "s"
        assert r.headers["X-Citadel-Attempts"] == "2"
        await env.generate()
        assert env.breaker("p") == "open"  # refused connections count: the breaker trips
        r = await env.generate()
        assert r.headers["X-Citadel-Attempts"] == "1"  # open primary is skipped outright
        text = (await env.client.get("/metrics")).text
        metrics = await text()
        assert 'citadel_llm_upstream_failures_total{kind="connect",server="p"} 2.0' in metrics
        assert 'citadel_llm_failovers_total{from_server="p",to_server="s"} 2.0' in metrics
        assert 'citadel_llm_breaker_state{server="p"} 1.0' in metrics
        assert 'from_state="closed",server="p",to_state="open"' in metrics


async def test_all_down_answers_503_fast_in_every_dialect() -> None:
    async with llm_env([("a", "ollama", dead_url()), ("b", "openai", dead_url())]) as env:
        r = await env.generate()
        assert r.status == 503  # refused everywhere: attempts exhausted
        await env.generate()
        assert env.breaker("a") == "open" and env.breaker("b") == "open"
        t0 = time.perf_counter()
        r = await env.generate()
        elapsed = time.perf_counter() - t0
        body = await r.json()
        assert r.status == 503 and elapsed < 0.1
        assert body["error"]["code"] == "no_server_available"
        assert "a open (half-open in" in body["error"]["message"]
        assert 1 <= int(r.headers["Retry-After"]) <= 1  # soonest half-open: 0.3 s -> 1
        r = await env.client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        err = (await r.json())["error"]
        assert r.status == 503 and err["type"] == "server_error" and "Retry-After" in r.headers
        r = await env.client.post("/api/chat", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status == 503 and isinstance((await r.json())["error"], str)


async def test_wait_mode_waits_for_half_open_instead_of_failing() -> None:
    primary = fake("ollama")
    async with llm_env([("p", "ollama", primary)],
                       routing={"when_all_open": "wait", "max_wait_s": 2.0}) as env:
        env.registry.servers["p"].breaker.trip("test")  # OPEN for wait_open_s = 0.3 s
        assert env.breaker("p") == "open"
        t0 = time.perf_counter()
        r = await env.generate()
        elapsed = time.perf_counter() - t0
        assert r.status == 200 and (await r.json())["server"] == "p"
        assert 0.15 < elapsed < 1.0  # waited for the half-open time, then served
        assert env.breaker("p") == "closed"


async def test_wait_mode_still_bounded() -> None:
    async with llm_env([("p", "ollama", dead_url())],
                       breaker={"wait_open_s": 5, "minimum_calls": 1, "window_size": 2,
                                "wait_open_jitter": 0},
                       routing={"when_all_open": "wait", "max_wait_s": 0.5}) as env:
        await env.generate()
        assert env.breaker("p") == "open"
        t0 = time.perf_counter()
        r = await env.generate()
        assert r.status == 503 and time.perf_counter() - t0 < 0.2  # 5 s > max_wait_s: no wait
        assert int(r.headers["Retry-After"]) == 5


async def test_half_open_probes_close_the_breaker_after_recovery() -> None:
    primary, secondary = fake("ollama"), fake("openai")
    async with llm_env([("p", "ollama", primary), ("s", "openai", secondary)],
                       breaker={"window_size": 4, "minimum_calls": 2, "wait_open_s": 0.3,
                                "wait_open_jitter": 0, "half_open_calls": 2}) as env:
        primary.set_faults(error_status=500)
        for _ in range(3):
            assert (await env.generate()).status == 200  # served by s meanwhile
        assert env.breaker("p") == "open"
        primary.reset_faults()
        await asyncio.sleep(0.35)
        assert env.breaker("p") == "half_open"
        servers = [(await (await env.generate()).json())["server"] for _ in range(2)]
        assert servers == ["p", "p"]  # the two probe calls went to the recovered primary
        assert env.breaker("p") == "closed"
        snap = env.router.snapshot()["servers"]["p"]["breaker"]
        assert snap["trips"] == 0 and "half-open probes succeeded" in snap["reason"]


async def test_half_open_failure_reopens_with_longer_wait() -> None:
    primary = fake("ollama")
    async with llm_env([("p", "ollama", primary), ("s", "openai", fake("openai"))]) as env:
        primary.set_faults(error_status=502)
        for _ in range(2):
            await env.generate()
        await asyncio.sleep(0.35)
        r = await env.generate()  # the probe call fails over to s
        assert (await r.json())["server"] == "s"
        snap = env.router.snapshot()["servers"]["p"]["breaker"]
        assert snap["state"] == "open" and snap["trips"] == 2
        assert 0.5 < snap["half_open_in_s"] <= 0.6  # 0.3 * 2


async def test_429_with_retry_after_moves_traffic_and_is_honoured() -> None:
    primary, secondary = fake("ollama"), fake("openai")
    async with llm_env([("p", "ollama", primary), ("s", "openai", secondary)],
                       breaker={"window_size": 20, "minimum_calls": 20}) as env:
        primary.set_faults(error_status=429, retry_after=1, error_count=1)
        r = await env.generate()
        assert (await r.json())["server"] == "s" and r.headers["X-Citadel-Attempts"] == "2"
        for _ in range(3):  # p is cooling down for its Retry-After: not even tried
            r = await env.generate()
            assert r.headers["X-Citadel-Upstream"] == "s"
            assert r.headers["X-Citadel-Attempts"] == "1"
        assert env.calls("p") == 1
        await asyncio.sleep(1.05)
        r = await env.generate()
        assert r.headers["X-Citadel-Upstream"] == "p"


async def test_429_single_server_waits_out_a_short_retry_after() -> None:
    only = fake("ollama")
    async with llm_env([("p", "ollama", only)]) as env:
        only.set_faults(error_status=429, retry_after=0.4, error_count=1)
        t0 = time.perf_counter()
        r = await env.generate()
        assert r.status == 200 and r.headers["X-Citadel-Attempts"] == "2"
        assert time.perf_counter() - t0 >= 0.39


async def test_429_long_retry_after_goes_back_to_the_client() -> None:
    only = fake("openai")
    async with llm_env([("p", "openai", only)]) as env:
        only.set_faults(error_status=429, retry_after=30)
        t0 = time.perf_counter()
        r = await env.client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert time.perf_counter() - t0 < 0.5
        err = (await r.json())["error"]
        assert r.status == 429 and err["code"] == "upstream_rate_limited"
        assert err["type"] == "rate_limit_error"
        assert 29 <= int(r.headers["Retry-After"]) <= 30


async def test_slow_server_trips_on_slow_call_rate() -> None:
    slow, fast = fake("ollama"), fake("openai")
    async with llm_env([("slow", "ollama", slow), ("fast", "openai", fast)],
                       breaker={"window_size": 4, "minimum_calls": 2, "wait_open_s": 5,
                                "slow_call_duration_s": 0.15, "slow_call_rate_threshold": 50,
                                "failure_rate_threshold": 100}) as env:
        slow.set_faults(latency_ms=250)
        for _ in range(2):
            r = await env.generate()
            assert r.status == 200 and r.headers["X-Citadel-Upstream"] == "slow"  # slow but ok
        assert env.breaker("slow") == "open"
        assert "slow-call rate" in env.router.snapshot()["servers"]["slow"]["breaker"]["reason"]
        t0 = time.perf_counter()
        r = await env.generate()
        assert r.headers["X-Citadel-Upstream"] == "fast" and time.perf_counter() - t0 < 0.2


async def test_client_errors_are_neither_retried_nor_counted() -> None:
    primary, secondary = fake("ollama"), fake("openai")
    async with llm_env([("p", "ollama", primary), ("s", "openai", secondary)]) as env:
        primary.set_faults(error_status=400,
                           error_message="prompt is longer than the context window")
        for _ in range(5):
            r = await env.generate()
            body = await r.json()
            assert r.status == 400 and body["error"]["code"] == "upstream_rejected"
            assert "context window" in body["error"]["message"]
        assert env.breaker("p") == "closed" and env.calls("s") == 0
        primary.set_faults(error_status=413)
        r = await env.generate()
        assert r.status == 413


async def test_model_missing_on_one_server_fails_over_without_tripping() -> None:
    primary = fake("ollama", chat_models=["other"])  # configured for MODEL, but lacks it
    async with llm_env([("p", "ollama", primary), ("s", "openai", fake("openai"))]) as env:
        for _ in range(3):
            r = await env.generate()
            assert r.headers["X-Citadel-Upstream"] == "s"
        assert env.breaker("p") == "closed"


async def test_retry_budget_stops_retries() -> None:
    async with llm_env([("p", "ollama", dead_url()), ("s", "openai", dead_url())],
                       breaker={"minimum_calls": 50, "window_size": 50},
                       routing={"max_attempts": 2,
                                "retry_budget": {"ratio": 0.0, "min_per_s": 0.1,
                                                 "window_s": 10}}) as env:
        r = await env.generate()  # one retry allowed (0.1/s over 10 s)
        assert r.status == 503 and (await r.json())["error"]["code"] == "upstream_unreachable"
        r = await env.generate()
        body = await r.json()
        assert r.status == 503 and body["error"]["code"] == "retry_budget_exhausted"
        metrics = await (await env.client.get("/metrics")).text()
        assert "citadel_llm_retry_budget_exhausted_total 1.0" in metrics


async def test_hang_after_headers_fails_over_on_first_token_deadline() -> None:
    primary = fake("ollama")
    async with llm_env([("p", "ollama", primary), ("s", "openai", fake("openai"))],
                       per_server={"p": {"timeouts": {"first_token_s": 0.3}}}) as env:
        primary.set_faults(hang_after_headers=True)
        t0 = time.perf_counter()
        r = await env.generate(stream=False)
        assert r.status == 200 and r.headers["X-Citadel-Upstream"] == "s"
        assert 0.3 <= time.perf_counter() - t0 < 1.5
        snap = env.router.snapshot()["servers"]["p"]["breaker"]
        assert snap["last_failure"].startswith("first_token_timeout")
        primary.reset_faults()


async def test_priority_preference_and_weights() -> None:
    a, b, c = fake("ollama"), fake("ollama"), fake("openai")
    async with llm_env([("a", "ollama", a), ("b", "ollama", b), ("c", "openai", c)],
                       per_server={"a": {"priority": 0, "weight": 3},
                                   "b": {"priority": 0, "weight": 1},
                                   "c": {"priority": 5}}) as env:
        served = [(await env.generate()).headers["X-Citadel-Upstream"] for _ in range(60)]
        assert set(served) == {"a", "b"}  # c has a worse priority: idle while a/b are fine
        assert served.count("a") > served.count("b")
        r = await env.generate(server="c")  # a preference, not a pin
        assert r.headers["X-Citadel-Upstream"] == "c"
        env.router.force_open("c")
        r = await env.generate(server="c")
        assert r.headers["X-Citadel-Upstream"] in ("a", "b")


async def test_least_busy_spreads_concurrent_requests() -> None:
    a, b = fake("ollama", chunk_delay_ms=50), fake("ollama", chunk_delay_ms=50)
    async with llm_env([("a", "ollama", a), ("b", "ollama", b)],
                       per_server={"b": {"priority": 0}},
                       routing={"strategy": "least_busy"}) as env:
        rs = await asyncio.gather(*(env.generate("one two three") for _ in range(10)))
        served = [r.headers["X-Citadel-Upstream"] for r in rs]
        assert abs(served.count("a") - served.count("b")) <= 2


async def test_lowest_latency_prefers_the_faster_server() -> None:
    slow, quick = fake("ollama"), fake("ollama")
    async with llm_env([("slow", "ollama", slow), ("quick", "ollama", quick)],
                       per_server={"quick": {"priority": 0}},
                       routing={"strategy": "lowest_latency"}) as env:
        slow.set_faults(latency_ms=60)
        served = [(await env.generate()).headers["X-Citadel-Upstream"] for _ in range(10)]
        assert served[-5:] == ["quick"] * 5  # measured both, then sticks to the faster


async def test_operator_overrides() -> None:
    primary = fake("ollama")
    async with llm_env([("p", "ollama", primary), ("s", "openai", fake("openai"))]) as env:
        env.router.force_open("p")
        assert env.breaker("p") == "forced_open"
        r = await env.generate()
        assert r.headers["X-Citadel-Upstream"] == "s"
        env.router.force_closed("s")
        env.router.force_open("p")
        assert env.breaker("s") == "forced_closed"
        env.router.reset("p")
        env.router.reset("s")
        assert env.breaker("p") == env.breaker("s") == "closed"
        with pytest.raises(KeyError):
            env.router.force_open("nope")
        r = await env.generate()
        assert r.headers["X-Citadel-Upstream"] == "p"
        detailed = await (await env.client.get("/api/v1/llm/servers")).json()
        assert detailed["servers"]["p"]["breaker"]["reason"] == "reset by operator"


async def test_usage_accounting_with_prices() -> None:
    async with llm_env([("p", "ollama", fake("ollama"))],
                       models={MODEL: {"price_per_1k_prompt": 1.0,
                                       "price_per_1k_completion": 2.0}}) as env:
        r = await env.client.post("/api/v1/llm/generate", headers={"X-Citadel-Caller": "team-a"},
                                  json={"model": MODEL, "prompt": "one two three"})
        usage = (await r.json())["usage"]
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
        assert usage["estimated"] is False
        expect = (usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1000
        assert usage["cost"] == pytest.approx(expect)
        r = await env.client.post("/v1/chat/completions", json={
            "model": MODEL, "user": "team-b", "messages": [{"role": "user", "content": "x"}]})
        assert (await r.json())["usage"]["total_tokens"] > 0
        rows = (await (await env.client.get("/api/v1/llm/usage")).json())["rows"]
        assert {(row["caller"], row["server"], row["requests"]) for row in rows} == {
            ("team-a", "p", 1), ("team-b", "p", 1)}
        metrics = await (await env.client.get("/metrics")).text()
        assert ('citadel_llm_tokens_total{caller="team-a",kind="completion",model="llama3.2",'
                'server="p"}') in metrics
        assert 'citadel_llm_cost_total{caller="team-a",model="llama3.2",server="p"}' in metrics
        assert 'citadel_llm_time_to_first_token_seconds_count{server="p"} 2.0' in metrics


async def test_models_are_listed_and_aliases_resolve() -> None:
    async with llm_env([("p", "ollama", fake("ollama"))],
                       models={MODEL: {"aliases": ["llama"]}}) as env:
        ids = [m["id"] for m in (await (await env.client.get("/v1/models")).json())["data"]]
        assert MODEL in ids and "all-minilm" in ids
        tags = [m["name"] for m in (await (await env.client.get("/api/tags")).json())["models"]]
        assert f"{MODEL}:latest" in tags
        r = await env.client.post("/api/v1/llm/generate", json={"model": "llama",
                                                                 "prompt": "hi"})
        assert r.status == 200 and (await r.json())["model"] == MODEL
        r = await env.client.post("/api/v1/llm/generate", json={"model": f"{MODEL}:latest",
                                                                 "prompt": "hi"})
        assert r.status == 200


async def test_router_actor_probes_trip_dead_servers_and_feed_health() -> None:
    live = fake("ollama", chat_models=["other"])  # up, but without the configured model
    async with llm_env([("dead", "ollama", dead_url()), ("live", "ollama", live)]) as env:
        health = env.state.health
        probes = ProbeConfig(interval_s=0.1, timeout_s=0.5, failures_to_open=2)
        actor = RouterActor.start(env.registry, probes, env.router.metrics, env.metrics, health)
        try:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                if env.breaker("dead") == "open" and health.get("llm:live") is not None:
                    break
            assert env.breaker("dead") == "open"  # no traffic at all: the probes did it
            assert "health probe failed" in env.router.snapshot()["servers"]["dead"][
                "breaker"]["reason"]
            dead, ok = health.get("llm:dead"), health.get("llm:live")
            assert dead is not None and dead["status"] == "down" and dead["breaker"] == "open"
            assert ok is not None and ok["status"] == "ok"
            assert ok["missing_models"] == [f"{MODEL}"]
            assert env.breaker("live") == "closed"
            detailed = await (await env.client.get("/health/detailed")).json()
            assert detailed["llm"]["servers"]["live"]["probe"]["ok"] is True
        finally:
            actor.stop()

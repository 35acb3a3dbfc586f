"""LLM routes: streaming and its commit point, broken upstream streams, bad input, client
disconnects, and the official openai/ollama async clients, in all three dialects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import ollama
import openai
import orjson
import pytest
from aiohttp import web

from tests.integration.llm_harness import MODEL, Env, dead_url, fake, llm_env

LONG = " ".join(f"w{i}" for i in range(40))


async def until(cond: Callable[[], bool], limit_s: float = 3.0) -> None:
    deadline = time.monotonic() + limit_s
    while not cond() and time.monotonic() < deadline:  # noqa: ASYNC110 (polling foreign state)
        await asyncio.sleep(0.02)


def ndjson(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


def sse(text: str) -> list[Any]:
    out: list[Any] = []
    for block in text.split("\n\n"):
        block = block.strip()
        if block:
            assert block.startswith("data: "), block
            data = block[6:]
            out.append(data if data == "[DONE]" else orjson.loads(data))
    return out


async def native_stream(env: Env, prompt: str = "hello there world") -> tuple[Any, list[Any]]:
    r = await env.client.post("/api/v1/llm/generate",
                              json={"model": MODEL, "prompt": prompt, "stream": True})
    return r, ndjson(await r.text())


async def openai_stream(env: Env, prompt: str = "hello there world") -> tuple[Any, list[Any]]:
    r = await env.client.post("/v1/chat/completions", json={
        "model": MODEL, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": prompt}]})
    return r, sse(await r.text())


async def ollama_stream(env: Env, prompt: str = "hello there world") -> tuple[Any, list[Any]]:
    r = await env.client.post("/api/chat", json={
        "model": MODEL, "messages": [{"role": "user", "content": prompt}]})
    return r, ndjson(await r.text())


Streamer = Callable[[Env, str], Awaitable[tuple[Any, list[Any]]]]


def text_of(kind: str, events: list[Any]) -> str:
    if kind == "native":
        return "".join(e.get("text", "") for e in events if e["type"] == "delta")
    if kind == "openai":
        return "".join((e["choices"][0]["delta"].get("content") or "") for e in events
                       if isinstance(e, dict) and e.get("choices"))
    return "".join(e.get("message", {}).get("content", "") for e in events)


STREAMERS: list[tuple[str, Streamer]] = [
    ("native", native_stream), ("openai", openai_stream), ("ollama", ollama_stream)]


# ---- happy streams and the commit point ------------------------------------------------------


@pytest.mark.parametrize(("kind", "streamer"), STREAMERS)
async def test_streams_are_well_formed(kind: str, streamer: Streamer) -> None:
    async with llm_env([("p", "ollama", fake("ollama")), ("s", "openai", fake("openai"))]) as env:
        r, events = await streamer(env, "hello there world")
        assert r.status == 200 and r.headers["X-Citadel-Upstream"] == "p"
        assert text_of(kind, events) == "Echo: hello there world"
        if kind == "native":
            assert r.content_type == "application/x-ndjson"
            assert events[-1]["type"] == "done" and events[-1]["server"] == "p"
            assert events[-1]["usage"]["completion_tokens"] == 4
        elif kind == "openai":
            assert r.content_type == "text/event-stream"
            assert events[0]["choices"][0]["delta"]["role"] == "assistant"
            assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 4
            assert events[-3]["choices"][0]["finish_reason"] == "stop"
        else:
            assert events[-1]["done"] is True and events[-1]["eval_count"] == 4


@pytest.mark.parametrize(("kind", "streamer"), STREAMERS)
@pytest.mark.parametrize("fault", [
    {"error_line_mid_stream": 0},  # HTTP 200, an error line before any text
    {"drop_after_chunks": 0},  # headers, then the connection closes
    {"error_status": 503},
    {"drop": True},
])
async def test_failures_before_the_first_byte_fail_over_transparently(
    kind: str, streamer: Streamer, fault: dict[str, Any]
) -> None:
    primary = fake("ollama")
    async with llm_env([("p", "ollama", primary), ("s", "openai", fake("openai"))]) as env:
        primary.set_faults(**fault)
        r, events = await streamer(env, "hello there world")
        assert r.status == 200
        assert r.headers["X-Citadel-Upstream"] == "s" and r.headers["X-Citadel-Attempts"] == "2"
        assert text_of(kind, events) == "Echo: hello there world"


@pytest.mark.parametrize(("kind", "streamer"), STREAMERS)
@pytest.mark.parametrize("fault", [{"error_line_mid_stream": 2}, {"drop_after_chunks": 2}])
async def test_failures_after_the_first_byte_end_with_an_error_event(
    kind: str, streamer: Streamer, fault: dict[str, Any]
) -> None:
    primary = fake("ollama")
    async with llm_env([("p", "ollama", primary), ("s", "openai", fake("openai"))]) as env:
        primary.set_faults(**fault)
        r, events = await streamer(env, "hello there world")
        assert r.status == 200 and r.headers["X-Citadel-Upstream"] == "p"
        last = events[-1]
        assert text_of(kind, events).startswith("Echo: ")
        if kind == "native":
            assert last["type"] == "error" and last["error"]["code"] == "upstream_error"
            assert "after it started" in last["error"]["message"]
        elif kind == "openai":
            assert last["error"]["type"] == "server_error" and "[DONE]" not in events
        else:
            assert set(last) == {"error"} and "after it started" in last["error"]
        assert env.calls("s") == 0  # committed: no second server


async def test_non_stream_requests_retry_after_mid_stream_failures() -> None:
    primary = fake("ollama")
    async with llm_env([("p", "ollama", primary), ("s", "openai", fake("openai"))]) as env:
        for fault in ({"error_line_mid_stream": 2}, {"drop_after_chunks": 2}):
            primary.set_faults(**fault)
            r = await env.generate("hello there world")
            body = await r.json()
            assert r.status == 200 and body["server"] == "s", body
            assert body["text"] == "Echo: hello there world"


async def test_idle_timeout_mid_stream() -> None:
    slow = fake("ollama", chunk_delay_ms=800)
    async with llm_env([("p", "ollama", slow), ("s", "openai", fake("openai"))],
                       per_server={"p": {"timeouts": {"idle_s": 0.3, "first_token_s": 2}}}) as env:
        t0 = time.perf_counter()
        r, events = await native_stream(env)
        assert events[0] == {"type": "delta", "text": "Echo: "}
        assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "upstream_timeout"
        assert "silent" in events[-1]["error"]["message"]
        assert time.perf_counter() - t0 < 1.5
        r = await env.generate()  # not committed: another server finishes the answer
        assert (await r.json())["server"] == "s"


# ---- malformed upstream streams ---------------------------------------------------------------


@asynccontextmanager
async def bad_server(body: bytes, status: int = 200,
                     content_type: str = "application/x-ndjson") -> AsyncIterator[str]:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(status=status)
        resp.content_type = content_type
        await resp.prepare(request)
        await resp.write(body)
        await resp.write_eof()
        return resp

    app = web.Application()
    for path in ("/api/chat", "/api/generate", "/v1/chat/completions"):
        app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


GOOD_LINE = b'{"message":{"role":"assistant","content":"Hi "},"done":false}\n'


@pytest.mark.parametrize("body", [
    b"this is not json\n",
    b"<html><body>502 Bad Gateway</body></html>",
    b'{"message":{"content":42},"done":false}\n',
    b"",  # 200 with an empty body: truncated before anything
])
async def test_malformed_streams_before_the_first_byte_fail_over(body: bytes) -> None:
    async with bad_server(body) as url, llm_env(
            [("bad", "ollama", url), ("s", "openai", fake("openai"))]) as env:
        r, events = await native_stream(env)
        assert r.headers["X-Citadel-Upstream"] == "s"
        assert events[-1]["type"] == "done"
        snap = env.router.snapshot()["servers"]["bad"]["breaker"]
        assert snap["last_failure"].split(":")[0] in ("protocol", "truncated")


@pytest.mark.parametrize("tail", [b"garbage\n", b'{"message":{"content":"x"}'])
async def test_malformed_streams_after_the_first_byte_end_with_an_error(tail: bytes) -> None:
    async with bad_server(GOOD_LINE + tail) as url, llm_env(
            [("bad", "ollama", url), ("s", "openai", fake("openai"))]) as env:
        r, events = await native_stream(env)
        assert r.headers["X-Citadel-Upstream"] == "bad"
        assert events[0] == {"type": "delta", "text": "Hi "}
        assert events[-1]["type"] == "error"
        r, events = await openai_stream(env)
        assert "error" in events[-1] and "[DONE]" not in events


async def test_malformed_openai_sse_fails_over() -> None:
    async with bad_server(b"data: {oops\n\n", content_type="text/event-stream") as url, \
            llm_env([("bad", "openai", url), ("s", "ollama", fake("ollama"))]) as env:
        r = await env.generate()
        assert (await r.json())["server"] == "s"


# ---- client goes away --------------------------------------------------------------------------


async def test_client_disconnect_cancels_the_upstream_request() -> None:
    slow = fake("ollama", chunk_delay_ms=100)
    async with llm_env([("p", "ollama", slow)]) as env:
        url = env.client.make_url("/api/v1/llm/generate")
        async with aiohttp.ClientSession() as session:
            resp = await session.post(url, json={"model": MODEL, "prompt": LONG,
                                                 "stream": True})
            first = await resp.content.readline()
            assert orjson.loads(first)["type"] == "delta"
            assert slow.stats.in_flight == 1
            resp.close()  # the client hangs up mid-stream
        await until(lambda: slow.stats.in_flight == 0)
        assert slow.stats.in_flight == 0  # the upstream handler was cancelled too
        assert env.registry.servers["p"].inflight == 0
        snap = env.router.snapshot()["servers"]["p"]
        assert snap["breaker"]["window_calls"] == 0  # not the server's fault: not recorded
        metrics = await (await env.client.get("/metrics")).text()
        assert 'citadel_llm_upstream_attempts_total{outcome="cancelled",server="p"} 1.0' \
            in metrics


async def test_client_disconnect_before_the_first_byte() -> None:
    primary = fake("ollama")
    async with llm_env([("p", "ollama", primary)]) as env:
        primary.set_faults(hang_after_headers=True)
        url = env.client.make_url("/api/v1/llm/generate")
        async with aiohttp.ClientSession() as session:
            with pytest.raises(asyncio.TimeoutError):
                async with asyncio.timeout(0.3):
                    await session.post(url, json={"model": MODEL, "prompt": "x",
                                                  "stream": True})
        await until(lambda: env.registry.servers["p"].inflight == 0)
        assert env.registry.servers["p"].inflight == 0
        assert env.breaker("p") == "closed"
        primary.reset_faults()


# ---- bad input -------------------------------------------------------------------------------


async def test_unknown_model_is_404_in_each_dialect() -> None:
    async with llm_env([("p", "ollama", fake("ollama"))]) as env:
        r = await env.client.post("/api/v1/llm/generate", json={"model": "nope", "prompt": "x"})
        assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"
        r = await env.client.post("/v1/chat/completions", json={
            "model": "nope", "messages": [{"role": "user", "content": "x"}]})
        err = (await r.json())["error"]
        assert r.status == 404 and err["code"] == "model_not_found" and err["param"] == "model"
        r = await env.client.post("/api/chat", json={"model": "nope", "messages": []})
        assert r.status == 404
        assert (await r.json()) == {"error": 'model "nope" not found, try pulling it first'}


@pytest.mark.parametrize(("path", "body", "status", "needle"), [
    ("/api/v1/llm/generate", {"model": MODEL, "messages": []}, 400, "messages must not be empty"),
    ("/api/v1/llm/generate", {"model": MODEL, "prompt": "  "}, 400, "prompt must not be empty"),
    ("/api/v1/llm/generate", {"model": MODEL}, 400, "exactly one of prompt or messages"),
    ("/api/v1/llm/generate", {"model": MODEL, "prompt": "x", "messages": []}, 400,
     "exactly one"),
    ("/api/v1/llm/generate", {"model": MODEL, "prompt": "x", "server": "zz"}, 400,
     "unknown server"),
    ("/api/v1/llm/generate", {"model": MODEL, "prompt": "x", "temperature": 1}, 400,
     "must not contain"),
    ("/api/v1/llm/generate", {"model": MODEL, "prompt": "x" * 5000}, 413, "at most 4000"),
    ("/api/v1/llm/generate", {"model": MODEL, "prompt": "x" * 70000}, 413, "65536"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages must not be empty"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "n": 2}, 400, "n > 1"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "text only"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "must be array"),
    ("/api/chat", {"model": MODEL, "messages": []}, 400, "messages must not be empty"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x",
                                                 "images": ["aGk="]}]}, 400, "images"),
    ("/api/generate", {"model": MODEL, "prompt": ""}, 400, "prompt must not be empty"),
    ("/api/generate", {"model": MODEL, "prompt": "x", "format": {"type": "object"}}, 400,
     "format"),
])
async def test_bad_input(path: str, body: dict[str, Any], status: int, needle: str) -> None:
    async with llm_env([("p", "ollama", fake("ollama"))],
                       limits={"max_prompt_chars": 4000}) as env:
        r = await env.client.post(path, json=body)
        data = await r.json()
        message = data["error"] if isinstance(data["error"], str) else data["error"]["message"]
        assert r.status == status, data
        assert needle in message, message
        assert env.calls("p") == 0


async def test_invalid_json_and_empty_body() -> None:
    async with llm_env([("p", "ollama", fake("ollama"))]) as env:
        r = await env.client.post("/v1/chat/completions", data=b"{nope")
        assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"
        r = await env.client.post("/api/generate", data=b"")
        assert r.status == 400 and "empty" in (await r.json())["error"]


async def test_no_llm_servers_configured() -> None:
    async with llm_env([("p", "ollama", fake("ollama"))]) as env:
        env.state.llm = None
        r = await env.client.post("/api/chat", json={"model": MODEL, "messages": []})
        assert r.status == 404
        assert (await (await env.client.get("/api/v1/llm/servers")).json())["servers"] == {}


# ---- official clients ------------------------------------------------------------------------


async def test_official_openai_async_client() -> None:
    primary = fake("ollama")
    async with llm_env([("p", "ollama", primary), ("s", "openai", fake("openai"))]) as env:
        client = openai.AsyncOpenAI(base_url=str(env.client.make_url("/v1")), api_key="unused",
                                    max_retries=0)
        resp = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi there"}])
        assert resp.choices[0].message.content == "Echo: hi there"
        assert resp.usage is not None and resp.usage.completion_tokens == 3
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi there"}], stream=True,
            stream_options={"include_usage": True})
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(parts) == "Echo: hi there"
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert raw.headers["x-citadel-upstream"] == "p"
        primary.set_faults(error_line_mid_stream=2)
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "a b c d"}], stream=True)
        with pytest.raises(openai.APIError, match="after it started"):
            async for _ in stream:
                pass
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "x"}])
        models = [m.id async for m in client.models.list()]
        assert MODEL in models
        await client.close()


async def test_official_ollama_async_client() -> None:
    primary = fake("ollama")
    async with llm_env([("p", "ollama", primary), ("s", "openai", fake("openai"))]) as env:
        client = ollama.AsyncClient(host=str(env.client.make_url("")), timeout=10)
        resp = await client.chat(model=MODEL, messages=[{"role": "user", "content": "hi x"}])
        assert resp.message.content == "Echo: hi x" and resp.done
        assert resp.eval_count == 3
        parts = [p.message.content async for p in await client.chat(
            model=MODEL, messages=[{"role": "user", "content": "hi x"}], stream=True)]
        assert "".join(p or "" for p in parts) == "Echo: hi x"
        gen = await client.generate(model=f"{MODEL}:latest", prompt="yo there")
        assert gen.response == "Echo: yo there"
        primary.set_faults(error_line_mid_stream=2)
        with pytest.raises(ollama.ResponseError, match="after it started"):
            async for _ in await client.generate(model=MODEL, prompt="a b c d", stream=True):
                pass
        primary.reset_faults()
        with pytest.raises(ollama.ResponseError) as err:
            await client.chat(model="nope", messages=[{"role": "user", "content": "x"}])
        assert err.value.status_code == 404
        names = [m.model for m in (await client.list()).models]
        assert f"{MODEL}:latest" in names


async def test_all_servers_down_stream_request_gets_503_not_a_broken_stream() -> None:
    async with llm_env([("a", "ollama", dead_url())]) as env:
        for _ in range(3):
            r = await env.client.post("/v1/chat/completions", json={
                "model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x"}]})
            assert r.status == 503 and r.content_type == "application/json"
            assert "Retry-After" in r.headers

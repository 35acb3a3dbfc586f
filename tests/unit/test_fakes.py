"""The fake Ollama / OpenAI servers behave like the real ones, and their faults fire as promised.

The daemon's resilience tests are only as good as these fakes, so the official clients are used
where possible. In-process servers use hash vectors; the one test about semantics talks to a fake
run as a subprocess with the real model, started at import time: importing torch and
sentence-transformers costs ~12 s of CPU, which then overlaps with the other tests on another
core instead of competing with them for this process's GIL.
"""

from __future__ import annotations

from tests.fakes.process import start_fake, start_fake_background, stop_fake

_MODEL_FAKE = start_fake_background("ollama", "--fake-vectors", "model", timeout=300)

import asyncio  # noqa: E402
import base64  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections.abc import AsyncIterator, Iterator, Sequence  # noqa: E402

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
import ollama  # noqa: E402
import openai  # noqa: E402
import pytest  # noqa: E402
from openai.types.chat import ChatCompletionMessageParam  # noqa: E402

from tests.fakes import minilm  # noqa: E402
from tests.fakes.ollama import FakeOllama  # noqa: E402
from tests.fakes.openai_compat import FakeOpenAI  # noqa: E402


@pytest.fixture(scope="module")
def model_ollama_url() -> Iterator[str]:
    """URL of the real-model Ollama fake; the model loads once for the whole module."""
    proc, port = _MODEL_FAKE.result(timeout=300)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_fake(proc)


@pytest.fixture
async def oll() -> AsyncIterator[FakeOllama]:
    server = FakeOllama(fake_vectors=True)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def oai() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI(fake_vectors=True)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def embed_body(inputs: list[str] | str, model: str = "all-minilm") -> dict[str, object]:
    return {"model": model, "input": inputs}


# ----- Ollama wire format ---------------------------------------------------------------------


async def test_ollama_embed_shapes_errors_and_truncation(
    oll: FakeOllama, http: aiohttp.ClientSession
) -> None:
    client = ollama.AsyncClient(host=oll.url)
    r = await client.embed(model="all-minilm:latest", input=["one two", "three"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == 384
    assert math.isclose(float(np.linalg.norm(r.embeddings[0])), 1.0, rel_tol=1e-5)
    assert r.prompt_eval_count == (2 + 2) + (1 + 2)

    with pytest.raises(ollama.ResponseError) as exc:
        await client.embed(model="x", input="hi")
    assert exc.value.status_code == 404
    assert exc.value.error == 'model "x" not found, try pulling it first'

    async with http.post(f"{oll.url}/api/embed", json=embed_body([])) as resp:
        assert await resp.json() == {"model": "all-minilm", "embeddings": []}

    long_text = "word " * 300
    body = {**embed_body(long_text), "truncate": False}
    async with http.post(f"{oll.url}/api/embed", json=body) as resp:
        assert resp.status == 400
        assert await resp.json() == {"error": "the input length exceeds the context length"}
    async with http.post(f"{oll.url}/api/embed", json=embed_body(long_text)) as resp:
        assert resp.status == 200
        assert (await resp.json())["prompt_eval_count"] == 256 + 2

    legacy = await client.embeddings(model="all-minilm", prompt="one two")
    assert np.allclose(legacy.embedding, r.embeddings[0])


async def test_ollama_chat_streams_ndjson(oll: FakeOllama, http: aiohttp.ClientSession) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    body = {"model": "llama3.2", "messages": messages}
    async with http.post(f"{oll.url}/api/chat", json=body) as resp:
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(line) async for line in resp.content if line.strip()]
    assert all(not p["done"] for p in lines[:-1])
    assert "".join(p["message"]["content"] for p in lines) == "Echo: hello there"
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["eval_count"] == 3 and final["prompt_eval_count"] == 4
    assert {"total_duration", "eval_duration"} <= final.keys()

    client = ollama.AsyncClient(host=oll.url)
    one = await client.chat(model="llama3.2", messages=messages, stream=False)
    assert one.message.content == "Echo: hello there" and one.done
    gen = [p.response or "" async for p in await client.generate("llama3.2", "abc", stream=True)]
    assert "".join(gen) == "Echo: abc"
    tags = await client.list()
    assert {m.model for m in tags.models} == {"all-minilm:latest", "llama3.2:latest"}
    async with http.get(f"{oll.url}/api/version") as resp:
        assert await resp.json() == {"version": "0.6.0"}


# ----- OpenAI wire format ---------------------------------------------------------------------


async def test_openai_chat_streaming_and_errors(oai: FakeOpenAI) -> None:
    client = openai.AsyncOpenAI(base_url=oai.url + "/v1", api_key="x", max_retries=0)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi you"}]
    stream = await client.chat.completions.create(
        model="llama3.2",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: hi you"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3

    done = await client.chat.completions.create(model="llama3.2", messages=messages)
    assert done.choices[0].message.content == "Echo: hi you" and done.usage is not None

    with pytest.raises(openai.NotFoundError) as exc:
        await client.embeddings.create(model="nope", input="x")
    assert exc.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        await client.embeddings.create(model="all-minilm", input=[[1, 2, 3]])
    assert "all-minilm" in {m.id for m in (await client.models.list()).data}


async def test_openai_dimensions_truncate_and_renormalize(
    oai: FakeOpenAI, http: aiohttp.ClientSession
) -> None:
    body = {**embed_body(["a", "b"]), "dimensions": 16, "encoding_format": "float"}
    async with http.post(f"{oai.url}/v1/embeddings", json=body) as resp:
        data = (await resp.json())["data"]
    assert [d["index"] for d in data] == [0, 1]
    vec = np.array(data[0]["embedding"])
    assert vec.shape == (16,) and math.isclose(float(np.linalg.norm(vec)), 1.0, rel_tol=1e-5)


# ----- cost model -----------------------------------------------------------------------------


async def test_ollama_serializes_embed_calls(http: aiohttp.ClientSession) -> None:
    async with FakeOllama(fake_vectors=True, base_ms=50) as server:
        t0 = time.perf_counter()
        statuses = await asyncio.gather(
            *(_post_status(http, f"{server.url}/api/embed", embed_body(t)) for t in "ab")
        )
        elapsed = time.perf_counter() - t0
        assert statuses == [200, 200]
        assert elapsed >= 0.1
        assert server.stats.max_in_flight == 1


async def test_openai_is_concurrent_by_default(http: aiohttp.ClientSession) -> None:
    async with FakeOpenAI(fake_vectors=True, base_ms=100) as server:
        await asyncio.gather(
            *(_post_status(http, f"{server.url}/v1/embeddings", embed_body(t)) for t in "ab")
        )
        assert server.stats.max_in_flight == 2


async def test_max_queue_answers_503_busy(http: aiohttp.ClientSession) -> None:
    async with FakeOllama(fake_vectors=True, base_ms=200, max_queue=1) as server:

        async def call(text: str) -> tuple[int, str | None, dict[str, str]]:
            async with http.post(f"{server.url}/api/embed", json=embed_body(text)) as resp:
                return resp.status, resp.headers.get("Retry-After"), await resp.json()

        results = await asyncio.gather(*(call(t) for t in "abc"))
    busy = [r for r in results if r[0] == 503]
    assert sorted(r[0] for r in results) == [200, 200, 503]
    assert busy[0][1] is not None
    assert busy[0][2] == {
        "error": "server busy, please try again.  maximum pending requests exceeded"
    }


async def _post_status(http: aiohttp.ClientSession, url: str, body: object) -> int:
    async with http.post(url, json=body) as resp:
        await resp.read()
        return resp.status


# ----- faults ---------------------------------------------------------------------------------


async def test_error_fault_with_retry_after_is_scoped_and_counted(
    oll: FakeOllama, oai: FakeOpenAI, http: aiohttp.ClientSession
) -> None:
    fault = {"error_status": 503, "error_count": 2, "retry_after": 1.5, "route": "/api/embed"}
    async with http.post(f"{oll.url}/_fault", json=fault) as resp:
        assert resp.status == 200
    async with http.get(f"{oll.url}/api/tags") as resp:  # outside the route: unaffected
        assert resp.status == 200
    for _ in range(2):
        async with http.post(f"{oll.url}/api/embed", json=embed_body("x")) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1.5"
            assert "error" in await resp.json()
    assert await _post_status(http, f"{oll.url}/api/embed", embed_body("x")) == 200

    oai.set_faults(error_status=429, retry_after=2)
    async with http.post(f"{oai.url}/v1/embeddings", json=embed_body("x")) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "2"
        err = (await resp.json())["error"]
        assert {"message", "type", "param", "code"} <= err.keys()

    async with http.post(f"{oll.url}/_fault", json={"error_code": 1}) as resp:  # typo
        assert resp.status == 400


async def test_drop_fault_disconnects_the_client(
    oll: FakeOllama, http: aiohttp.ClientSession
) -> None:
    oll.set_faults(drop=True, route="/api/embed")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with http.post(f"{oll.url}/api/embed", json=embed_body("x")) as resp:
            await resp.read()
    oll.reset_faults()
    assert await _post_status(http, f"{oll.url}/api/embed", embed_body("x")) == 200


async def test_nan_fault_writes_literal_nan(
    oll: FakeOllama, oai: FakeOpenAI, http: aiohttp.ClientSession
) -> None:
    oll.set_faults(nan=True)
    async with http.post(f"{oll.url}/api/embed", json=embed_body(["x", "y"])) as resp:
        text = await resp.text()
    assert text.count("NaN") == 1
    vectors = json.loads(text)["embeddings"]
    assert math.isnan(vectors[0][0]) and not any(math.isnan(v) for v in vectors[1])

    oai.set_faults(nan=True)
    client = openai.AsyncOpenAI(base_url=oai.url + "/v1", api_key="x", max_retries=0)
    r = await client.embeddings.create(model="all-minilm", input=["x"])  # base64
    assert math.isnan(r.data[0].embedding[0])


async def test_hang_holds_until_reset(oll: FakeOllama, http: aiohttp.ClientSession) -> None:
    oll.set_faults(hang=True)
    task = asyncio.create_task(_post_status(http, f"{oll.url}/api/embed", embed_body("x")))
    await asyncio.sleep(0.2)
    assert not task.done()
    async with http.post(f"{oll.url}/_fault/reset") as resp:
        assert resp.status == 200
    assert await asyncio.wait_for(task, 5) == 200

    oll.set_faults(hang=True)  # a server stopped while holding a request must not wait on it
    task = asyncio.create_task(_post_status(http, f"{oll.url}/api/embed", embed_body("x")))
    await asyncio.sleep(0.1)
    t0 = time.perf_counter()
    await asyncio.wait_for(oll.stop(), 5)
    assert time.perf_counter() - t0 < 1.0
    await asyncio.gather(task, return_exceptions=True)


async def test_hang_after_headers(oai: FakeOpenAI, http: aiohttp.ClientSession) -> None:
    oai.set_faults(hang_after_headers=True)
    async with http.post(f"{oai.url}/v1/embeddings", json=embed_body("x")) as resp:
        assert resp.status == 200
        body = asyncio.create_task(resp.read())
        await asyncio.sleep(0.2)
        assert not body.done()
        oai.reset_faults()
        assert json.loads(await asyncio.wait_for(body, 5))["object"] == "list"


async def test_stream_faults(oll: FakeOllama, oai: FakeOpenAI, http: aiohttp.ClientSession) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "a b c d e"}]
    body = {"model": "llama3.2", "messages": messages}
    oll.set_faults(drop_after_chunks=2)
    got: list[bytes] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(f"{oll.url}/api/chat", json=body) as resp:
            assert resp.status == 200
            async for line in resp.content:
                got.append(line)
    assert len(got) == 2

    oll.set_faults(error_line_mid_stream=True, error_message="boom")
    client = ollama.AsyncClient(host=oll.url)
    with pytest.raises(ollama.ResponseError, match="boom"):
        async for _ in await client.chat(model="llama3.2", messages=messages, stream=True):
            pass

    oai.set_faults(error_line_mid_stream=2)
    oclient = openai.AsyncOpenAI(base_url=oai.url + "/v1", api_key="x", max_retries=0)
    stream = await oclient.chat.completions.create(
        model="llama3.2",
        messages=messages,
        stream=True,
    )
    with pytest.raises(openai.APIError, match="injected fault"):
        async for _ in stream:
            pass


async def test_stats_record_calls_and_batch_sizes(
    oll: FakeOllama, http: aiohttp.ClientSession
) -> None:
    for batch in (["a", "b", "c"], ["d"], []):
        assert await _post_status(http, f"{oll.url}/api/embed", embed_body(batch)) == 200
    async with http.get(f"{oll.url}/_stats") as resp:
        stats = await resp.json()
    assert stats["batch_sizes"] == [3, 1, 0]
    assert stats["calls"] == {"/api/embed": 3}
    async with http.post(f"{oll.url}/_stats/reset") as resp:
        assert (await resp.json())["batch_sizes"] == []


# ----- subprocess -----------------------------------------------------------------------------


async def test_runs_as_a_process(http: aiohttp.ClientSession) -> None:
    proc, port = await asyncio.to_thread(
        start_fake, "tests.fakes.ollama", "--fake-vectors", "hash", "--base-ms", "1"
    )
    try:
        async with http.get(f"http://127.0.0.1:{port}/api/version") as resp:
            assert await resp.json() == {"version": "0.6.0"}
        url = f"http://127.0.0.1:{port}/api/embed"
        assert await _post_status(http, url, embed_body(["a", "b"])) == 200
    finally:
        assert await asyncio.to_thread(stop_fake, proc) == 0


# ----- vectors --------------------------------------------------------------------------------


def test_minilm_hash_mode_and_memo() -> None:
    hashed = minilm.MiniLM(fake_vectors=True)
    a, b, a2 = hashed.embed_array(["a", "b", "a"])
    assert np.array_equal(a, a2) and not np.allclose(a, b)
    assert a.shape == (384,) and math.isclose(float(np.linalg.norm(a)), 1.0, rel_tol=1e-5)

    class CountingModel:
        calls: list[list[str]] = []

        def encode(self, texts: list[str], **_: object) -> np.ndarray:
            self.calls.append(list(texts))
            return np.stack([minilm.hash_vector(t) for t in texts])

    memo = minilm.MiniLM(fake_vectors=False)
    memo._model = CountingModel()
    memo.embed(["x", "y"])
    first = memo.embed(["y", "z", "x"])
    assert CountingModel.calls == [["x", "y"], ["z"]]
    first[0][0] = 42.0  # callers get fresh lists: the memo is not corrupted
    assert memo.embed(["y"])[0][0] != 42.0


async def test_openai_client_base64_matches_float(
    oai: FakeOpenAI, http: aiohttp.ClientSession
) -> None:
    client = openai.AsyncOpenAI(base_url=oai.url + "/v1", api_key="x", max_retries=0)
    texts = ["a cat sat on the mat", "quarterly tax filing deadline"]
    b64 = await client.embeddings.create(model="all-minilm", input=texts)  # base64 on the wire
    flt = await client.embeddings.create(model="all-minilm", input=texts, encoding_format="float")
    assert b64.usage.prompt_tokens == flt.usage.prompt_tokens == (6 + 2) + (4 + 2)
    for a, b in zip(b64.data, flt.data, strict=True):
        assert len(a.embedding) == 384
        assert np.array_equal(
            np.asarray(a.embedding, dtype=np.float32), np.asarray(b.embedding, dtype=np.float32)
        )
    body = {**embed_body(texts[0]), "encoding_format": "base64"}
    async with http.post(f"{oai.url}/v1/embeddings", json=body) as resp:
        raw = (await resp.json())["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(raw), dtype="<f4")
    assert np.array_equal(decoded, np.asarray(flt.data[0].embedding, dtype=np.float32))


def _cos(a: Sequence[float], b: Sequence[float]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


async def test_ollama_client_gets_semantic_minilm_vectors(model_ollama_url: str) -> None:
    """Last, so the real-model fake has had the longest to start."""
    client = ollama.AsyncClient(host=model_ollama_url)
    texts = ["a cat sat on the mat", "a kitten rested on the rug", "quarterly tax filing deadline"]
    r = await client.embed(model="all-minilm", input=texts)
    cat, kitten, tax = r.embeddings
    assert len(cat) == 384
    assert math.isclose(float(np.linalg.norm(cat)), 1.0, rel_tol=1e-4)
    assert _cos(cat, kitten) > _cos(cat, tax) + 0.2

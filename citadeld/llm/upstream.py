"""Upstream LLM calls: Ollama NDJSON (`/api/chat`, `/api/generate`) and OpenAI SSE
(`/v1/chat/completions`), over one shared aiohttp session on the front's event loop.

Why raw aiohttp and not `ollama.AsyncClient`/`openai.AsyncOpenAI`: the router needs to see the
first byte (the commit point) and to time each phase separately (TCP connect, first token,
silence between chunks, whole attempt), to tell a refused connection from a 5xx from a
malformed line from a stream that just stops, and to abort the upstream request the moment
its caller goes away. The official clients hide those phases behind one timeout and one
exception type, and bring an httpx stack of their own; aiohttp is already the front's
client and server, costs no thread, and its streams are plain line readers.

Every request is sent with `stream: true`, even for callers that asked for one JSON answer:
then a hung server is caught by the first-token deadline instead of the total one, time to
first token is measured for every call (it is what the breaker's slow-call rate looks at),
and a non-streaming caller's answer can still be retried elsewhere after a mid-stream failure.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from citadeld.llm.config import LLMServerConfig

MAX_LINE = 1 << 20  # a longer line without a newline is not a stream we understand

# How each failure kind counts: (breaker failure?, retry on another server?)
FAILURE_KINDS: dict[str, tuple[bool, bool]] = {
    "connect": (True, True),  # refused, unreachable, DNS
    "connect_timeout": (True, True),
    "first_token_timeout": (True, True),  # no generated text in time (incl. hang after headers)
    "idle_timeout": (True, True),  # silence between chunks
    "total_timeout": (True, True),
    "disconnect": (True, True),  # connection closed or reset before the stream's end
    "status": (True, True),  # 5xx, 408
    "rate_limited": (True, True),  # 429
    "auth": (True, True),  # 401/403: our key for this server is wrong; another may work
    "protocol": (True, True),  # not NDJSON/SSE/JSON, or not the expected shape
    "stream_error": (True, True),  # HTTP 200, then an error line in the stream
    "truncated": (True, True),  # the stream ended without its final message
    "not_found": (False, True),  # 404: this server lacks the model; says nothing of health
    "client": (False, False),  # other 4xx: the request itself is bad (context too long...)
}


class UpstreamFailure(Exception):
    def __init__(
        self,
        kind: str,
        message: str,
        *,
        server: str = "",
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        assert kind in FAILURE_KINDS, kind
        self.kind = kind
        self.message = message
        self.server = server
        self.status = status
        self.retry_after = retry_after

    @property
    def counts(self) -> bool:
        """A breaker failure."""
        return FAILURE_KINDS[self.kind][0]

    @property
    def retryable(self) -> bool:
        return FAILURE_KINDS[self.kind][1]

    def __str__(self) -> str:
        return f"{self.server}: {self.message}" if self.server else self.message


@dataclass(slots=True)
class GenParams:
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    json_mode: bool = False


@dataclass
class GenRequest:
    """One generation request, whatever dialect it came in."""

    model: str  # canonical client-facing name
    requested_model: str  # as the client spelled it (echoed in answers)
    messages: list[dict[str, str]] | None = None  # [{"role", "content"}], text only
    prompt: str | None = None
    system: str | None = None
    params: GenParams = field(default_factory=GenParams)
    ollama_options: dict[str, Any] = field(default_factory=dict)  # passed to Ollama servers
    stream: bool = False
    server: str | None = None  # preferred server
    caller: str = "anonymous"
    prompt_chars: int = 0


@dataclass(slots=True)
class Chunk:
    text: str = ""
    done: bool = False
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass
class ServerInfo:
    """What a call needs of a server (immutable after config)."""

    name: str
    kind: str
    url: str
    api_key: str | None
    served: dict[str, str]  # canonical model -> upstream name
    connect_s: float
    first_token_s: float
    idle_s: float
    total_s: float
    keep_alive: str | None
    headers: dict[str, str] = field(init=False)
    client_timeout: aiohttp.ClientTimeout = field(init=False)

    def __post_init__(self) -> None:  # built once, not per request
        self.headers = {"Content-Type": "application/json"}
        if self.api_key:
            self.headers["Authorization"] = f"Bearer {self.api_key}"
        self.client_timeout = aiohttp.ClientTimeout(total=None, connect=None,
                                                    sock_connect=self.connect_s)

    @classmethod
    def from_config(cls, s: LLMServerConfig) -> ServerInfo:
        t = s.timeouts
        return cls(s.name, s.kind, s.url, s.api_key, s.served(), t.connect_s, t.first_token_s,
                   t.idle_s, t.total_s, s.keep_alive)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds, or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_text(raw: bytes) -> str:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:300].decode("utf-8", "replace").strip() or "(empty body)"
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, str):
            return err
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(obj.get("message"), str):
            return str(obj["message"])
    return raw[:300].decode("utf-8", "replace")


def classify_status(status: int) -> str:
    if status == 429:
        return "rate_limited"
    if status in (401, 403):
        return "auth"
    if status == 404:
        return "not_found"
    if status == 408 or status >= 500:
        return "status"
    return "client"


# ---- request bodies ---------------------------------------------------------------------------


def _ollama_options(req: GenRequest) -> dict[str, Any]:
    opts = dict(req.ollama_options)
    p = req.params
    for key, value in (("temperature", p.temperature), ("top_p", p.top_p), ("seed", p.seed),
                       ("stop", p.stop), ("num_predict", p.max_tokens),
                       ("frequency_penalty", p.frequency_penalty),
                       ("presence_penalty", p.presence_penalty)):
        if value is not None:
            opts[key] = value
    return opts


def ollama_request(server: ServerInfo, req: GenRequest) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": server.served[req.model], "stream": True}
    if req.messages is not None:
        path = "/api/chat"
        body["messages"] = req.messages
    else:
        path = "/api/generate"
        body["prompt"] = req.prompt or ""
        if req.system:
            body["system"] = req.system
    opts = _ollama_options(req)
    if opts:
        body["options"] = opts
    if req.params.json_mode:
        body["format"] = "json"
    if server.keep_alive is not None:
        body["keep_alive"] = server.keep_alive
    return path, body


def openai_request(server: ServerInfo, req: GenRequest) -> tuple[str, dict[str, Any]]:
    if req.messages is not None:
        messages = req.messages
    else:
        messages = [{"role": "system", "content": req.system}] if req.system else []
        messages.append({"role": "user", "content": req.prompt or ""})
    body: dict[str, Any] = {
        "model": server.served[req.model],
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    p = req.params
    for key, value in (("temperature", p.temperature), ("top_p", p.top_p), ("seed", p.seed),
                       ("stop", p.stop), ("max_tokens", p.max_tokens),
                       ("frequency_penalty", p.frequency_penalty),
                       ("presence_penalty", p.presence_penalty)):
        if value is not None:
            body[key] = value
    if p.json_mode:
        body["response_format"] = {"type": "json_object"}
    return "/v1/chat/completions", body


# ---- stream parsers ---------------------------------------------------------------------------


class OllamaParser:
    """NDJSON: one object per line; `{"error": ...}` is a failure; `done: true` ends it."""

    def __init__(self, server: str) -> None:
        self.server = server

    def feed(self, line: bytes) -> Chunk | None:
        line = line.strip()
        if not line:
            return None
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise UpstreamFailure("protocol", f"malformed NDJSON line: {line[:120]!r}",
                                  server=self.server) from None
        if not isinstance(obj, dict):
            raise UpstreamFailure("protocol", "NDJSON line is not an object", server=self.server)
        err = obj.get("error")
        if err:
            raise UpstreamFailure("stream_error", f"error in stream: {err}", server=self.server)
        msg = obj.get("message")
        text = msg.get("content") if isinstance(msg, dict) else obj.get("response")
        if text is not None and not isinstance(text, str):
            raise UpstreamFailure("protocol", "content is not a string", server=self.server)
        if obj.get("done") is True:
            return Chunk(
                text=text or "", done=True, finish_reason=_finish(obj.get("done_reason")),
                prompt_tokens=_int(obj.get("prompt_eval_count")),
                completion_tokens=_int(obj.get("eval_count")),
            )
        return Chunk(text=text or "")

    def at_eof(self) -> Chunk:
        raise UpstreamFailure("truncated", "stream closed before its final message",
                              server=self.server)


class OpenAIParser:
    """SSE: `data: {...}` events, blank-line separated, ending with `data: [DONE]`."""

    def __init__(self, server: str) -> None:
        self.server = server
        self._data: list[bytes] = []
        self.finish_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def feed(self, line: bytes) -> Chunk | None:
        line = line.rstrip(b"\r\n")
        if line:
            if line.startswith(b"data:"):
                data = line[5:]
                self._data.append(data[1:] if data.startswith(b" ") else data)
            elif not line.startswith((b":", b"event:", b"id:", b"retry:")):
                raise UpstreamFailure("protocol", f"malformed SSE line: {line[:120]!r}",
                                      server=self.server)
            return None
        if not self._data:
            return None
        data = b"\n".join(self._data)
        self._data = []
        return self._event(data)

    def _event(self, data: bytes) -> Chunk | None:
        if data.strip() == b"[DONE]":
            return Chunk(done=True, finish_reason=self.finish_reason or "stop",
                         prompt_tokens=self.prompt_tokens,
                         completion_tokens=self.completion_tokens)
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamFailure("protocol", f"malformed SSE data: {data[:120]!r}",
                                  server=self.server) from None
        if not isinstance(obj, dict):
            raise UpstreamFailure("protocol", "SSE data is not an object", server=self.server)
        if obj.get("error"):
            raise UpstreamFailure("stream_error", f"error in stream: {_error_text(data)}",
                                  server=self.server)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = _int(usage.get("prompt_tokens"))
            self.completion_tokens = _int(usage.get("completion_tokens"))
        choices = obj.get("choices")
        if not isinstance(choices, list):
            raise UpstreamFailure("protocol", "chunk without choices", server=self.server)
        if not choices:
            return None
        first = choices[0]
        if not isinstance(first, dict):
            raise UpstreamFailure("protocol", "choice is not an object", server=self.server)
        if first.get("finish_reason"):
            self.finish_reason = _finish(first.get("finish_reason"))
        delta = first.get("delta") or {}
        text = delta.get("content") if isinstance(delta, dict) else None
        if text is not None and not isinstance(text, str):
            raise UpstreamFailure("protocol", "delta content is not a string", server=self.server)
        return Chunk(text=text) if text else None

    def at_eof(self) -> Chunk:
        if self._data:  # a last event without its blank line
            chunk = self.feed(b"")
            if chunk is not None and chunk.done:
                return chunk
        if self.finish_reason is not None:  # finished, only [DONE] missing: accept
            return Chunk(done=True, finish_reason=self.finish_reason,
                         prompt_tokens=self.prompt_tokens,
                         completion_tokens=self.completion_tokens)
        raise UpstreamFailure("truncated", "stream closed before [DONE]", server=self.server)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _finish(v: Any) -> str:
    return v if v in ("stop", "length", "tool_calls", "content_filter") else "stop"


# ---- one attempt --------------------------------------------------------------------------------


class UpstreamCall:
    """One attempt at one server: `start()`, then `next()` until it returns a done chunk.

    `first_deadline` bounds the time to the first generated text (headers included),
    `total_deadline` the whole attempt; both are `loop.time()` values. `abort()` closes the
    connection at once (used on failure and when the caller goes away); a stream read to its
    end returns its connection to the pool.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        server: ServerInfo,
        req: GenRequest,
        first_deadline: float,
        total_deadline: float,
    ) -> None:
        self.session = session
        self.server = server
        self.req = req
        self.first_deadline = first_deadline
        self.total_deadline = total_deadline
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.ttft: float | None = None  # seconds from start to first text
        self.chunks = 0  # non-empty text chunks
        self._resp: aiohttp.ClientResponse | None = None
        self._parser: OllamaParser | OpenAIParser = (
            OllamaParser(server.name) if server.kind == "ollama" else OpenAIParser(server.name)
        )
        self._done = False
        self._buf = b""
        self._pos = 0
        self._eof = False

    def _fail(self, kind: str, message: str, **kw: Any) -> UpstreamFailure:
        return UpstreamFailure(kind, message, server=self.server.name, **kw)

    async def start(self) -> None:
        s = self.server
        if s.kind == "ollama":
            path, body = ollama_request(s, self.req)
        else:
            path, body = openai_request(s, self.req)
        deadline = min(self.first_deadline, self.total_deadline)
        try:
            async with asyncio.timeout_at(deadline):
                try:
                    resp = await self.session.post(
                        s.url + path, data=orjson.dumps(body), headers=s.headers,
                        timeout=s.client_timeout,
                    )
                except aiohttp.ConnectionTimeoutError:
                    raise self._fail("connect_timeout",
                                     f"no TCP connection within {s.connect_s:g}s") from None
                except aiohttp.ClientConnectorError as exc:
                    raise self._fail("connect", f"cannot connect: {exc.os_error}") from None
                except aiohttp.ClientError as exc:
                    raise self._fail("disconnect", f"connection failed: {exc!r}") from None
                self._resp = resp
                if resp.status != 200:
                    try:
                        raw = await resp.content.read(65536)
                    except aiohttp.ClientError:
                        raw = b""
                    resp.close()
                    kind = classify_status(resp.status)
                    raise self._fail(
                        kind, f"HTTP {resp.status}: {_error_text(raw)}", status=resp.status,
                        retry_after=parse_retry_after(resp.headers.get("Retry-After")),
                    )
        except TimeoutError:
            self.abort()
            raise self._timeout_failure(deadline) from None

    def _timeout_failure(self, deadline: float) -> UpstreamFailure:
        s = self.server
        if deadline >= self.total_deadline:
            return self._fail("total_timeout", f"attempt exceeded its {s.total_s:g}s deadline")
        if self.ttft is None:
            return self._fail("first_token_timeout",
                              f"no generated text within {s.first_token_s:g}s")
        return self._fail("idle_timeout", f"stream silent for {s.idle_s:g}s")

    async def _line(self) -> bytes:
        """The next line; b"" at the end. Reads whatever the network has (several lines at a
        time when they arrive together) under one deadline per read, not one per line."""
        while True:
            buf = self._buf
            i = buf.find(b"\n", self._pos)
            if i >= 0:
                line = buf[self._pos:i + 1]
                self._pos = i + 1
                return line
            if self._eof:
                line = buf[self._pos:]
                self._buf, self._pos = b"", 0
                return line
            if len(buf) - self._pos > MAX_LINE:
                raise self._fail("protocol", f"a stream line exceeds {MAX_LINE} bytes")
            data = await self._read()
            if data:
                self._buf = buf[self._pos:] + data if self._pos < len(buf) else data
                self._pos = 0
            else:
                self._eof = True

    async def _read(self) -> bytes:
        resp = self._resp
        assert resp is not None
        if self.ttft is None:
            deadline = self.first_deadline
        else:
            deadline = self.loop.time() + self.server.idle_s
        deadline = min(deadline, self.total_deadline)
        try:
            async with asyncio.timeout_at(deadline):
                try:
                    return await resp.content.readany()
                except aiohttp.ClientPayloadError as exc:
                    raise self._fail("disconnect", f"stream broken: {exc}") from None
                except aiohttp.ClientError as exc:
                    raise self._fail("disconnect", f"connection lost: {exc!r}") from None
        except TimeoutError:
            self.abort()
            raise self._timeout_failure(deadline) from None

    async def next(self) -> Chunk:
        """The next chunk with text, or the final one (done=True); raises UpstreamFailure."""
        assert self._resp is not None and not self._done
        parser = self._parser
        while True:
            line = await self._line()
            chunk = parser.feed(line) if line else parser.at_eof()
            if chunk is None:
                continue
            if self.ttft is None and (chunk.text or chunk.done):
                self.ttft = self.loop.time() - self.started
            if chunk.text:
                self.chunks += 1
            if chunk.done:
                self._done = True
                self._resp.release()
            return chunk

    @property
    def elapsed(self) -> float:
        return self.loop.time() - self.started

    def abort(self) -> None:
        resp, self._resp = self._resp, None
        if resp is not None and not self._done:
            resp.close()


def new_session() -> aiohttp.ClientSession:
    """One per daemon, on the front's loop; keep-alive connections to every server."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None),
        json_serialize=lambda o: orjson.dumps(o).decode(), auto_decompress=True,
        skip_auto_headers=("User-Agent",), headers={"User-Agent": "citadeld-llm-router"},
    )

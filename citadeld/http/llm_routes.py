"""LLM generation routes in the three dialects, plus the router's state and usage.

Each handler translates its wire format into one `GenRequest`, asks the `LLMRouter`, and
renders the answer (or stream) back. Errors before the first byte are `CitadelError`s that the
middleware renders in the route's dialect; after it (streams only) a `MidStreamError` becomes a
last, well-formed error event in the same dialect: an SSE `data: {"error": ...}` event for
OpenAI (which the official client raises as APIError), an `{"error": "..."}` line for Ollama
(which the ollama client raises as ResponseError), a `{"type": "error"}` line natively.

These handlers manage their own deadlines (`llm.routing.request_timeout_s` before the first
byte, the servers' `timeouts` after it), so the middleware's request timeout does not cut a
long stream short (`own_deadline`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from citadeld.errors import BadRequest, ModelNotFound
from citadeld.http.body import compile_schema, json_response, read_json
from citadeld.llm import schemas
from citadeld.llm.router import LLMRouter, LLMStream, MidStreamError, Result
from citadeld.llm.upstream import GenParams, GenRequest
from citadeld.logs import request_id
from citadeld.state import STATE

log = logging.getLogger("citadeld.http")

_native = compile_schema(schemas.NATIVE_GENERATE_REQUEST)
_openai = compile_schema(schemas.OPENAI_CHAT_REQUEST)
_ollama_chat = compile_schema(schemas.OLLAMA_CHAT_REQUEST)
_ollama_generate = compile_schema(schemas.OLLAMA_GENERATE_REQUEST)

CALLER_HEADER = "X-Citadel-Caller"
UPSTREAM_HEADER = "X-Citadel-Upstream"
ATTEMPTS_HEADER = "X-Citadel-Attempts"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def own_deadline(handler: Handler) -> Handler:
    """Mark a handler whose deadlines are its own (see the middleware)."""
    handler.own_deadline = True  # type: ignore[attr-defined]
    return handler


def _router(request: web.Request, model: str) -> LLMRouter:
    router: LLMRouter | None = getattr(request.app[STATE], "llm", None)
    if router is None:
        raise ModelNotFound(f"model {model!r} is not served: no LLM servers are configured",
                            param="model")
    return router


def _caller(request: web.Request, fallback: Any = None) -> str:
    header = request.headers.get(CALLER_HEADER)
    if header:
        return header
    return fallback if isinstance(fallback, str) and fallback else "anonymous"


def _text(content: Any, where: str) -> str:
    """Message content as text; parts other than text are refused, never silently dropped."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out = []
    for part in content:
        if part.get("type") != "text":
            raise BadRequest(f"{where}: content parts of type {part.get('type')!r} are not "
                             "supported (text only)", param="messages", code="unsupported")
        out.append(part.get("text") or "")
    return "".join(out)


def _messages(raw: list[dict[str, Any]]) -> tuple[list[dict[str, str]], int]:
    out = []
    chars = 0
    for i, m in enumerate(raw):
        if m.get("images"):
            raise BadRequest(f"messages[{i}]: images are not supported", param="messages",
                             code="unsupported")
        text = _text(m.get("content"), f"messages[{i}]")
        chars += len(text)
        out.append({"role": m["role"], "content": text})
    return out, chars


def _stop(value: Any) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def _num(o: dict[str, Any], key: str) -> Any:
    v = o.get(key)
    return v if isinstance(v, int | float) and not isinstance(v, bool) else None


def _ollama_params(options: dict[str, Any] | None, fmt: Any) -> GenParams:
    if fmt not in (None, "", "json"):
        raise BadRequest("format: only \"json\" is supported by the LLM router", param="format",
                         code="unsupported")
    if not options:
        return GenParams(json_mode=fmt == "json")
    o = options
    seed = o.get("seed")
    predict = o.get("num_predict")
    return GenParams(
        temperature=_num(o, "temperature"), top_p=_num(o, "top_p"),
        max_tokens=predict if isinstance(predict, int) and predict > 0 else None,
        stop=_stop(o.get("stop")) if isinstance(o.get("stop"), str | list) else None,
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        frequency_penalty=_num(o, "frequency_penalty"),
        presence_penalty=_num(o, "presence_penalty"), json_mode=fmt == "json",
    )


def _headers(server: str, attempts: int) -> dict[str, str]:
    return {UPSTREAM_HEADER: server, ATTEMPTS_HEADER: str(attempts)}


_iso_cache: list[Any] = [0, ""]  # [second, "YYYY-mm-ddTHH:MM:SS"]: strftime once a second


def _now_iso() -> str:
    t = time.time()
    sec = int(t)
    if _iso_cache[0] != sec:
        _iso_cache[:] = [sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))]
    return f"{_iso_cache[1]}.{int((t - sec) * 1e6):06d}Z"


# ---- renderers ------------------------------------------------------------------------------


class Renderer:
    content_type = "application/x-ndjson"

    def delta(self, text: str) -> bytes:
        raise NotImplementedError

    def done(self, result: Result) -> bytes:
        raise NotImplementedError

    def error(self, code: str, message: str) -> bytes:
        raise NotImplementedError


def _line(obj: Any) -> bytes:
    return orjson.dumps(obj) + b"\n"


def _native_meta(res: Result) -> dict[str, Any]:
    return {
        "model": res.model,
        "server": res.server,
        "finish_reason": res.finish_reason,
        "attempts": res.attempts,
        "usage": res.usage.to_json(),
        "timings": res.timings(),
        "request_id": request_id.get() or "",
    }


class NativeRenderer(Renderer):
    def delta(self, text: str) -> bytes:
        return _line({"type": "delta", "text": text})

    def done(self, result: Result) -> bytes:
        return _line({"type": "done", **_native_meta(result)})

    def error(self, code: str, message: str) -> bytes:
        return _line({"type": "error", "error": {
            "code": code, "message": message, "request_id": request_id.get() or ""}})


class OpenAIRenderer(Renderer):
    content_type = "text/event-stream"

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.first = True

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> bytes:
        obj: dict[str, Any] = {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self.include_usage:
            obj["usage"] = None
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def delta(self, text: str) -> bytes:
        if self.first:
            self.first = False
            return self._chunk({"role": "assistant", "content": text}, None)
        return self._chunk({"content": text}, None)

    def done(self, result: Result) -> bytes:
        out = self.delta("") if self.first else b""
        out += self._chunk({}, result.finish_reason)
        if self.include_usage:
            u = result.usage
            out += b"data: " + orjson.dumps({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "system_fingerprint": None, "choices": [],
                "usage": {"prompt_tokens": u.prompt_tokens,
                          "completion_tokens": u.completion_tokens,
                          "total_tokens": u.total_tokens},
            }) + b"\n\n"
        return out + b"data: [DONE]\n\n"

    def error(self, code: str, message: str) -> bytes:
        err = {"message": message, "type": "server_error", "param": None, "code": code}
        return b"data: " + orjson.dumps({"error": err}) + b"\n\n"


def _ns(seconds: float) -> int:
    return max(1, int(seconds * 1e9))


def ollama_final(res: Result, model: str, chat: bool, text: str) -> dict[str, Any]:
    obj: dict[str, Any] = {"model": model, "created_at": _now_iso()}
    if chat:
        obj["message"] = {"role": "assistant", "content": text}
    else:
        obj["response"] = text
    obj.update(
        done=True, done_reason=res.finish_reason, total_duration=_ns(res.total_s),
        load_duration=0, prompt_eval_count=res.usage.prompt_tokens,
        prompt_eval_duration=_ns(res.ttft_s), eval_count=res.usage.completion_tokens,
        eval_duration=_ns(max(0.0, res.total_s - res.ttft_s)),
    )
    return obj


class OllamaRenderer(Renderer):
    def __init__(self, model: str, chat: bool) -> None:
        self.model = model
        self.chat = chat

    def delta(self, text: str) -> bytes:
        obj: dict[str, Any] = {"model": self.model, "created_at": _now_iso()}
        if self.chat:
            obj["message"] = {"role": "assistant", "content": text}
        else:
            obj["response"] = text
        obj["done"] = False
        return _line(obj)

    def done(self, result: Result) -> bytes:
        return _line(ollama_final(result, self.model, self.chat, ""))

    def error(self, code: str, message: str) -> bytes:
        return _line({"error": message})


async def _stream(request: web.Request, router: LLMRouter, req: GenRequest,
                  renderer: Renderer) -> web.StreamResponse:
    """Hold the response until the first generated text (the commit point), then stream."""
    stream: LLMStream = await router.open_stream(req)
    try:
        resp = web.StreamResponse(status=200, headers={
            **_headers(stream.server, stream.attempts),
            "Cache-Control": "no-cache", "X-Request-ID": request_id.get() or "",
        })
        resp.content_type = renderer.content_type
        await resp.prepare(request)
        try:
            async for text in stream.chunks():
                await resp.write(renderer.delta(text))
            assert stream.result is not None
            await resp.write(renderer.done(stream.result))
        except MidStreamError as exc:
            log.warning("stream failed after its first byte",
                        extra={"server": stream.server, "error": exc.message})
            await resp.write(renderer.error(exc.code, exc.message))
        except ConnectionResetError:  # the client went away while we wrote
            return resp
        except Exception:  # a bug after the commit point: still end the stream well-formed
            log.exception("stream handler failed after its first byte")
            await resp.write(renderer.error(
                "internal_error", "internal error; see the daemon log for this request id"))
        await resp.write_eof()
        return resp
    finally:
        stream.close()


# ---- handlers -----------------------------------------------------------------------------


@own_deadline
async def native_generate(request: web.Request) -> web.StreamResponse:
    body = await read_json(request, _native)
    router = _router(request, body["model"])
    if ("prompt" in body) == ("messages" in body):
        raise BadRequest("give exactly one of prompt or messages", param="prompt")
    model = router.resolve(body["model"])
    opts = body.get("options") or {}
    params = GenParams(
        temperature=opts.get("temperature"), top_p=opts.get("top_p"),
        max_tokens=opts.get("max_tokens"), stop=_stop(opts.get("stop")), seed=opts.get("seed"),
        frequency_penalty=opts.get("frequency_penalty"),
        presence_penalty=opts.get("presence_penalty"), json_mode=bool(opts.get("json")),
    )
    req = GenRequest(model=model, requested_model=body["model"], params=params,
                     stream=bool(body.get("stream")), server=body.get("server"),
                     caller=body.get("caller") or _caller(request))
    if "messages" in body:
        req.messages, req.prompt_chars = _messages(body["messages"])
    else:
        req.prompt, req.system = body["prompt"], body.get("system")
        req.prompt_chars = len(req.prompt) + len(req.system or "")
    router.check(req)
    if req.stream:
        return await _stream(request, router, req, NativeRenderer())
    res = await router.complete(req)
    return json_response({"text": res.text, **_native_meta(res)},
                         headers=_headers(res.server, res.attempts))


@own_deadline
async def openai_chat(request: web.Request) -> web.StreamResponse:
    body = await read_json(request, _openai)
    router = _router(request, body["model"])
    model = router.resolve(body["model"])
    if (body.get("n") or 1) > 1:
        raise BadRequest("n > 1 is not supported", param="n", code="unsupported")
    if body.get("tools"):
        raise BadRequest("tools are not supported by the LLM router", param="tools",
                         code="unsupported")
    rf = body.get("response_format") or {}
    if rf.get("type") not in (None, "text", "json_object"):
        raise BadRequest(f"response_format {rf.get('type')!r} is not supported",
                         param="response_format", code="unsupported")
    messages, chars = _messages(body["messages"])
    params = GenParams(
        temperature=body.get("temperature"), top_p=body.get("top_p"),
        max_tokens=body.get("max_completion_tokens") or body.get("max_tokens"),
        stop=_stop(body.get("stop")), seed=body.get("seed"),
        frequency_penalty=body.get("frequency_penalty"),
        presence_penalty=body.get("presence_penalty"),
        json_mode=rf.get("type") == "json_object",
    )
    req = GenRequest(model=model, requested_model=body["model"], messages=messages,
                     params=params, stream=bool(body.get("stream")),
                     caller=_caller(request, body.get("user")), prompt_chars=chars)
    router.check(req)
    if req.stream:
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        return await _stream(request, router, req, OpenAIRenderer(body["model"], include))
    res = await router.complete(req)
    u = res.usage
    return json_response({
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                     "logprobs": None, "finish_reason": res.finish_reason}],
        "usage": {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                  "total_tokens": u.total_tokens},
    }, headers=_headers(res.server, res.attempts))


async def _ollama(request: web.Request, body: dict[str, Any], chat: bool
                  ) -> web.StreamResponse:
    router = _router(request, body["model"])
    try:
        model = router.resolve(body["model"])
    except ModelNotFound:  # Ollama's own wording, so Ollama clients recognise it
        raise ModelNotFound(f"model \"{body['model']}\" not found, try pulling it first",
                            param="model") from None
    if body.get("tools"):
        raise BadRequest("tools are not supported by the LLM router", param="tools",
                         code="unsupported")
    options = body.get("options") or {}
    req = GenRequest(model=model, requested_model=body["model"],
                     params=_ollama_params(options, body.get("format")),
                     ollama_options=dict(options), stream=body.get("stream", True) is not False,
                     caller=_caller(request))
    if chat:
        req.messages, req.prompt_chars = _messages(body.get("messages") or [])
    else:
        if body.get("images"):
            raise BadRequest("images are not supported", param="images", code="unsupported")
        if body.get("raw"):
            raise BadRequest("raw prompts are not supported by the LLM router", param="raw",
                             code="unsupported")
        req.prompt, req.system = body.get("prompt") or "", body.get("system")
        req.prompt_chars = len(req.prompt) + len(req.system or "")
    router.check(req)
    if req.stream:
        return await _stream(request, router, req, OllamaRenderer(body["model"], chat))
    res = await router.complete(req)
    return json_response(ollama_final(res, body["model"], chat, res.text),
                         headers=_headers(res.server, res.attempts))


@own_deadline
async def ollama_chat(request: web.Request) -> web.StreamResponse:
    return await _ollama(request, await read_json(request, _ollama_chat), chat=True)


@own_deadline
async def ollama_generate(request: web.Request) -> web.StreamResponse:
    return await _ollama(request, await read_json(request, _ollama_generate), chat=False)


async def llm_servers(request: web.Request) -> web.Response:
    router: LLMRouter | None = getattr(request.app[STATE], "llm", None)
    if router is None:
        return json_response({"servers": {}, "models": []})
    return json_response(router.snapshot())


async def llm_usage(request: web.Request) -> web.Response:
    router: LLMRouter | None = getattr(request.app[STATE], "llm", None)
    if router is None:  # the document promises a string: the configured currency
        return json_response({"currency": request.app[STATE].config.llm.currency, "rows": []})
    return json_response({"currency": router.ledger.currency, "rows": router.ledger.snapshot()})


def llm_model_ids(app_state: Any) -> list[str]:
    """LLM model names for /v1/models and /api/tags (empty without LLM servers)."""
    router: LLMRouter | None = getattr(app_state, "llm", None)
    return router.models() if router is not None else []


async def _close_router(app: web.Application) -> None:
    router: LLMRouter | None = getattr(app[STATE], "llm", None)
    if router is not None:
        await router.close()


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/llm/generate", native_generate)
    app.router.add_get("/api/v1/llm/servers", llm_servers)
    app.router.add_get("/api/v1/llm/usage", llm_usage)
    app.router.add_post("/v1/chat/completions", openai_chat)
    app.router.add_post("/api/chat", ollama_chat)
    app.router.add_post("/api/generate", ollama_generate)
    app.on_cleanup.append(_close_router)

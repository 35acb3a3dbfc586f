"""Fake OpenAI-compatible server (embeddings, chat completions, models), for tests and benches.

Why a fake: the daemon's OpenAI-dialect backend (OpenAI itself, vLLM, llama.cpp, TEI...) must be
tested against the real envelope: base64 embeddings (what the official client asks for by
default), ``dimensions``, SSE chat streams with ``[DONE]``, OpenAI's error object, and faults on
demand. Vectors are real all-MiniLM-L6-v2 embeddings (384 dims) whatever the model name.

Cost model: as the Ollama fake (``base_ms + per_input_ms * n`` per embeddings call), but
``parallel`` defaults to unlimited because hosted APIs and vLLM batch concurrent calls. Inputs
longer than the model's context (in words; see ``--context``) get OpenAI's 400
``context_length_exceeded``; token-id inputs are refused with 400.

Run: ``python -m tests.fakes.openai_compat --port 0``; it prints ``LISTENING <port>`` once bound.
Faults: see ``tests.fakes.faults``.
"""

from __future__ import annotations

import asyncio
import base64
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from aiohttp import web

from tests.fakes.faults import (
    FakeServer,
    HTTPError,
    build_parser,
    common_kwargs,
    content_text,
    dumps,
    run_cli,
    words_chunks,
)
from tests.fakes.minilm import DIM, approx_tokens

MAX_INPUTS = 2048
KNOWN_CONTEXT = {
    "all-minilm": 256,
    "text-embedding-3-small": 8191,
    "text-embedding-3-large": 8191,
    "text-embedding-ada-002": 8191,
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    429: "rate_limit_exceeded",
}


class FakeOpenAI(FakeServer):
    """In-process fake: ``await FakeOpenAI().start()``; clients use ``url + "/v1"``."""

    dialect = "openai"
    stream_content_type = "text/event-stream"

    def __init__(
        self,
        *,
        models: Iterable[str] = ("all-minilm", "text-embedding-3-small"),
        chat_models: Iterable[str] = ("llama3.2", "gpt-4o-mini"),
        parallel: int | None = None,
        api_key: str | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(models=models, chat_models=chat_models, parallel=parallel, **kw)
        self.api_key = api_key

    def context_of(self, model: str) -> int:
        return self.context.get(model) or KNOWN_CONTEXT.get(model, 8191)

    def error_body(self, err: HTTPError) -> dict[str, Any]:
        etype = ERROR_TYPES.get(err.status, "server_error" if err.status >= 500 else "api_error")
        return {
            "error": {"message": err.message, "type": etype, "param": err.param, "code": err.code}
        }

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/v1/models", self._models)
        router.add_get("/v1/models/{model}", self._model_get)
        router.add_post("/v1/embeddings", self._embeddings)
        router.add_post("/v1/chat/completions", self._chat)

    async def precheck(self, request: web.Request) -> None:
        if self.api_key is None:
            return
        if request.headers.get("Authorization", "") != f"Bearer {self.api_key}":
            raise HTTPError(401, "Incorrect API key provided.", code="invalid_api_key", param=None)

    # ----- models ---------------------------------------------------------------------------
    @property
    def served(self) -> list[str]:
        return list(dict.fromkeys(self.embed_models + self.chat_models))

    def _model_obj(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "citadel-fake"}

    def _require(self, body: Mapping[str, Any], kinds: list[str]) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise HTTPError(400, "you must provide a model parameter", param="model")
        if model not in kinds:
            if model in self.served:
                raise HTTPError(
                    400,
                    f"The model `{model}` does not support this endpoint.",
                    param="model",
                    code="model_not_supported",
                )
            raise HTTPError(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
        return model

    async def _models(self, request: web.Request) -> web.StreamResponse:
        data = [self._model_obj(m) for m in self.served]
        return await self.respond(request, {"object": "list", "data": data})

    async def _model_get(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["model"]
        if name not in self.served:
            raise HTTPError(
                404,
                f"The model `{name}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
        return await self.respond(request, self._model_obj(name))

    # ----- embeddings -------------------------------------------------------------------------
    def _inputs(self, raw: Any) -> list[str]:
        invalid = HTTPError(
            400,
            "'$.input' is invalid. Please check the API reference.",
            param="input",
            code="invalid_value",
        )
        if isinstance(raw, str):
            texts = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw):
            texts = raw
        elif (
            isinstance(raw, list)
            and raw
            and all(
                isinstance(t, int) or (isinstance(t, list) and all(isinstance(x, int) for x in t))
                for t in raw
            )
        ):
            raise HTTPError(
                400,
                "token-id inputs are not supported by this server",
                param="input",
                code="invalid_value",
            )
        else:
            raise invalid
        if any(not t for t in texts):
            raise invalid
        if len(texts) > MAX_INPUTS:
            raise HTTPError(
                400,
                f"'$.input' must have at most {MAX_INPUTS} items",
                param="input",
                code="invalid_value",
            )
        return texts

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        model = self._require(body, self.embed_models)
        texts = self._inputs(body.get("input"))
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise HTTPError(
                400, "encoding_format must be 'float' or 'base64'", param="encoding_format"
            )
        dims = body.get("dimensions")
        if dims is not None and (
            not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= DIM
        ):
            raise HTTPError(
                400, f"dimensions must be an integer between 1 and {DIM}", param="dimensions"
            )
        ctx = self.context_of(model)
        for text in texts:
            n = len(text.split())
            if n > ctx:
                raise HTTPError(
                    400,
                    f"This model's maximum context length is {ctx} tokens, however you "
                    f"requested {approx_tokens(text)} tokens. Please reduce your prompt.",
                    param="input",
                    code="context_length_exceeded",
                )
        vecs = await self.embed_vectors(request, "/v1/embeddings", texts, dims)
        has_nan = bool(np.isnan(vecs).any())
        data = []
        for i, vec in enumerate(vecs):
            emb: Any = (
                base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
                if fmt == "base64"
                else vec
            )
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = sum(approx_tokens(t) for t in texts)
        return await self.respond(
            request,
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
            allow_nan=has_nan and fmt == "float",
        )

    # ----- chat -------------------------------------------------------------------------------
    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        model = self._require(body, self.chat_models)
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) for m in messages)
        ):
            raise HTTPError(400, "'messages' must be a non-empty array", param="messages")
        last_user = next(
            (content_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"),
            "",
        )
        prompt_tokens = sum(approx_tokens(content_text(m.get("content"))) for m in messages)
        pieces = words_chunks("Echo: " + last_user)
        finish = "stop"
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and 0 < limit < len(pieces):
            pieces, finish = pieces[:limit], "length"
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(pieces),
            "total_tokens": prompt_tokens + len(pieces),
        }
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        delay = self.chunk_delay_ms / 1000
        async with self.chat_slot():
            if not body.get("stream"):
                if delay and len(pieces) > 1:
                    await asyncio.sleep(delay * (len(pieces) - 1))
                return await self.respond(
                    request,
                    {
                        "id": cid,
                        "object": "chat.completion",
                        "created": created,
                        "model": model,
                        "system_fingerprint": None,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": "".join(pieces)},
                                "logprobs": None,
                                "finish_reason": finish,
                            }
                        ],
                        "usage": usage,
                    },
                )
            opts = body.get("stream_options") or {}
            include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))

            def chunk(delta: dict[str, Any], reason: str | None) -> bytes:
                obj: dict[str, Any] = {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": None,
                    "choices": [
                        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
                    ],
                }
                if include_usage:
                    obj["usage"] = None
                return b"data: " + dumps(obj) + b"\n\n"

            events = [chunk({"role": "assistant", "content": ""}, None)]
            events += [chunk({"content": p}, None) for p in pieces]
            events.append(chunk({}, finish))
            if include_usage:
                obj = {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": None,
                    "choices": [],
                    "usage": usage,
                }
                events.append(b"data: " + dumps(obj) + b"\n\n")
            events.append(b"data: [DONE]\n\n")

            def error_event(msg: str) -> bytes:
                err = {"message": msg, "type": "server_error", "param": None, "code": None}
                return b"data: " + dumps({"error": err}) + b"\n\n"

            return await self.stream(request, events, error_event)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(
        "python -m tests.fakes.openai_compat",
        "Fake OpenAI-compatible server for tests and benchmarks.",
        parallel=0,
        models="all-minilm,text-embedding-3-small",
        chat_models="llama3.2,gpt-4o-mini",
    )
    parser.add_argument("--api-key", default=None, help="require this Bearer token")
    args = parser.parse_args(argv)
    run_cli(lambda: FakeOpenAI(api_key=args.api_key, **common_kwargs(args)), args)


if __name__ == "__main__":
    main(sys.argv[1:])

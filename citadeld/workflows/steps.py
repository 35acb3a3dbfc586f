"""What each step type does, through the daemon's own services, on the daemon's event loop.

Executors are coroutines the runner schedules on the front loop (the services are loop-side
facades); cancelling one (step timeout, workflow cancel) cancels the service call, which for a
streaming LLM step closes the stream and aborts the upstream request. Errors are sorted into
retryable (the dependency may recover: 503, 502, 504, timeouts, a stream cut short) and
final (the request itself is wrong: 400, 404, 413).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from citadeld.errors import CitadelError

Publish = Callable[[str, dict[str, Any]], Awaitable[None]]


class StepFailed(Exception):
    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


def classify(exc: BaseException) -> StepFailed:
    if isinstance(exc, StepFailed):
        return exc
    if isinstance(exc, CitadelError):
        return StepFailed(f"{exc.code}: {exc.message}", retryable=exc.status >= 500
                          or exc.status == 429)
    from citadeld.llm.router import MidStreamError
    if isinstance(exc, MidStreamError):
        return StepFailed(exc.message, retryable=True)
    if isinstance(exc, TimeoutError | ConnectionError | OSError):
        return StepFailed(f"{type(exc).__name__}: {exc}", retryable=True)
    name = type(exc).__name__
    if name in ("PersistenceUnavailable", "QdrantUnavailable"):
        return StepFailed(f"{name}: {exc}", retryable=True)
    return StepFailed(f"{name}: {exc}", retryable=False)


@dataclass
class StepContext:
    workflow_id: str
    step_id: str
    owner: str
    request_id: str | None
    publish: Publish  # (event type, data) on this loop; never raises
    max_deltas: int
    delta_interval_s: float = 0.0


class Executors:
    def __init__(self, embedding: Any, storage: Any, llm: Any) -> None:
        self.embedding = embedding
        self.storage = storage
        self.llm = llm

    def check(self, step_type: str, params: dict[str, Any]) -> None:
        """Submit-time checks against the configuration (models, services present)."""
        if step_type == "llm_query":
            if self.llm is None:
                raise StepFailed("no LLM servers are configured in this daemon", False)
            try:
                self.llm.resolve(params["model"])
            except CitadelError as exc:
                raise StepFailed(exc.message, False) from None
        elif step_type == "embedding" or "model" in params:
            model = params.get("model")
            if isinstance(model, str) and "{{" not in model:
                try:
                    self.embedding.resolve(model)
                except CitadelError as exc:
                    raise StepFailed(exc.message, False) from None
        if step_type in ("vector_search", "vector_store") and self.storage is None:
            raise StepFailed("the vector store is not configured in this daemon", False)

    async def run(self, step_type: str, params: dict[str, Any], ctx: StepContext
                  ) -> dict[str, Any]:
        fn: Callable[[dict[str, Any], StepContext], Awaitable[dict[str, Any]]] = getattr(
            self, f"_{step_type}")
        return await fn(params, ctx)

    async def _embedding(self, p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        texts = p["texts"] if "texts" in p else [p["text"]]
        out = await self.embedding.embed(p.get("model"), texts)
        # 6 decimals (abs error <= 5e-7 on unit vectors) keep the recorded state small; the
        # first vector is not stored twice: "vector" resolves to vectors.0 (spec.resolve)
        vectors = out.vectors.astype("float64").round(6).tolist()  # numpy: no Python loop
        return {"model": out.model, "dims": int(out.vectors.shape[1]), "count": len(vectors),
                "vectors": vectors}

    async def _vector_search(self, p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        res = await self.storage.service.search(
            p.get("collection"), text=p.get("text"), vector=p.get("vector"),
            model=p.get("model"), limit=p.get("limit", 10), filter=p.get("filter"),
            score_threshold=p.get("score_threshold"))
        hits = res["results"]
        return {"collection": res["collection"], "results": hits,
                "texts": [h.get("text") or "" for h in hits], "ids": [h["id"] for h in hits],
                "scores": [h.get("score") for h in hits]}

    async def _vector_store(self, p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        if "items" in p:
            items = [dict(it) for it in p["items"]]
        elif "texts" in p:
            items = [{"text": t} for t in p["texts"]]
        else:
            items = [{k: p[k] for k in ("id", "text", "vector", "metadata") if k in p}]
        for i, it in enumerate(items):  # a rerun after a crash overwrites, never duplicates
            if it.get("id") is None:
                digest = hashlib.sha256(f"{ctx.workflow_id}/{ctx.step_id}/{i}".encode())
                it["id"] = f"{ctx.workflow_id}-{ctx.step_id}-{i}-{digest.hexdigest()[:8]}"
        out = await self.storage.service.store_items(p.get("collection"), items, p.get("model"),
                                                     ctx.request_id)
        res: dict[str, Any] = out.to_json()
        return res

    async def _llm_query(self, p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        from citadeld.http.llm_routes import _stop
        from citadeld.llm.upstream import GenParams, GenRequest

        if self.llm is None:
            raise StepFailed("no LLM servers are configured in this daemon", False)
        router = self.llm
        model = router.resolve(p["model"])
        o = p.get("options") or {}
        req = GenRequest(
            model=model, requested_model=p["model"],
            params=GenParams(temperature=o.get("temperature"), top_p=o.get("top_p"),
                             max_tokens=o.get("max_tokens"), stop=_stop(o.get("stop")),
                             seed=o.get("seed")),
            stream=p.get("stream", True), server=p.get("server"),
            caller=f"workflow:{ctx.owner}")
        if "messages" in p:
            req.messages = [{"role": m["role"], "content": m["content"]} for m in p["messages"]]
            req.prompt_chars = sum(len(m["content"]) for m in req.messages)
        else:
            req.prompt, req.system = p["prompt"], p.get("system")
            req.prompt_chars = len(req.prompt or "") + len(req.system or "")
        router.check(req)
        if not req.stream:
            res = await router.complete(req)
            return _llm_output(res, res.text)
        stream = await router.open_stream(req)
        parts: list[str] = []
        sent = 0
        pending: list[str] = []
        last = -1.0

        async def flush() -> None:
            nonlocal sent, last
            if pending and sent < ctx.max_deltas:
                sent += 1
                await ctx.publish("TEXT_MESSAGE_CONTENT", {
                    "step_id": ctx.step_id, "message_id": f"{ctx.workflow_id}:{ctx.step_id}",
                    "delta": "".join(pending)})
            pending.clear()
            last = time.monotonic()

        try:
            async for text in stream.chunks():
                parts.append(text)
                pending.append(text)
                # chunks that arrive within delta_interval of the last event travel together:
                # a fast stream costs a few events, a slow one still shows every chunk at once
                if time.monotonic() - last >= ctx.delta_interval_s:
                    await flush()
            await flush()
        finally:
            stream.close()  # cancelled mid-stream: aborts the upstream request
        assert stream.result is not None
        return _llm_output(stream.result, "".join(parts))


def _llm_output(res: Any, text: str) -> dict[str, Any]:
    return {"text": text, "model": res.model, "server": res.server, "attempts": res.attempts,
            "finish_reason": res.finish_reason, "usage": res.usage.to_json(),
            "timings": res.timings(), "at": time.time()}

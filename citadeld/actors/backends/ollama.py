"""Ollama backend over the official `ollama.Client`, plus the helpers the HTTP backends share.

The whole batch goes to one `/api/embed` call (Ollama runs one input at a time, so batching
saves round-trips, not compute). Failures become `BackendError`s whose `kind` tells the pool
whether another endpoint may help; an input Ollama rejects on its own is isolated by bisection
so its batch-mates still succeed.
"""

from __future__ import annotations

import email.utils
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import httpx
import numpy as np
import ollama

from citadeld.actors.backends.base import BatchResult
from citadeld.config import EndpointConfig, ModelConfig
from citadeld.errors import BackendError

log = logging.getLogger("citadeld.embedder")

PROBE_TIMEOUT_S = 5.0
_T = TypeVar("_T")


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` is delta-seconds or an HTTP-date; anything else is ignored."""
    if not value:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        secs = when.timestamp() - time.time()
    return max(0.0, secs) if math.isfinite(secs) else None


def estimate_tokens(text: str) -> int:
    """Cheap stand-in for a tokenizer: words plus the two special tokens."""
    return len(text.split()) + 2


def distribute_tokens(total: int | None, texts: Sequence[str]) -> list[int]:
    """Split a whole-call token count over items in proportion to their estimates (largest
    remainder, so the integers sum to `total`). Without a total, the estimates themselves."""
    weights = [estimate_tokens(t) for t in texts]
    if total is None or total < 0 or not texts:
        return weights
    wsum = sum(weights)
    shares = [total * w / wsum for w in weights]
    out = [int(s) for s in shares]
    by_remainder = sorted(range(len(texts)), key=lambda i: out[i] - shares[i])
    for i in by_remainder[: total - sum(out)]:
        out[i] += 1
    return out


def finish_vectors(
    raw: Any, n: int, model: ModelConfig, endpoint: str
) -> tuple[np.ndarray, dict[int, BackendError]]:
    """Shape-check upstream vectors, flag non-finite rows alone, L2-normalise when asked."""
    try:
        arr = np.asarray(raw, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise BackendError(
            f"malformed embeddings: {exc}", kind="protocol", endpoint=endpoint
        ) from exc
    if arr.ndim != 2 or arr.shape[0] != n:
        raise BackendError(
            f"expected {n} embeddings, got shape {arr.shape}", kind="protocol", endpoint=endpoint
        )
    if arr.shape[1] != model.dims:
        raise BackendError(
            f"expected {model.dims} dims, got {arr.shape[1]}", kind="protocol", endpoint=endpoint
        )
    errors: dict[int, BackendError] = {}
    finite = np.isfinite(arr).all(axis=1)
    for i in np.flatnonzero(~finite):
        errors[int(i)] = BackendError(
            "embedding contains NaN or Inf", kind="protocol", endpoint=endpoint
        )
        arr[i] = 0.0
    if model.normalize:
        norms = np.linalg.norm(arr, axis=1, keepdims=True)
        np.divide(arr, norms, out=arr, where=norms > 0)
    return arr, errors


def embed_isolating(
    call: Callable[[list[str]], BatchResult], texts: list[str], dims: int
) -> BatchResult:
    """Run `call`; when the whole call is rejected as a client error, bisect so that only the
    offending inputs fail. Halves that succeed are embedded once; a rejection is usually
    decided before any compute upstream, so the extra calls are cheap."""
    try:
        return call(texts)
    except BackendError as exc:
        if exc.kind != "client":
            raise
        if len(texts) == 1:
            return BatchResult(np.zeros((1, dims), np.float32), [0], {0: exc})
    mid = len(texts) // 2
    left = embed_isolating(call, texts[:mid], dims)
    right = embed_isolating(call, texts[mid:], dims)
    errors = dict(left.errors)
    errors.update({mid + i: e for i, e in right.errors.items()})
    return BatchResult(
        np.concatenate([left.vectors, right.vectors]), left.tokens + right.tokens, errors
    )


def empty_result(dims: int) -> BatchResult:
    return BatchResult(np.zeros((0, dims), np.float32), [], {})


class OllamaBackend:
    """One Ollama endpoint serving one model; used from a single EmbedderActor thread."""

    def __init__(self, endpoint: EndpointConfig, model: ModelConfig, model_name: str) -> None:
        self.name = f"ollama@{endpoint.name or endpoint.url}"
        self._model = model
        self._upstream = model.upstream_model or model_name
        # ResponseError drops the headers; keep the last response's headers per thread.
        self._last = threading.local()
        headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else None
        hooks = {"response": [self._remember]}
        self._client = ollama.Client(
            host=endpoint.url,
            timeout=httpx.Timeout(model.timeout_s, connect=model.connect_timeout_s),
            headers=headers,
            event_hooks=hooks,
        )
        self._probe_client = ollama.Client(
            host=endpoint.url,
            timeout=httpx.Timeout(
                min(PROBE_TIMEOUT_S, model.timeout_s), connect=model.connect_timeout_s
            ),
            headers=headers,
            event_hooks=hooks,
        )

    def _remember(self, response: httpx.Response) -> None:
        self._last.headers = response.headers

    def embed(self, texts: list[str], truncate: bool) -> BatchResult:
        if not texts:
            return empty_result(self._model.dims)
        return embed_isolating(
            lambda part: self._embed_once(part, truncate), texts, self._model.dims
        )

    def _embed_once(self, texts: list[str], truncate: bool) -> BatchResult:
        resp = self._call(
            lambda: self._client.embed(
                model=self._upstream,
                input=texts,
                truncate=truncate,
                keep_alive=self._model.keep_alive,
            )
        )
        vectors, errors = finish_vectors(resp.embeddings, len(texts), self._model, self.name)
        return BatchResult(vectors, distribute_tokens(resp.prompt_eval_count, texts), errors)

    def probe(self) -> None:
        listing = self._call(self._probe_client.list)
        wanted = self._upstream if ":" in self._upstream else f"{self._upstream}:latest"
        names = {m.model for m in listing.models}
        if self._upstream not in names and wanted not in names:
            raise BackendError(
                f"model {self._upstream!r} not found on {self.name}",
                kind="status",
                status=404,
                endpoint=self.name,
            )

    def warm(self) -> None:
        """An empty input list makes Ollama load the model (and keep it) without computing."""
        self._call(
            lambda: self._client.embed(
                model=self._upstream, input=[], keep_alive=self._model.keep_alive
            )
        )

    def close(self) -> None:
        self._client.close()
        self._probe_client.close()

    def _call(self, fn: Callable[[], _T]) -> _T:
        self._last.headers = None
        try:
            return fn()
        except ollama.ResponseError as exc:
            raise self._status_error(exc.status_code, str(exc.error)) from exc
        except ConnectionError as exc:  # the client's rewrite of httpx.ConnectError
            raise BackendError(
                f"connection failed: {exc}", kind="connect", endpoint=self.name
            ) from exc
        except httpx.ConnectTimeout as exc:  # unreachable, nothing was sent: like refused
            raise BackendError("connect timed out", kind="connect", endpoint=self.name) from exc
        except httpx.TimeoutException as exc:
            raise BackendError(
                f"timed out ({type(exc).__name__})", kind="timeout", endpoint=self.name
            ) from exc
        except httpx.TransportError as exc:  # dropped connection, reset, DNS, bad framing
            raise BackendError(
                f"connection failed: {exc!r}", kind="connect", endpoint=self.name
            ) from exc
        except (httpx.DecodingError, ValueError) as exc:  # bad JSON or pydantic ValidationError
            raise BackendError(
                f"malformed response: {exc}", kind="protocol", endpoint=self.name
            ) from exc

    def _status_error(self, status: int, message: str) -> BackendError:
        return status_error(status, message, getattr(self._last, "headers", None), self.name)


def status_error(
    status: int, message: str, headers: httpx.Headers | None, endpoint: str
) -> BackendError:
    """400/413/422 mean the input itself is bad (never retried elsewhere); everything else is a
    status failure another endpoint may not have (404: this endpoint lacks the model)."""
    if status in (400, 413, 422):
        return BackendError(message, kind="client", status=status, endpoint=endpoint)
    retry_after = parse_retry_after(headers.get("retry-after")) if headers is not None else None
    return BackendError(
        f"HTTP {status}: {message}",
        kind="status",
        status=status,
        retry_after=retry_after,
        endpoint=endpoint,
    )

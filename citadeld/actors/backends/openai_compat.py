"""Backend for OpenAI-compatible embedding servers (TEI, Infinity, vLLM): `POST /v1/embeddings`.

The OpenAI API has no truncate flag. With `truncate` we cut each text to `max_context * 4`
characters before sending: about four characters a token in English, so it keeps most inputs
under the limit without a tokenizer here. It is an approximation: dense text (code, CJK) can
still exceed the context, and the server's rejection then fails that item alone, exactly as
with `truncate=False`, where texts go as they are.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import httpx
import numpy as np

from citadeld.actors.backends.base import BatchResult
from citadeld.actors.backends.ollama import (
    PROBE_TIMEOUT_S,
    distribute_tokens,
    embed_isolating,
    empty_result,
    finish_vectors,
    status_error,
)
from citadeld.config import EndpointConfig, ModelConfig
from citadeld.errors import BackendError

log = logging.getLogger("citadeld.embedder")

CHARS_PER_TOKEN = 4


class OpenAICompatBackend:
    """One OpenAI-compatible endpoint serving one model; used from a single actor thread."""

    def __init__(self, endpoint: EndpointConfig, model: ModelConfig, model_name: str) -> None:
        self.name = f"openai@{endpoint.name or endpoint.url}"
        self._model = model
        self._upstream = model.upstream_model or model_name
        headers = {"Accept": "application/json"}
        if endpoint.api_key:
            headers["Authorization"] = f"Bearer {endpoint.api_key}"
        self._client = httpx.Client(
            base_url=endpoint.url,
            headers=headers,
            timeout=httpx.Timeout(model.timeout_s, connect=model.connect_timeout_s),
        )
        self._probe_timeout = httpx.Timeout(
            min(PROBE_TIMEOUT_S, model.timeout_s), connect=model.connect_timeout_s
        )

    def embed(self, texts: list[str], truncate: bool) -> BatchResult:
        if not texts:
            return empty_result(self._model.dims)
        if truncate:
            limit = self._model.max_context * CHARS_PER_TOKEN
            texts = [t[:limit] for t in texts]
        return embed_isolating(self._embed_once, texts, self._model.dims)

    def _embed_once(self, texts: list[str]) -> BatchResult:
        body = {"model": self._upstream, "input": texts, "encoding_format": "float"}
        payload = self._request("POST", "/v1/embeddings", json=body)
        try:
            data = sorted(payload["data"], key=lambda d: d["index"])
            if [d["index"] for d in data] != list(range(len(texts))):
                raise ValueError(f"indices do not cover 0..{len(texts) - 1}")
            raw = [_vector(d["embedding"]) for d in data]
            usage = payload.get("usage") or {}
            total = usage.get("prompt_tokens")
            total = int(total) if total is not None else None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BackendError(
                f"malformed response: {exc!r}", kind="protocol", endpoint=self.name
            ) from exc
        vectors, errors = finish_vectors(raw, len(texts), self._model, self.name)
        return BatchResult(vectors, distribute_tokens(total, texts), errors)

    def probe(self) -> None:
        self._request("GET", "/v1/models", timeout=self._probe_timeout)

    def warm(self) -> None:
        """These servers load their model at start-up; one tiny input checks the path."""
        self._embed_once(["warm up"])

    def close(self) -> None:
        self._client.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self._client.request(method, path, **kwargs)
            if r.status_code >= 400:
                raise status_error(r.status_code, _error_message(r), r.headers, self.name)
            return r.json()
        except httpx.ConnectTimeout as exc:  # unreachable, nothing was sent: like refused
            raise BackendError("connect timed out", kind="connect", endpoint=self.name) from exc
        except httpx.TimeoutException as exc:
            raise BackendError(
                f"timed out ({type(exc).__name__})", kind="timeout", endpoint=self.name
            ) from exc
        except httpx.TransportError as exc:  # refused, DNS, dropped connection, bad framing
            raise BackendError(
                f"connection failed: {exc!r}", kind="connect", endpoint=self.name
            ) from exc
        except (httpx.DecodingError, ValueError) as exc:
            raise BackendError(
                f"malformed response: {exc}", kind="protocol", endpoint=self.name
            ) from exc


def _vector(value: Any) -> Any:
    """A float list, or base64 little-endian float32 from servers that ignore the format."""
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype="<f4")
    return value


def _error_message(r: httpx.Response) -> str:
    """OpenAI's `{"error": {"message": ...}}`, TEI's `{"error": "..."}`, else the raw text."""
    try:
        body = r.json()
    except ValueError:
        return r.text[:500] or r.reason_phrase
    if isinstance(body, dict):
        err = body.get("error", body.get("message"))
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if isinstance(body.get("detail"), str):
            return str(body["detail"])
    return r.text[:500]

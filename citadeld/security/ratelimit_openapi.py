"""The rate limits' part of /openapi.json: every route that is not exempt may answer 429.

With ``rate_limits.enabled`` any such route can refuse a caller past its limit, so each one
documents a 429 in its dialect (its own queue-full 429, where it has one, is the same answer)
with ``Retry-After`` and the RateLimit-* headers, and its successes carry the RateLimit-*
headers too. Applied whatever the config, like the other error answers: a client written
against the document must be ready for it.
"""

from __future__ import annotations

from typing import Any

from citadeld.http.errors import Dialect, dialect_of, error_body
from citadeld.security.ratelimit_audit_config import RateLimitsConfig

Json = dict[str, Any]

_PREFIX = {Dialect.NATIVE: ("Native", "NativeError"), Dialect.OPENAI: ("OpenAI", "OpenAIError"),
           Dialect.OLLAMA: ("Ollama", "OllamaError")}
_RID = "3f2c9a0e5b7d4c1e8a6f0b2d4e6a8c0f"

HEADERS: Json = {
    "RateLimitLimit": {"description": "Requests per 60 s window of the policy applied "
                                      "(IETF draft RateLimit header fields).",
                       "schema": {"type": "string"}},
    "RateLimitRemaining": {"description": "Requests that could still be made at once.",
                           "schema": {"type": "integer", "minimum": 0}},
    "RateLimitReset": {"description": "Seconds until the caller's bucket is full again.",
                       "schema": {"type": "integer", "minimum": 0}},
    "RateLimitPolicy": {"description": "`<per_min>;w=60;burst=<burst>`.",
                        "schema": {"type": "string"}},
}


def _rl_headers() -> Json:
    return {"RateLimit-Limit": {"$ref": "#/components/headers/RateLimitLimit"},
            "RateLimit-Remaining": {"$ref": "#/components/headers/RateLimitRemaining"},
            "RateLimit-Reset": {"$ref": "#/components/headers/RateLimitReset"},
            "RateLimit-Policy": {"$ref": "#/components/headers/RateLimitPolicy"}}


def _responses() -> Json:
    out: Json = {}
    for dialect, (prefix, schema) in _PREFIX.items():
        out[f"{prefix}TooManyRequests"] = {
            "description": "Too many requests: the caller is past its rate limit "
                           "(`rate_limited`), or the model's queue is full (`overloaded`). "
                           "Retry after `Retry-After` seconds.",
            "headers": {"Retry-After": {"$ref": "#/components/headers/RetryAfter"},
                        "X-Request-ID": {"$ref": "#/components/headers/XRequestID"},
                        **_rl_headers()},
            "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{schema}"},
                "example": error_body(dialect, 429, "rate_limited",
                                      "rate limit exceeded: 100 requests per minute for "
                                      "embedding routes; retry after the Retry-After seconds",
                                      None, _RID)}},
        }
    return out


def _exempt(path: str, exempt: tuple[str, ...]) -> bool:
    return any(path == e or path.startswith(e.rstrip("/") + "/") for e in exempt)


def apply(doc: Json, cfg: RateLimitsConfig | None = None) -> Json:
    """Add the 429 answers and headers to `doc` in place."""
    exempt = (cfg or RateLimitsConfig()).exempt
    comps = doc.setdefault("components", {})
    comps.setdefault("responses", {}).update(_responses())
    comps.setdefault("headers", {}).update(HEADERS)
    for path, item in doc.get("paths", {}).items():
        if _exempt(path, exempt):
            continue
        prefix = _PREFIX[dialect_of(path)][0]
        for op in item.values():
            responses = op.setdefault("responses", {})
            responses["429"] = {"$ref": f"#/components/responses/{prefix}TooManyRequests"}
            ok = responses.get("200")
            if isinstance(ok, dict) and "$ref" not in ok:
                ok.setdefault("headers", {}).update(_rl_headers())
    return doc

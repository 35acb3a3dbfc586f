"""The security part of /openapi.json: schemes, and per operation what it needs.

Derived from the same :class:`Policy` the middleware enforces, so the document says what the
daemon does: open routes carry ``security: []``; the others accept a bearer credential (API
key or JWT) or ``X-API-Key`` and document their 401 and 403 answers in their dialect.
"""

from __future__ import annotations

from typing import Any

from citadeld.http.errors import Dialect, dialect_of, error_body
from citadeld.security.config import AuthConfig
from citadeld.security.roles import OPEN, Policy

Json = dict[str, Any]

_PREFIX = {Dialect.NATIVE: ("Native", "NativeError"), Dialect.OPENAI: ("OpenAI", "OpenAIError"),
           Dialect.OLLAMA: ("Ollama", "OllamaError")}
_RID = "3f2c9a0e5b7d4c1e8a6f0b2d4e6a8c0f"
_ANSWERS = {
    401: ("Unauthorized", "No credential, or an invalid, expired or revoked one. The "
          "`WWW-Authenticate` header names the scheme.", "unauthorized", "invalid credential"),
    403: ("Forbidden", "The credential is valid but its role may not call this route.",
          "forbidden", "role 'user' may not POST this route"),
}
SCHEMES: Json = {
    "bearerAuth": {"type": "http", "scheme": "bearer",
                   "description": "An API key (`ck_<id>_<secret>`, from `citadelctl keys "
                                  "create`) or a JWT from the configured identity provider."},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                     "description": "An API key, for clients that cannot send Authorization."},
}


def _responses() -> Json:
    out: Json = {}
    for dialect, (prefix, schema) in _PREFIX.items():
        for status, (suffix, description, code, message) in _ANSWERS.items():
            out[f"{prefix}{suffix}"] = {
                "description": description,
                "headers": {
                    "WWW-Authenticate": {"description": "Bearer challenge (RFC 6750).",
                                         "schema": {"type": "string"}},
                    "X-Request-ID": {"$ref": "#/components/headers/XRequestID"}},
                "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{schema}"},
                    "example": error_body(dialect, status, code, message, None, _RID)}},
            }
    return out


def apply(doc: Json, cfg: AuthConfig | None) -> Json:
    """Add schemes and requirements to `doc` in place (nothing when auth is off)."""
    if cfg is None or not cfg.enabled:
        return doc
    policy = Policy(cfg)
    comps = doc.setdefault("components", {})
    comps["securitySchemes"] = SCHEMES
    comps.setdefault("responses", {}).update(_responses())
    doc["security"] = [{"bearerAuth": []}, {"apiKeyHeader": []}]
    for path, item in doc.get("paths", {}).items():
        prefix = _PREFIX[dialect_of(path)][0]
        for method, op in item.items():
            req = policy.decide(method.upper(), path)
            if req.rank == OPEN:
                op["security"] = []
                continue
            op.setdefault("responses", {})
            op["responses"]["401"] = {"$ref": f"#/components/responses/{prefix}Unauthorized"}
            op["responses"]["403"] = {"$ref": f"#/components/responses/{prefix}Forbidden"}
            op["description"] = (op.get("description", "") + f"\n\nNeeds role `{req.role}` "
                                 "or stronger.").strip()
    return doc

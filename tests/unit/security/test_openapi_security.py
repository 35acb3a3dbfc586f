"""/openapi.json with auth on: schemes, open operations, roles and 401/403 per dialect; still a
valid 3.1 document and a renderable 3.0 one."""

from __future__ import annotations

import fastjsonschema
from openapi_spec_validator import OpenAPIV30SpecValidator, OpenAPIV31SpecValidator, validate

from citadeld import __version__
from citadeld.http.openapi import build_openapi, downgrade_to_30
from citadeld.security.config import AuthConfig


def test_security_in_the_document() -> None:
    plain = build_openapi(__version__, ["m"])
    assert "securitySchemes" not in plain["components"] and "security" not in plain
    assert build_openapi(__version__, ["m"], AuthConfig()) == plain  # auth off: unchanged
    doc = build_openapi(__version__, ["m"], AuthConfig(enabled=True))
    validate(doc, cls=OpenAPIV31SpecValidator)
    validate(downgrade_to_30(doc), cls=OpenAPIV30SpecValidator)
    assert doc["security"] == [{"bearerAuth": []}, {"apiKeyHeader": []}]
    paths = doc["paths"]
    for open_path in ("/health", "/health/live", "/health/ready", "/metrics"):
        op = paths[open_path]["get"]
        assert op["security"] == [] and "401" not in op["responses"]
    embed = paths["/v1/embeddings"]["post"]
    assert embed["responses"]["401"] == {"$ref": "#/components/responses/OpenAIUnauthorized"}
    assert "Needs role `user`" in embed["description"]
    assert "`developer`" in paths["/health/detailed"]["get"]["description"]
    assert paths["/api/embed"]["post"]["responses"]["403"]["$ref"].endswith("OllamaForbidden")
    comps = doc["components"]
    for name, schema in (("NativeUnauthorized", "NativeError"), ("OpenAIForbidden",
                                                                  "OpenAIError"),
                         ("OllamaUnauthorized", "OllamaError")):
        media = comps["responses"][name]["content"]["application/json"]
        fastjsonschema.compile(comps["schemas"][schema])(media["example"])
        assert "WWW-Authenticate" in comps["responses"][name]["headers"]
    # open routes from the config, not a fixed list
    opened = build_openapi(__version__, ["m"], AuthConfig(enabled=True,
                                                          open_routes=["/openapi.json"]))
    assert opened["paths"]["/openapi.json"]["get"]["security"] == []
    assert opened["paths"]["/metrics"]["get"]["responses"]["401"]

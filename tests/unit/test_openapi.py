"""The OpenAPI document is valid, covers exactly the served routes, and /docs works offline."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from types import SimpleNamespace
from typing import Any, cast
from urllib.parse import urljoin

import fastjsonschema
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import OpenAPIV30SpecValidator, OpenAPIV31SpecValidator, validate

from citadeld import __version__
from citadeld.config import Config
from citadeld.http import (
    docs_routes,
    embed_routes,
    event_openapi,
    event_routes,
    health_routes,
    llm_routes,
    schemas,
    vector_routes,
    vector_schemas,
    workflow_openapi,
    workflow_routes,
)
from citadeld.http.app import build_app
from citadeld.http.openapi import build_openapi, downgrade_to_30
from citadeld.security import audit_routes
from citadeld.state import STATE

MODELS = ["all-minilm", "nomic-embed-text"]

# every (method, path) the daemon serves, as the spec must describe them
EXPECTED_ROUTES = {
    ("POST", "/api/v1/embed"),
    ("GET", "/api/v1/status"),
    ("POST", "/v1/embeddings"),
    ("GET", "/v1/models"),
    ("POST", "/api/embed"),
    ("POST", "/api/embeddings"),
    ("GET", "/api/tags"),
    ("GET", "/api/version"),
    ("GET", "/health"),
    ("GET", "/health/live"),
    ("GET", "/health/ready"),
    ("GET", "/health/detailed"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("POST", "/api/v1/llm/generate"),
    ("GET", "/api/v1/llm/servers"),
    ("GET", "/api/v1/llm/usage"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/api/chat"),
    ("POST", "/api/generate"),
    ("GET", "/api/v1/audit"),
} | vector_schemas.ROUTES | workflow_openapi.ROUTES | event_openapi.ROUTES
ERROR_SCHEMA = {"native": "NativeError", "openai": "OpenAIError", "ollama": "OllamaError"}
EMBED_ERRORS = {"400", "404", "413", "429", "502", "503", "504"}
ANNOTATIONS = {"description", "examples", "title"}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return build_openapi(__version__, MODELS)


def _served(app: web.Application) -> set[tuple[str, str]]:
    """Routes an API client calls: HEAD twins and the /docs page's own assets left out."""
    return {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD"
        and not r.resource.canonical.startswith("/docs/")
    }


def _spec_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, item in doc["paths"].items() for m in item}


def _deref(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _strip(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _strip(v) for k, v in schema.items() if k not in ANNOTATIONS}
    if isinstance(schema, list):
        return [_strip(v) for v in schema]
    return schema


# ---- the document ------------------------------------------------------------------------


def test_document_is_valid_openapi_31(doc: dict[str, Any]) -> None:
    assert doc["openapi"] == "3.1.0"
    validate(doc, cls=OpenAPIV31SpecValidator)
    validate(doc)  # and detected as 3.1 from its own version field


def test_downgraded_document_is_valid_openapi_30(doc: dict[str, Any]) -> None:
    old = downgrade_to_30(doc)
    assert old["openapi"] == "3.0.3"
    validate(old, cls=OpenAPIV30SpecValidator)
    assert _spec_routes(old) == _spec_routes(doc)
    assert "const" not in orjson.dumps(old).decode()


def test_document_is_deterministic_and_does_not_touch_schemas() -> None:
    before = orjson.dumps(schemas.NATIVE_EMBED_REQUEST)
    a = orjson.dumps(build_openapi("1.2.3", MODELS))
    b = orjson.dumps(build_openapi("1.2.3", list(MODELS)))
    assert a == b
    assert orjson.dumps(schemas.NATIVE_EMBED_REQUEST) == before


def test_info(doc: dict[str, Any]) -> None:
    assert doc["info"]["version"] == __version__
    text = doc["info"]["description"]
    assert "little-endian float32" in text
    for prefix in ("/api/v1/", "/v1/", "/api/"):
        assert prefix in text


def test_spec_covers_the_hard_coded_route_list(doc: dict[str, Any]) -> None:
    assert _spec_routes(doc) == EXPECTED_ROUTES


def test_hard_coded_list_equals_routes_the_modules_register() -> None:
    app = web.Application()
    embed_routes.add_routes(app)
    llm_routes.add_routes(app)
    vector_routes.add_routes(app)
    workflow_routes.add_routes(app)
    health_routes.add_routes(app)
    docs_routes.add_routes(app)
    audit_routes.add_routes(app)
    event_routes.add_routes(app)
    assert _served(app) == EXPECTED_ROUTES


def test_spec_covers_every_route_of_build_app(doc: dict[str, Any]) -> None:
    app = build_app(cast(Any, SimpleNamespace(config=Config())))
    assert _served(app) == _spec_routes(doc)


def test_operations(doc: dict[str, Any]) -> None:
    ids = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            ids.append(op["operationId"])
            assert op["tags"] and set(op["tags"]) <= {"native", "openai", "ollama", "health",
                                                     "docs"}
            # a websocket upgrade answers 101 (Switching Protocols), an asynchronous submit
            # (workflows) 202
            ok = "101" if path.startswith("/ws") else "200"
            assert ok in op["responses"] or "202" in op["responses"], (method, path)
            if method == "post":
                body = op["requestBody"]["content"]["application/json"]
                assert "$ref" in body["schema"]
    assert len(ids) == len(set(ids)) == len(EXPECTED_ROUTES)
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]


@pytest.mark.parametrize(
    ("path", "tag"),
    [("/api/v1/embed", "native"), ("/v1/embeddings", "openai"), ("/api/embed", "ollama"),
     ("/api/embeddings", "ollama")],
)
def test_embed_errors_use_the_dialect_envelope(doc: dict[str, Any], path: str, tag: str) -> None:
    op = doc["paths"][path]["post"]
    assert op["tags"] == [tag]
    assert EMBED_ERRORS <= set(op["responses"])
    check = fastjsonschema.compile(doc["components"]["schemas"][ERROR_SCHEMA[tag]])
    for status in EMBED_ERRORS:
        resp = _deref(doc, op["responses"][status])
        media = resp["content"]["application/json"]
        assert media["schema"] == {"$ref": f"#/components/schemas/{ERROR_SCHEMA[tag]}"}
        check(media["example"])  # the example is what errors.error_body really renders
        assert ("Retry-After" in resp["headers"]) == (status in {"429", "503"})


@pytest.mark.parametrize(
    ("path", "source"),
    [("/api/v1/embed", schemas.NATIVE_EMBED_REQUEST),
     ("/v1/embeddings", schemas.OPENAI_EMBED_REQUEST),
     ("/api/embed", schemas.OLLAMA_EMBED_REQUEST),
     ("/api/embeddings", schemas.OLLAMA_EMBEDDINGS_REQUEST)],
)
def test_request_schemas_are_the_validated_ones(
    doc: dict[str, Any], path: str, source: dict[str, Any]
) -> None:
    media = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    schema = _deref(doc, media["schema"])
    assert _strip(schema) == source  # only annotations were added
    assert schema["properties"]["model"]["examples"] == MODELS
    assert "enum" not in schema["properties"]["model"]  # aliases are valid too
    fastjsonschema.compile(source)(media["example"])


def test_native_request_keeps_text_xor_texts(doc: dict[str, Any]) -> None:
    check = fastjsonschema.compile(doc["components"]["schemas"]["NativeEmbedRequest"])
    check({"text": "a"})
    check({"texts": ["a", "b"]})
    for bad in ({}, {"text": "a", "texts": ["b"]}, {"text": "a", "extra": 1}):
        with pytest.raises(fastjsonschema.JsonSchemaValueException):
            check(bad)


def test_response_schemas_are_reused(doc: dict[str, Any]) -> None:
    comps = doc["components"]["schemas"]
    assert comps["OpenAIEmbeddingsResponse"] == schemas.OPENAI_EMBED_RESPONSE
    assert comps["NativeError"] == schemas.NATIVE_ERROR
    assert comps["OllamaError"] == schemas.OLLAMA_ERROR


# ---- served over HTTP --------------------------------------------------------------------


def _state(models: list[str]) -> Any:
    return SimpleNamespace(
        config=SimpleNamespace(embedding=SimpleNamespace(models={m: object() for m in models}))
    )


@pytest.fixture
async def client() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = web.Application()
    app[STATE] = _state(MODELS)
    docs_routes.add_routes(app)
    async with TestClient(TestServer(app)) as c:
        yield c


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)


async def test_openapi_json_is_served(
    client: TestClient[web.Request, web.Application], doc: dict[str, Any]
) -> None:
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert await resp.json() == doc
    again = await client.get("/openapi.json")
    assert await again.read() == await resp.read()


async def test_docs_page_is_self_contained(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.get("/docs")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    html = await resp.text()
    assert "http://" not in html and "https://" not in html
    parser = _Refs()
    parser.feed(html)
    assert len(parser.urls) >= 4
    expected_types = {".css": "text/css", ".js": "text/javascript", ".png": "image/png"}
    for ref in parser.urls:
        url = urljoin("/docs", ref)
        assert url.startswith("/docs/static/"), ref  # same origin, served by the daemon
        asset = await client.get(url)
        assert asset.status == 200, url
        assert asset.content_type == expected_types[url[url.rfind("."):]]
        assert "immutable" in asset.headers["Cache-Control"]
        assert len(await asset.read()) > 0


async def test_docs_page_loads_a_renderable_spec(
    client: TestClient[web.Request, web.Application], doc: dict[str, Any]
) -> None:
    html = await (await client.get("/docs")).text()
    match = re.search(r'"url": "([^"]+)"', html)
    assert match is not None
    resp = await client.get(urljoin("/docs", match.group(1)))
    assert resp.status == 200
    old = await resp.json()
    validate(old, cls=OpenAPIV30SpecValidator)  # what the bundled Swagger UI 4 can render
    assert old == downgrade_to_30(doc)


async def test_only_known_assets_are_served(
    client: TestClient[web.Request, web.Application],
) -> None:
    prefix = docs_routes.STATIC_PREFIX
    for name in ("index.html", "swagger-initializer.js", "nope.js", "..%2F__init__.py"):
        resp = await client.get(f"{prefix}/{name}")
        assert resp.status == 404, name
    assert (await client.get("/docs/static/swagger-ui.css")).status == 404


async def test_document_is_per_app_and_built_once() -> None:
    app = web.Application()
    state = _state(["other-model"])
    app[STATE] = state
    docs_routes.add_routes(app)
    async with TestClient(TestServer(app)) as c:
        first = await (await c.get("/openapi.json")).read()
        state.config.embedding.models["added-later"] = object()
        assert await (await c.get("/openapi.json")).read() == first
    schema = orjson.loads(first)["components"]["schemas"]["OllamaEmbedRequest"]
    assert schema["properties"]["model"]["examples"] == ["other-model"]

"""The fast accept test may only say "valid" where the full JSON Schema validator agrees."""

from __future__ import annotations

from typing import Any

import fastjsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citadeld.http import schemas
from citadeld.http import vector_schemas as vs
from citadeld.http.fastcheck import compile_fast


def _request_schemas() -> dict[str, dict[str, Any]]:
    out = {}
    for module in (schemas, vs):
        for name in dir(module):
            value = getattr(module, name)
            if name.endswith("_REQUEST") and isinstance(value, dict):
                out[f"{module.__name__}.{name}"] = value
    return out


SCHEMAS = _request_schemas()
KEYS = sorted({k for s in SCHEMAS.values() for k in s.get("properties", {})} | {"bogus"})

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70_000), st.integers(), st.floats(allow_nan=False),
    st.text(max_size=5), st.sampled_from(["", "all-minilm", "float", "base64", "x" * 300]),
)
values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                     st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
    max_leaves=8,
)
bodies = st.one_of(values, st.dictionaries(st.sampled_from(KEYS), values, max_size=5))


def near(schema: Any) -> st.SearchStrategy[Any]:
    """Values at and just past the edges of a property's schema, and some of other types."""
    if not isinstance(schema, dict):
        return values
    edge: list[Any] = []
    for key in ("minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems"):
        if key in schema:
            n = schema[key]
            edge += [n - 1, n, n + 1, float(n), "x" * max(0, n - 1), "x" * (n + 1)]
    edge += [*schema.get("enum", ()), "float ", "FLOAT", True, 0, 1, 1.5, None, []]
    typed = {"string": st.text(max_size=3), "integer": st.integers(-2, 5),
             "boolean": st.booleans(), "number": st.floats(allow_nan=False)}
    kind = schema.get("type")
    parts = [st.sampled_from(edge), typed.get(kind, values) if isinstance(kind, str) else values,
             values]
    for branch in schema.get("oneOf", ()):
        parts.append(near(branch))
    if "items" in schema:
        parts.append(st.lists(near(schema["items"]), max_size=3))
    return st.one_of(*parts)


def valid(schema: Any) -> st.SearchStrategy[Any]:
    """Values a simple property schema accepts (anything, for the rest)."""
    if not isinstance(schema, dict):
        return values
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "oneOf" in schema:
        return st.one_of(*[valid(b) for b in schema["oneOf"]])
    kind = schema.get("type")
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0),
                       max_size=min(schema.get("maxLength", 4), 4))
    if kind in ("integer", "number"):
        return st.integers(schema.get("minimum", -5), schema.get("maximum", 5))
    if kind == "boolean":
        return st.booleans()
    if kind == "array":
        return st.lists(valid(schema.get("items")), max_size=3)
    return values


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_fast_accept_implies_schema_accepts(name: str, data: st.DataObject) -> None:
    schema = SCHEMAS[name]
    props = schema.get("properties", {})
    # a body the schema would accept, often with one property pushed to or past an edge
    keys = set(schema.get("required", ()))
    if schema.get("oneOf"):
        keys |= set(data.draw(st.sampled_from([b["required"] for b in schema["oneOf"]])))
    keys |= set(data.draw(st.lists(st.sampled_from(sorted(props) or ["bogus"]), max_size=3)))
    body = {k: data.draw(valid(props.get(k))) for k in keys}
    if props and data.draw(st.booleans()):
        k = data.draw(st.sampled_from(sorted(props)))
        body[k] = data.draw(near(props[k]))
    if data.draw(st.integers(0, 9)) == 0:
        body = data.draw(bodies)
    if compile_fast(schema)(body):
        fastjsonschema.compile(schema)(body)  # raises if the fast test let a bad body through


@pytest.mark.parametrize(("schema", "body"), [
    (schemas.NATIVE_EMBED_REQUEST, {"text": "a cat", "model": "all-minilm"}),
    (schemas.NATIVE_EMBED_REQUEST, {"texts": ["a", "b"], "cache": False, "dimensions": 64}),
    (schemas.OPENAI_EMBED_REQUEST, {"input": ["a"], "model": "m", "encoding_format": "base64"}),
    (schemas.OLLAMA_EMBED_REQUEST, {"model": "all-minilm", "input": "a", "truncate": True}),
])
def test_common_bodies_take_the_fast_path(schema: dict[str, Any], body: Any) -> None:
    assert compile_fast(schema)(body)


@pytest.mark.parametrize("body", [
    {"text": "a", "texts": ["b"]},  # oneOf: both
    {},  # oneOf: neither
    {"text": None}, {"text": "a", "model": ""}, {"text": "a", "dimensions": True},
    {"text": "a", "dimensions": 0}, {"text": "a", "extra": 1}, ["text"], "text",
])
def test_doubtful_bodies_go_to_the_full_validator(body: Any) -> None:
    assert not compile_fast(schemas.NATIVE_EMBED_REQUEST)(body)


def test_unknown_keywords_disable_the_fast_path() -> None:
    check = compile_fast({"type": "object", "properties": {"a": {"type": "string"}},
                          "patternProperties": {"^x": {"type": "string"}}})
    assert not check({"a": "b"})
    with_default = compile_fast({"type": "object",
                                 "properties": {"a": {"type": "string", "default": "z"}}})
    assert not with_default({"a": "b"})  # fastjsonschema fills defaults: it must run

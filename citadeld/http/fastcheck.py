"""A fast accept test compiled from a request's JSON Schema, tried before the full validator.

fastjsonschema's generated code costs ~10 us per embedding request here (every keyword checked
in turn, and a ``oneOf`` raises and catches an exception for the branch that fails) - a tenth
of a cache hit's whole budget. Request bodies are nearly always small, well-formed objects of
plain strings, booleans and integers, so this module compiles the simple part of a schema into a
few ``type() is`` tests. It answers only "certainly valid" (True) or "don't know" (False); on
False the full validator runs and produces the error message, so the schema stays the single
source of truth and nothing it rejects is ever let through (a property test checks exactly
that). Keywords it does not understand make it give up on the whole schema (always False).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], bool]
Spec = tuple[int, Any, Any]
_STR, _BOOL, _CALL = 0, 1, 2
_ABSENT: Any = object()

# keywords with no bearing on validity. Not "default": fastjsonschema writes defaults into the
# body, which handlers may rely on, so a schema with one is never simple.
_ANNOTATIONS = frozenset({"description", "title", "examples", "$comment", "deprecated",
                          "readOnly", "writeOnly"})


def _never(_: Any) -> bool:
    return False


def compile_fast(schema: dict[str, Any]) -> Check:
    """``check(body) -> bool``: True only for bodies the schema certainly accepts."""
    check = _object(schema)
    return check if check is not None else _never


def _keys(schema: dict[str, Any], allowed: set[str]) -> bool:
    return set(schema) - _ANNOTATIONS <= allowed


def _value(schema: Any) -> Check | None:
    """A check for one property's schema, or None when it is not a simple one."""
    if not isinstance(schema, dict):
        return None
    if "oneOf" in schema and _keys(schema, {"oneOf"}):
        branches = [_value(b) for b in schema["oneOf"]]
        if not branches or any(b is None for b in branches):
            return None
        ok = [b for b in branches if b is not None]
        return lambda v: sum(1 for b in ok if b(v)) == 1
    if "enum" in schema and _keys(schema, {"enum"}):
        values = schema["enum"]
        if not all(type(x) is str for x in values):  # 1 == True == 1.0: keep enums of strings
            return None
        allowed = frozenset(values)
        return lambda v: type(v) is str and v in allowed
    scalar = _scalar(schema)
    if scalar is not None:
        tag, lo, hi = scalar
        if tag == _STR:
            return lambda v: type(v) is str and lo <= len(v) <= hi
        return lambda v: type(v) is bool
    kind = schema.get("type")
    if kind in ("integer", "number") and _keys(schema, {"type", "minimum", "maximum"}):
        lo, hi = schema.get("minimum", -math.inf), schema.get("maximum", math.inf)
        types = (int,) if kind == "integer" else (int, float)
        return lambda v: type(v) in types and lo <= v <= hi
    if kind == "array" and _keys(schema, {"type", "items", "minItems", "maxItems"}):
        lo, hi = schema.get("minItems", 0), schema.get("maxItems", math.inf)
        if "items" not in schema:
            return lambda v: type(v) is list and lo <= len(v) <= hi
        item = _value(schema["items"])
        if item is None:
            return None
        return lambda v: type(v) is list and lo <= len(v) <= hi and all(item(x) for x in v)
    if kind == "object":
        return _object(schema)
    return None


def _scalar(schema: dict[str, Any]) -> Spec | None:
    """A string with length bounds or a boolean, as data: (_STR, minLength, maxLength) or
    (_BOOL, -, -). The one definition of both, for ``_value``'s lambdas and ``_spec``."""
    kind = schema.get("type")
    if kind == "string" and _keys(schema, {"type", "minLength", "maxLength"}):
        return _STR, schema.get("minLength", 0), schema.get("maxLength", math.inf)
    if kind == "boolean" and _keys(schema, {"type"}):
        return _BOOL, None, None
    return None


def _spec(schema: Any) -> Spec | None:
    """A property's check as data, so the object check runs the common ones inline: a
    ``_scalar`` or (_CALL, check, -); None: not simple."""
    scalar = _scalar(schema) if isinstance(schema, dict) else None
    if scalar is not None:
        return scalar
    check = _value(schema)
    return None if check is None else (_CALL, check, None)


def _object(schema: dict[str, Any]) -> Check | None:
    if schema.get("type") != "object" or not _keys(
            schema, {"type", "properties", "required", "additionalProperties", "oneOf"}):
        return None
    extra = schema.get("additionalProperties", True)
    if extra not in (True, False):
        return None
    props = {k: _spec(v) for k, v in schema.get("properties", {}).items()}
    required = tuple(schema.get("required", ()))
    alternatives: list[tuple[str, ...]] = []
    for branch in schema.get("oneOf", ()):  # only "exactly one of these key sets" is simple
        if not isinstance(branch, dict) or set(branch) != {"required"}:
            return None
        alternatives.append(tuple(branch["required"]))
    closed = extra is False

    def check(body: Any) -> bool:
        if type(body) is not dict:
            return False
        for key, value in body.items():
            spec = props.get(key, _ABSENT)
            if spec is _ABSENT:
                if closed:
                    return False
                continue
            if spec is None:
                return False
            kind, a, b = spec  # strings and booleans inline: no call per property
            if kind == _STR:
                if type(value) is not str or not a <= len(value) <= b:
                    return False
            elif kind == _BOOL:
                if type(value) is not bool:
                    return False
            elif not a(value):
                return False
        for key in required:
            if key not in body:
                return False
        if alternatives:
            met = 0
            for keys in alternatives:
                for k in keys:  # a loop, not all(genexpr): no generator per body
                    if k not in body:
                        break
                else:
                    met += 1
            if met != 1:
                return False
        return True

    return check

"""Workflow specs: validation on submit and reference resolution at run time.

A spec is a DAG of steps. A parameter may quote an earlier step's output with a template,
``"{{steps.<id>.output.<field>[.<key or index>...]}}"``:

* a string that is exactly one template takes the referenced value as it is (a list stays a
  list, a number a number): ``"texts": "{{steps.search.output.texts}}"``;
* a template inside a longer string is replaced by the value as text (a list of strings joined
  by blank lines, anything else as JSON):
  ``"prompt": "Summarise:\\n{{steps.search.output.texts}}"``.

A reference makes its step an implicit dependency. Every problem found on submit is a
``SpecError`` whose message names the step (``steps[2] 'summarise': ...``), so a 400 tells the
client exactly what to fix.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fastjsonschema
import orjson

STEP_TYPES = ("embedding", "vector_search", "vector_store", "llm_query")
STEP_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
TEMPLATE = re.compile(r"\{\{\s*(.*?)\s*\}\}")
REF = re.compile(r"^steps\.([A-Za-z][A-Za-z0-9_-]{0,63})\.output((?:\.[A-Za-z0-9_-]+)*)$")

# each type's output fields, with a stand-in value of the field's shape used to check the
# parameters that quote it before the real value exists
OUTPUTS: dict[str, dict[str, Any]] = {
    "embedding": {"vectors": [[0.0]], "vector": [0.0], "model": "m", "dims": 1, "count": 1},
    "vector_search": {"results": [{"id": "x", "score": 0.0, "text": "x", "metadata": {}}],
                      "texts": ["x"], "ids": ["x"], "scores": [0.0], "collection": "x"},
    "vector_store": {"ids": ["x"], "count": 1, "status": "applied", "collection": "x",
                     "operation": 1},
    "llm_query": {"text": "x", "model": "m", "server": "s", "finish_reason": "stop",
                  "attempts": 1, "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                           "total_tokens": 2}},
}

_TEXT = {"type": "string", "minLength": 1}
# texts/items per step: a workflow's whole state (outputs included) is rewritten at each step,
# so outputs stay small; bulk loads belong to the vector and embedding routes
MAX_ITEMS = 256
_OPTIONS = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "temperature": {"type": "number", "minimum": 0, "maximum": 10},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"},
                                                 "maxItems": 16}]},
        "seed": {"type": "integer"},
    },
}
_ITEM = {
    "type": "object", "additionalProperties": False,
    "properties": {"id": {"type": ["string", "integer"]}, "text": _TEXT,
                   "vector": {"type": "array", "items": {"type": "number"}, "minItems": 1},
                   "metadata": {"type": "object"}},
}

PARAM_SCHEMAS: dict[str, dict[str, Any]] = {
    "embedding": {
        "type": "object", "additionalProperties": False,
        "properties": {"text": _TEXT, "texts": {"type": "array", "items": _TEXT, "minItems": 1,
                                                "maxItems": MAX_ITEMS},
                       "model": {"type": "string"}},
        "oneOf": [{"required": ["text"]}, {"required": ["texts"]}],
    },
    "vector_search": {
        "type": "object", "additionalProperties": False,
        "properties": {"collection": {"type": "string"}, "text": _TEXT,
                       "vector": {"type": "array", "items": {"type": "number"}, "minItems": 1},
                       "limit": {"type": "integer", "minimum": 1, "maximum": 10_000},
                       "filter": {"type": "object"}, "score_threshold": {"type": "number"},
                       "model": {"type": "string"}},
        "oneOf": [{"required": ["text"]}, {"required": ["vector"]}],
    },
    "vector_store": {
        "type": "object", "additionalProperties": False,
        "properties": {"collection": {"type": "string"}, "model": {"type": "string"},
                       "items": {"type": "array", "items": _ITEM, "minItems": 1,
                                 "maxItems": MAX_ITEMS},
                       "id": {"type": ["string", "integer"]}, "text": _TEXT,
                       "texts": {"type": "array", "items": _TEXT, "minItems": 1,
                                 "maxItems": MAX_ITEMS},
                       "vector": {"type": "array", "items": {"type": "number"}, "minItems": 1},
                       "metadata": {"type": "object"}},
        "oneOf": [{"required": ["items"]}, {"required": ["text"]}, {"required": ["texts"]},
                  {"required": ["vector"]}],
    },
    "llm_query": {
        "type": "object", "additionalProperties": False,
        "required": ["model"],
        "properties": {
            "model": {"type": "string", "minLength": 1}, "prompt": _TEXT,
            "system": {"type": "string"},
            "messages": {"type": "array", "minItems": 1, "maxItems": 1024, "items": {
                "type": "object", "required": ["role", "content"], "additionalProperties": False,
                "properties": {"role": {"enum": ["system", "user", "assistant"]},
                               "content": {"type": "string"}}}},
            "options": _OPTIONS, "stream": {"type": "boolean"}, "server": {"type": "string"},
        },
        "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}],
    },
}
_VALIDATORS: dict[str, Callable[[Any], Any]] = {
    k: fastjsonschema.compile(v) for k, v in PARAM_SCHEMAS.items()}

WORKFLOW_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["steps"],
    "properties": {
        "name": {"type": "string", "maxLength": 200},
        "deadline_s": {"type": "number", "exclusiveMinimum": 0},
        "metadata": {"type": "object"},
        "steps": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["type"],
            "properties": {
                "id": {"type": "string"}, "type": {"type": "string"},
                "params": {"type": "object"},
                "depends_on": {"type": "array", "items": {"type": "string"}},
                "retries": {"type": "integer", "minimum": 0},
                "timeout_s": {"type": "number", "exclusiveMinimum": 0},
            }}},
    },
}


class SpecError(ValueError):
    """A spec problem; ``step`` names the offending step when there is one."""

    def __init__(self, message: str, step: str | None = None, param: str = "steps") -> None:
        super().__init__(message)
        self.message = message
        self.step = step
        self.param = param


@dataclass(frozen=True)
class Limits:
    max_steps: int = 100
    default_retries: int = 2
    max_retries: int = 10
    default_timeout_s: float = 120.0
    max_timeout_s: float = 3600.0
    default_deadline_s: float = 3600.0
    max_deadline_s: float = 86_400.0


@dataclass
class Step:
    id: str
    type: str
    params: dict[str, Any]
    depends_on: list[str]  # explicit and implied by references, in spec order
    retries: int
    timeout_s: float

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "params": self.params,
                "depends_on": self.depends_on, "retries": self.retries,
                "timeout_s": self.timeout_s}


@dataclass
class Spec:
    steps: list[Step]
    deadline_s: float
    name: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "deadline_s": self.deadline_s, "metadata": self.metadata,
                "steps": [s.to_json() for s in self.steps]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Spec:
        """A spec stored by ``to_json`` (already validated)."""
        return cls([Step(**s) for s in d["steps"]], float(d["deadline_s"]), d.get("name"),
                   d.get("metadata") or {})

    def step(self, step_id: str) -> Step:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)


_top = fastjsonschema.compile(WORKFLOW_SCHEMA)


def _label(index: int, step_id: str | None) -> str:
    return f"steps[{index}] {step_id!r}" if step_id else f"steps[{index}]"


def _schema_msg(exc: fastjsonschema.JsonSchemaValueException, root: str) -> str:
    msg = str(exc.message)
    return root + msg[4:] if msg.startswith("data") else msg


def references(value: Any) -> list[tuple[str, list[str]]]:
    """Every template in ``value`` as (step id, path after ``output``); bad ones raise."""
    out: list[tuple[str, list[str]]] = []
    if isinstance(value, str):
        for m in TEMPLATE.finditer(value):
            r = REF.match(m.group(1))
            if r is None:
                raise SpecError(f"bad reference {m.group(0)!r}: expected "
                                "{{steps.<id>.output.<field>}}")
            path = [p for p in r.group(2).split(".") if p]
            out.append((r.group(1), path))
    elif isinstance(value, dict):
        for v in value.values():
            out.extend(references(v))
    elif isinstance(value, list):
        for v in value:
            out.extend(references(v))
    return out


def _stand_in(types: dict[str, str], step_id: str, path: list[str]) -> Any:
    """A value shaped like what the reference will yield, for checking parameters early."""
    value: Any = OUTPUTS[types[step_id]]
    for p in path:
        if isinstance(value, dict) and p in value:
            value = value[p]
        elif isinstance(value, list) and p.isdigit() and value:
            value = value[0]
        else:
            return "x"
    return value


def _substitute(value: Any, lookup: Callable[[str, list[str]], Any]) -> Any:
    if isinstance(value, str):
        whole = TEMPLATE.fullmatch(value.strip())
        if whole is not None and value.strip() == value:
            r = REF.match(whole.group(1))
            if r is not None:
                return lookup(r.group(1), [p for p in r.group(2).split(".") if p])

        def text(m: re.Match[str]) -> str:
            r = REF.match(m.group(1))
            if r is None:
                return m.group(0)
            return as_text(lookup(r.group(1), [p for p in r.group(2).split(".") if p]))
        return TEMPLATE.sub(text, value)
    if isinstance(value, dict):
        return {k: _substitute(v, lookup) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, lookup) for v in value]
    return value


def as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n\n".join(value)
    return orjson.dumps(value).decode()


def validate_params(step_type: str, params: Any, where: str, step: str | None = None) -> None:
    try:
        _VALIDATORS[step_type](params)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise SpecError(f"{where}: {_schema_msg(exc, 'params')}", step=step) from None


def parse(body: Any, limits: Limits) -> Spec:
    """Validate a submitted workflow; raises SpecError naming the step at fault."""
    if isinstance(body, dict) and isinstance(body.get("steps"), list):
        n = len(body["steps"])
        if n > limits.max_steps:  # before any per-step work: 10 000 steps cost nothing
            raise SpecError(f"too many steps: {n} (at most {limits.max_steps})")
    try:
        _top(body)
    except fastjsonschema.JsonSchemaValueException as exc:
        path = [str(p) for p in (getattr(exc, "path", None) or [])[1:]]
        if len(path) >= 2 and path[0] == "steps" and path[1].isdigit():
            i = int(path[1])
            raw = body["steps"][i] if i < len(body["steps"]) else {}
            sid = raw.get("id") if isinstance(raw, dict) else None
            msg = re.sub(r"^data\.steps\[\d+\]\.?", "", str(exc.message)) or "step"
            msg = "step " + msg if msg.startswith("must") else msg
            raise SpecError(f"{_label(i, sid if isinstance(sid, str) else None)}: {msg}",
                            step=sid) from None
        raise SpecError(_schema_msg(exc, "body"), param=path[0] if path else "steps") from None
    deadline = float(body.get("deadline_s", limits.default_deadline_s))
    if deadline > limits.max_deadline_s:
        raise SpecError(f"deadline_s is {deadline:g} (at most {limits.max_deadline_s:g})",
                        param="deadline_s")
    raw_steps: list[dict[str, Any]] = body["steps"]
    steps: list[Step] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_steps):
        sid = raw.get("id") or f"step{i + 1}"
        where = _label(i, sid)
        if not STEP_ID.match(sid):
            raise SpecError(f"{where}: bad id (1-64 of A-Za-z0-9_-, starting with a letter)",
                            step=sid)
        if sid in seen:
            raise SpecError(f"{where}: duplicate id (also steps[{seen[sid]}])", step=sid)
        seen[sid] = i
        if raw["type"] not in STEP_TYPES:
            raise SpecError(f"{where}: unknown type {raw['type']!r} (one of "
                            f"{', '.join(STEP_TYPES)})", step=sid)
        retries = raw.get("retries", limits.default_retries)
        if retries > limits.max_retries:
            raise SpecError(f"{where}: retries is {retries} (at most {limits.max_retries})",
                            step=sid)
        timeout = float(raw.get("timeout_s", limits.default_timeout_s))
        if timeout > limits.max_timeout_s:
            raise SpecError(f"{where}: timeout_s is {timeout:g} (at most "
                            f"{limits.max_timeout_s:g})", step=sid)
        steps.append(Step(sid, raw["type"], raw.get("params") or {},
                          list(dict.fromkeys(raw.get("depends_on") or [])), retries, timeout))
    types = {s.id: s.type for s in steps}
    for i, s in enumerate(steps):
        where = _label(i, s.id)
        for dep in s.depends_on:
            if dep not in types:
                raise SpecError(f"{where}: depends_on names unknown step {dep!r}", step=s.id)
            if dep == s.id:
                raise SpecError(f"{where}: depends on itself", step=s.id)
        try:
            refs = references(s.params)
        except SpecError as exc:
            raise SpecError(f"{where}: {exc.message}", step=s.id) from None
        for ref_id, path in refs:
            if ref_id not in types:
                raise SpecError(f"{where}: references unknown step {ref_id!r}", step=s.id)
            if ref_id == s.id:
                raise SpecError(f"{where}: references its own output", step=s.id)
            fields = OUTPUTS[types[ref_id]]
            if not path or path[0] not in fields:
                raise SpecError(f"{where}: step {ref_id!r} ({types[ref_id]}) has no output "
                                f"{'.'.join(path) or '(none)'!r}; it has "
                                f"{', '.join(sorted(fields))}", step=s.id)
            if ref_id not in s.depends_on:
                s.depends_on.append(ref_id)
        validate_params(s.type, _substitute(s.params, lambda r, p: _stand_in(types, r, p)),
                        where, s.id)
    _check_acyclic(steps)
    return Spec(steps, deadline, body.get("name"), body.get("metadata") or {})


def _check_acyclic(steps: list[Step]) -> None:
    """Kahn's algorithm; a leftover step lies on (or behind) a cycle, which is then named."""
    indeg = {s.id: len(s.depends_on) for s in steps}
    users: dict[str, list[str]] = {s.id: [] for s in steps}
    for s in steps:
        for d in s.depends_on:
            users[d].append(s.id)
    ready = [sid for sid, n in indeg.items() if n == 0]
    while ready:
        sid = ready.pop()
        for u in users[sid]:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    left = {sid for sid, n in indeg.items() if n > 0}
    if not left:
        return
    deps = {s.id: [d for d in s.depends_on if d in left] for s in steps if s.id in left}
    start = next(s.id for s in steps if s.id in left)
    path, at = [start], start
    while True:  # walk dependencies until a step repeats: that loop is the cycle
        at = deps[at][0]
        if at in path:
            cycle = [*path[path.index(at):], at]
            break
        path.append(at)
    index = next(i for i, s in enumerate(steps) if s.id == cycle[0])
    raise SpecError(f"{_label(index, cycle[0])}: dependency cycle "
                    f"{' -> '.join(cycle)}", step=cycle[0])


class ReferenceError_(Exception):
    """A reference could not be resolved at run time (e.g. an index past the end)."""


def resolve(params: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    """``params`` with every template replaced by the referenced outputs."""

    def lookup(step_id: str, path: list[str]) -> Any:
        if step_id not in outputs:
            raise ReferenceError_(f"step {step_id!r} has no output yet")
        value: Any = outputs[step_id]
        walked = [step_id, "output"]
        if path[:1] == ["vector"] and isinstance(value, dict) and "vector" not in value \
                and value.get("vectors"):
            path = ["vectors", "0", *path[1:]]  # an embedding's first vector, stored once
        for p in path:
            walked.append(p)
            if isinstance(value, dict) and p in value:
                value = value[p]
            elif isinstance(value, list) and p.isdigit():
                idx = int(p)
                if idx >= len(value):
                    raise ReferenceError_(f"steps.{'.'.join(walked)}: index {idx} is out of "
                                          f"range (the list has {len(value)} items)")
                value = value[idx]
            else:
                raise ReferenceError_(f"steps.{'.'.join(walked)} does not exist")
        return value

    out: dict[str, Any] = _substitute(params, lookup)
    return out

"""Workflow specs: every refusal names the step at fault; references resolve as documented."""

from __future__ import annotations

from typing import Any

import pytest

from citadeld.workflows.spec import Limits, ReferenceError_, Spec, SpecError, parse, resolve

L = Limits(max_steps=100)


def wf(*steps: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"steps": list(steps), **top}


def err(body: Any, limits: Limits = L) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse(body, limits)
    return info.value


EXAMPLE = wf(
    {"id": "embed", "type": "embedding", "params": {"text": "a document about cats"}},
    {"id": "search", "type": "vector_search",
     "params": {"vector": "{{steps.embed.output.vector}}", "limit": 3}},
    {"id": "summarise", "type": "llm_query",
     "params": {"model": "llama3.2", "prompt": "Summarise:\n{{steps.search.output.texts}}"}},
)


def test_example_parses_with_implicit_dependencies() -> None:
    spec = parse(EXAMPLE, L)
    assert [s.id for s in spec.steps] == ["embed", "search", "summarise"]
    assert spec.step("search").depends_on == ["embed"]
    assert spec.step("summarise").depends_on == ["search"]
    assert spec.step("embed").retries == L.default_retries
    assert Spec.from_json(spec.to_json()).to_json() == spec.to_json()


def test_default_ids_and_explicit_depends_on() -> None:
    spec = parse(wf({"type": "embedding", "params": {"text": "x"}},
                    {"type": "embedding", "params": {"text": "y"}, "depends_on": ["step1"]}), L)
    assert [s.id for s in spec.steps] == ["step1", "step2"]
    assert spec.steps[1].depends_on == ["step1"]


@pytest.mark.parametrize("body, needle", [
    (wf({"id": "a", "type": "teleport"}), "steps[0] 'a': unknown type 'teleport'"),
    (wf({"id": "a", "type": "embedding", "params": {}}), "steps[0] 'a': params"),
    (wf({"id": "a", "type": "embedding", "params": {"text": "x", "bogus": 1}}),
     "steps[0] 'a': params must not contain"),
    (wf({"id": "a", "type": "llm_query", "params": {"prompt": "hi"}}),
     "steps[0] 'a': params must contain ['model']"),
    (wf({"id": "a", "type": "embedding", "params": {"text": "x"}},
        {"id": "a", "type": "embedding", "params": {"text": "y"}}),
     "steps[1] 'a': duplicate id"),
    (wf({"id": "a", "type": "embedding", "params": {"text": "x"}, "depends_on": ["zz"]}),
     "steps[0] 'a': depends_on names unknown step 'zz'"),
    (wf({"id": "a", "type": "embedding", "params": {"text": "{{steps.nope.output.text}}"}}),
     "steps[0] 'a': references unknown step 'nope'"),
    (wf({"id": "a", "type": "embedding", "params": {"text": "x"}},
        {"id": "b", "type": "llm_query", "params": {"model": "m",
                                                    "prompt": "{{steps.a.output.txt}}"}}),
     "steps[1] 'b': step 'a' (embedding) has no output 'txt'"),
    (wf({"id": "a", "type": "embedding", "params": {"text": "{{steps.a.output.model}}"}}),
     "steps[0] 'a': references its own output"),
    (wf({"id": "a", "type": "embedding", "params": {"text": "{{ input.x }}"}}),
     "steps[0] 'a': bad reference"),
    (wf({"id": "a", "type": "embedding", "params": {"text": "x"}, "retries": 99}),
     "steps[0] 'a': retries is 99"),
    (wf({"id": "a", "type": "embedding", "params": {"text": "x"}, "timeout_s": 1e9}),
     "steps[0] 'a': timeout_s"),
    (wf({"id": "a", "type": "embedding", "params": {"text": "x"}, "timeout_s": -1}),
     "steps[0] 'a': timeout_s must be bigger than 0"),
    (wf({"id": "9bad", "type": "embedding", "params": {"text": "x"}}), "steps[0] '9bad': bad id"),
    (wf({"id": "a", "type": "vector_search", "params": {"text": "x", "vector": [1.0]}}),
     "steps[0] 'a': params must be valid exactly by one"),
])
def test_refusals_name_the_step(body: dict[str, Any], needle: str) -> None:
    e = err(body)
    assert needle in e.message, e.message


def test_reference_of_the_wrong_shape_is_refused_on_submit() -> None:
    e = err(wf({"id": "e", "type": "embedding", "params": {"text": "x"}},
               {"id": "s", "type": "embedding", "params": {"text": "{{steps.e.output.vector}}"}}))
    assert e.step == "s" and "params.text must be string" in e.message


def test_cycle_is_named() -> None:
    e = err(wf({"id": "a", "type": "embedding", "params": {"text": "x"}, "depends_on": ["c"]},
               {"id": "b", "type": "embedding", "params": {"text": "x"}, "depends_on": ["a"]},
               {"id": "c", "type": "llm_query", "params": {
                   "model": "m", "prompt": "{{steps.b.output.model}}"}}))
    assert "dependency cycle a -> c -> b -> a" in e.message and e.step == "a"


def test_bounds() -> None:
    many = wf(*[{"type": "embedding", "params": {"text": "x"}} for _ in range(10_000)])
    e = err(many)
    assert e.message == "too many steps: 10000 (at most 100)"
    assert "deadline_s" in err(wf({"type": "embedding", "params": {"text": "x"}},
                                  deadline_s=1e12)).message
    assert "steps" in err({"steps": []}).message
    assert "body must not contain" in err({"steps": [{"type": "embedding"}], "x": 1}).message
    assert "body must be object" in err([1, 2]).message


def test_resolution_keeps_types_and_quotes_text() -> None:
    outputs = {"search": {"texts": ["one", "two"], "results": [{"id": "a", "score": 0.5}],
                          "scores": [0.5]},
               "embed": {"vector": [0.1, 0.2]}}
    params = {"vector": "{{steps.embed.output.vector}}",
              "prompt": "Q: {{ steps.search.output.texts }} / {{steps.search.output.scores}}",
              "nested": [{"x": "{{steps.search.output.results.0.id}}"}]}
    out = resolve(params, outputs)
    assert out["vector"] == [0.1, 0.2]
    assert out["prompt"] == "Q: one\n\ntwo / [0.5]"
    assert out["nested"] == [{"x": "a"}]
    with pytest.raises(ReferenceError_, match="index 5 is out of range"):
        resolve({"t": "{{steps.search.output.texts.5}}"}, outputs)
    with pytest.raises(ReferenceError_, match="does not exist"):
        resolve({"t": "{{steps.search.output.results.0.nope}}"}, outputs)

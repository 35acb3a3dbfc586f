"""Upstream wire handling without a network: stream parsers, status classification, request
bodies, Retry-After, and the LLM config."""

from __future__ import annotations

import email.utils
import time

import pytest
from pydantic import ValidationError

from citadeld.config import Config, redact
from citadeld.llm.config import LLMConfig, canonical_model
from citadeld.llm.upstream import (
    FAILURE_KINDS,
    GenParams,
    GenRequest,
    OllamaParser,
    OpenAIParser,
    ServerInfo,
    UpstreamFailure,
    classify_status,
    ollama_request,
    openai_request,
    parse_retry_after,
)


def test_ollama_parser_chunks_done_and_errors() -> None:
    p = OllamaParser("s")
    c = p.feed(b'{"message":{"role":"assistant","content":"Hi "},"done":false}\n')
    assert c is not None and c.text == "Hi " and not c.done
    assert p.feed(b"\n") is None
    done = p.feed(b'{"response":"","done":true,"done_reason":"length","prompt_eval_count":7,'
                  b'"eval_count":3}')
    assert done is not None and done.done and done.finish_reason == "length"
    assert (done.prompt_tokens, done.completion_tokens) == (7, 3)
    with pytest.raises(UpstreamFailure) as err:
        p.feed(b'{"error":"model runner crashed"}')
    assert err.value.kind == "stream_error" and err.value.counts and err.value.retryable
    with pytest.raises(UpstreamFailure) as err:
        p.feed(b"<html>oops</html>")
    assert err.value.kind == "protocol"
    with pytest.raises(UpstreamFailure) as err:
        p.feed(b"[1, 2]")
    assert err.value.kind == "protocol"
    with pytest.raises(UpstreamFailure) as err:
        p.at_eof()
    assert err.value.kind == "truncated"


def test_openai_parser_sse_events() -> None:
    p = OpenAIParser("s")
    role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}'
    assert p.feed(role + b"\n") is None
    assert p.feed(b"\n") is None  # role-only chunk carries no text
    assert p.feed(b": keep-alive comment\n") is None
    assert p.feed(b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n') is None
    c = p.feed(b"\n")
    assert c is not None and c.text == "Hel"
    p.feed(b'data: {"choices":[{"delta":{},"finish_reason":"length"}]}\n')
    assert p.feed(b"\r\n") is None
    p.feed(b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n')
    assert p.feed(b"\n") is None
    p.feed(b"data: [DONE]\n")
    done = p.feed(b"\n")
    assert done is not None and done.done and done.finish_reason == "length"
    assert (done.prompt_tokens, done.completion_tokens) == (5, 2)


def test_openai_parser_errors_and_eof() -> None:
    p = OpenAIParser("s")
    p.feed(b'data: {"error":{"message":"overloaded","type":"server_error"}}\n')
    with pytest.raises(UpstreamFailure) as err:
        p.feed(b"\n")
    assert err.value.kind == "stream_error" and "overloaded" in err.value.message
    with pytest.raises(UpstreamFailure) as err:
        p.feed(b"garbage line\n")
    assert err.value.kind == "protocol"
    p = OpenAIParser("s")
    p.feed(b"data: {not json\n")
    with pytest.raises(UpstreamFailure) as err:
        p.feed(b"\n")
    assert err.value.kind == "protocol"
    p = OpenAIParser("s")
    with pytest.raises(UpstreamFailure) as err:
        p.at_eof()
    assert err.value.kind == "truncated"
    p.feed(b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n')
    done = p.at_eof()  # finished, only [DONE] missing: accepted
    assert done.done and done.finish_reason == "stop"


@pytest.mark.parametrize(("status", "kind"), [
    (500, "status"), (502, "status"), (503, "status"), (408, "status"), (429, "rate_limited"),
    (401, "auth"), (403, "auth"), (404, "not_found"), (400, "client"), (413, "client"),
    (422, "client"),
])
def test_status_classification(status: int, kind: str) -> None:
    assert classify_status(status) == kind


def test_client_errors_neither_trip_nor_retry() -> None:
    assert FAILURE_KINDS["client"] == (False, False)
    assert FAILURE_KINDS["not_found"] == (False, True)
    for kind in ("connect", "connect_timeout", "first_token_timeout", "status", "rate_limited"):
        assert FAILURE_KINDS[kind] == (True, True)


def test_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= (parse_retry_after(when) or 0) <= 31


def _server(kind: str) -> ServerInfo:
    return ServerInfo("s", kind, "http://x", "k", {"llama3.2": "meta/llama-3.2"}, 1, 2, 3, 4,
                      "10m")


def test_request_bodies() -> None:
    req = GenRequest(model="llama3.2", requested_model="llama3.2", prompt="hi", system="be brief",
                     params=GenParams(temperature=0.2, max_tokens=5, stop=["x"], json_mode=True),
                     ollama_options={"num_ctx": 4096})
    path, body = ollama_request(_server("ollama"), req)
    assert path == "/api/generate"
    assert body["model"] == "meta/llama-3.2" and body["stream"] is True
    assert body["system"] == "be brief" and body["format"] == "json"
    assert body["options"] == {"num_ctx": 4096, "temperature": 0.2, "num_predict": 5,
                               "stop": ["x"]}
    assert body["keep_alive"] == "10m"
    path, body = openai_request(_server("openai"), req)
    assert path == "/v1/chat/completions"
    assert body["messages"] == [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "hi"}]
    assert body["max_tokens"] == 5 and body["stream_options"] == {"include_usage": True}
    assert body["response_format"] == {"type": "json_object"}
    req.messages, req.prompt = [{"role": "user", "content": "yo"}], None
    path, body = ollama_request(_server("ollama"), req)
    assert path == "/api/chat" and body["messages"] == req.messages


def _servers(**kw: object) -> dict[str, object]:
    return {"servers": [
        {"name": "llm-01", "kind": "ollama", "url": "http://a:11434/", "models": ["llama3.2"]},
        {"name": "llm-02", "kind": "openai", "url": "http://b:8000/v1", "api_key": "secret",
         "models": [{"name": "llama3.2:latest", "upstream": "meta/llama"}], "priority": 1},
    ], **kw}


def test_llm_config() -> None:
    cfg = LLMConfig.model_validate(_servers(models={"llama3.2": {"price_per_1k": 0.5,
                                                                  "aliases": ["llama"]}}))
    assert cfg.servers[0].url == "http://a:11434"
    assert cfg.servers[1].url == "http://b:8000"  # /v1 is ours to add
    assert cfg.servers[1].served() == {"llama3.2": "meta/llama"}
    assert cfg.models["llama3.2"].prices() == (0.5, 0.5)
    assert canonical_model("x:latest") == "x"
    full = Config(llm=cfg)
    assert redact(full)["llm"]["servers"][1]["api_key"] == "***"


@pytest.mark.parametrize(("change", "message"), [
    ({"servers": [{"name": "a", "kind": "ollama", "url": "http://a", "models": ["m"]},
                  {"name": "a", "kind": "ollama", "url": "http://b", "models": ["m"]}]},
     "duplicate server names"),
    ({"models": {"nope": {}}}, "no server in llm.servers serves it"),
    ({"servers": [{"name": "a", "kind": "vllm", "url": "http://a", "models": ["m"]}]}, "kind"),
    ({"servers": [{"name": "a b", "kind": "ollama", "url": "http://a", "models": ["m"]}]},
     "A-Za-z0-9"),
    ({"servers": [{"name": "a", "kind": "ollama", "url": "ftp://a", "models": ["m"]}]},
     "http://"),
    ({"servers": [{"name": "a", "kind": "ollama", "url": "http://a", "models": []}]}, "models"),
    ({"routing": {"strategy": "random"}}, "strategy"),
    ({"servers": [{"name": "a", "kind": "ollama", "url": "http://a", "models": ["m"],
                   "timeouts": {"first_token_s": 100, "total_s": 10}}]}, "first_token_s"),
    ({"routing": {"retry_budget": {"ratio": 2}}}, "ratio"),
    ({"breaker": {"colour": "red"}}, "colour"),
])
def test_llm_config_errors(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        LLMConfig.model_validate({**_servers(), **change})

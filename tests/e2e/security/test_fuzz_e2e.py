"""Property-based fuzzing (hypothesis) of the request validators through the real daemon with
auth on: embed bodies of the three dialects (near-valid shapes and arbitrary JSON or bytes)
and credential headers. Whatever comes in, the answer is never a 5xx, always JSON in the
route's dialect, and never admits a request without a valid key."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.conftest import Fake
from tests.support.auth import HS_SECRET, ISSUER, role_keys
from tests.support.daemon import DaemonProc

pytestmark = pytest.mark.e2e

FUZZ = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
ROUTES = {"/api/v1/embed": "native", "/v1/embeddings": "openai", "/api/embed": "ollama",
          "/api/embeddings": "ollama"}
FIELDS = ["text", "texts", "input", "prompt", "model", "dimensions", "encoding_format",
          "truncate", "cache", "user", "options", "keep_alive", "normalize"]

json_leaf = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))
json_any = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=5)
                        | st.dictionaries(st.text(max_size=10), kids, max_size=5),
                        max_leaves=20)
texts = st.text(max_size=60) | st.lists(st.text(max_size=30), max_size=6)
field_value = (texts | json_any | st.sampled_from(["all-minilm", "nope", "float", "base64"])
               | st.integers(-5, 500))
near_valid = st.dictionaries(st.sampled_from(FIELDS), field_value, max_size=6).map(
    lambda d: {"model": "all-minilm", **d} if "model" not in d else d)
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=120)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, str]]:
    fake = Fake("ollama", "--fake-vectors", "hash", "--models", "all-minilm")
    keys, entries = role_keys()
    cfg = {
        "logging": {"level": "warning"},
        "cache": {"backend": "memory"},
        "embedding": {"default_model": "all-minilm", "max_inputs": 16, "models": {
            "all-minilm": {"backend": "ollama", "dims": 384, "max_context": 256,
                           "timeout_s": 10, "endpoints": [{"url": fake.url}]}}},
        "auth": {"enabled": True, "api_keys": entries,
                 "jwt": {"hs256_secret": HS_SECRET, "issuer": ISSUER}},
    }
    d = DaemonProc(cfg, tmp_path_factory.mktemp("fuzz")).start()
    with httpx.Client(base_url=d.url, timeout=30) as client:
        yield client, keys["user"]
    assert d.stop() == 0, d.log_tail()
    fake.stop()


def check(resp: httpx.Response, path: str) -> None:
    assert resp.status_code < 500, (path, resp.status_code, resp.text[:300])
    body = orjson.loads(resp.content)
    if resp.status_code >= 400:
        if ROUTES[path] == "ollama":
            assert isinstance(body["error"], str)
        elif ROUTES[path] == "openai":
            assert set(body["error"]) == {"message", "type", "param", "code"}
        else:
            assert set(body["error"]) == {"code", "message", "request_id"}


@FUZZ
@given(path=st.sampled_from(sorted(ROUTES)), body=near_valid)
def test_near_valid_bodies(target: tuple[httpx.Client, str], path: str, body: Any) -> None:
    client, key = target
    resp = client.post(path, content=json.dumps(body).encode(), headers={
        "X-API-Key": key, "Content-Type": "application/json"})
    check(resp, path)


@FUZZ
@given(path=st.sampled_from(sorted(ROUTES)),
       raw=st.binary(max_size=200) | json_any.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_bytes_and_json(target: tuple[httpx.Client, str], path: str,
                                  raw: bytes) -> None:
    client, key = target
    resp = client.post(path, content=raw, headers={"X-API-Key": key,
                                                   "Content-Type": "application/json"})
    check(resp, path)


@FUZZ
@given(path=st.sampled_from(sorted(ROUTES)), scheme=st.sampled_from(["Bearer ", "bearer ", "",
                                                                       "Basic ", "Token "]),
       value=header_text, header=st.sampled_from(["Authorization", "X-API-Key"]),
       mutate=st.booleans())
def test_credential_headers(target: tuple[httpx.Client, str], path: str, scheme: str,
                            value: str, header: str, mutate: bool) -> None:
    client, key = target
    if mutate and value:  # a near miss: the real key with a changed tail
        value = key[: max(3, len(key) - len(value) % 8 - 1)] + value[:8]
    sent = ((scheme + value) if header == "Authorization" else value).strip()  # as h11 sends
    resp = client.post(path, json={"model": "all-minilm", "input": "x"},
                       headers={header: sent})
    check(resp, path)
    assert resp.status_code == 401, (header, sent)
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


_seg = st.binary(min_size=1, max_size=40).map(
    lambda b: bytes(c for c in b if c >= 0x21 and c not in (0x7F, 0x2E))).filter(bool)
raw_header = (_seg  # shapes the daemon tells apart: a key, a JWT, anything
              | st.tuples(_seg, _seg, _seg).map(b".".join)
              | _seg.map(lambda b: b"ck_0123456789ab_" + b))


@FUZZ
@given(path=st.sampled_from(sorted(ROUTES)), value=raw_header, bearer=st.booleans(),
       header=st.sampled_from(["Authorization", "X-API-Key"]))
def test_raw_header_bytes(target: tuple[httpx.Client, str], path: str, value: bytes,
                          bearer: bool, header: str) -> None:
    """Bytes that are not UTF-8 (obs-text) in credential headers."""
    client, _ = target
    sent = (b"Bearer " + value) if bearer and header == "Authorization" else value
    resp = client.post(path, json={"model": "all-minilm", "input": "x"},
                       headers={header: sent})
    check(resp, path)
    assert resp.status_code == 401

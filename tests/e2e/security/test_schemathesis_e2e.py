"""schemathesis against the real daemon's /openapi.json with auth on and a valid admin key:
every operation, a few generated requests each, no 5xx and no answer the document does not
describe (status, content type, body schema). Also without a credential: every protected
operation answers the documented 401."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.e2e.conftest import Fake
from tests.support.auth import role_keys
from tests.support.daemon import DaemonProc
from tests.support.pg import temp_database

pytestmark = pytest.mark.e2e

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
EXAMPLES = 10


@pytest.fixture(scope="module")
def hash_fake() -> Iterator[Fake]:
    fake = Fake("ollama", "--fake-vectors", "hash", "--models", "all-minilm")
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, hash_fake: Fake
           ) -> Iterator[tuple[DaemonProc, dict[str, str]]]:
    keys, entries = role_keys()
    cfg = {
        "logging": {"level": "warning"},
        "cache": {"backend": "memory"},
        "embedding": {"default_model": "all-minilm", "max_inputs": 64, "models": {
            "all-minilm": {"backend": "ollama", "dims": 384, "max_context": 256,
                           "timeout_s": 10, "endpoints": [{"url": hash_fake.url}]}}},
        "auth": {"enabled": True, "api_keys": entries},
    }
    with temp_database() as dsn:  # routes that need PostgreSQL (the audit trail) answer too
        cfg["persistence"] = {"dsn": dsn, "flush_interval_s": 0.2}
        d = DaemonProc(cfg, tmp_path_factory.mktemp("schemathesis")).start()
        yield d, keys
        assert d.stop() == 0, d.log_tail()


def _schema(d: DaemonProc, key: str) -> Any:
    doc = httpx.get(d.url + "/openapi.json", headers={"X-API-Key": key}, timeout=10).json()
    return schemathesis.openapi.from_dict(doc)


# live event streams (SSE and websocket upgrades): a valid request's answer does not end
STREAMS = frozenset({"/api/v1/events", "/ws", "/ws/workflows/{workflow_id}"})


def run_operation(op: Any, url: str, key: str, failures: list[str], examples: int) -> None:
    @given(case=op.as_strategy())
    @settings(max_examples=examples, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        try:
            case.call_and_validate(base_url=url, headers={"X-API-Key": key}, checks=CHECKS,
                                   timeout=30)
        except (Exception, BaseExceptionGroup) as exc:  # collect: report every operation
            failures.append(f"{op.label}: {str(exc)[:1500]}")

    run()


@pytest.mark.parametrize(("role", "examples"), [("admin", EXAMPLES), ("user", 3)])
def test_no_5xx_and_no_undocumented_answer(daemon: tuple[DaemonProc, dict[str, str]],
                                           role: str, examples: int) -> None:
    """admin: every route's real answers; user: the 403s of the routes it may not call."""
    d, keys = daemon
    key = keys[role]
    schema = _schema(d, keys["admin"])
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path in STREAMS:
            continue  # an answer that never ends; tests/integration/test_event_transports.py
        operations += 1
        run_operation(op, d.url, key, failures, examples)
    assert operations >= 30
    assert not failures, "\n\n".join(failures[:10])


def test_without_a_credential_every_protected_operation_answers_401(
        daemon: tuple[DaemonProc, dict[str, str]]) -> None:
    d, keys = daemon
    key = keys["admin"]
    doc = httpx.get(d.url + "/openapi.json", headers={"X-API-Key": key}, timeout=10).json()
    assert set(doc["components"]["securitySchemes"]) == {"bearerAuth", "apiKeyHeader"}
    protected = 0
    for path, item in doc["paths"].items():
        for method, op in item.items():
            url = d.url + path.replace("{", "").replace("}", "")
            r = httpx.request(method.upper(), url, timeout=10)
            if op.get("security") == []:
                assert r.status_code != 401, (method, path)
                continue
            protected += 1
            assert r.status_code == 401, (method, path, r.status_code)
            assert "401" in op["responses"] and "403" in op["responses"]
    assert protected >= 25

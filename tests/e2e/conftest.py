"""Shared e2e fixtures: fake upstreams as processes, and the real citadeld on top of them."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.process import start_fake, stop_fake
from tests.support.daemon import DaemonProc


def dead_port() -> int:
    """A port nobody listens on: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Fake:
    def __init__(self, module: str, *args: str) -> None:
        self.proc, self.port = start_fake(module, *args)
        self.url = f"http://127.0.0.1:{self.port}"

    def fault(self, **faults: Any) -> None:
        httpx.post(self.url + "/_fault", json=faults, timeout=5).raise_for_status()

    def reset(self) -> None:
        httpx.post(self.url + "/_fault/reset", timeout=5).raise_for_status()
        httpx.post(self.url + "/_stats/reset", timeout=5).raise_for_status()

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(self.url + "/_stats", timeout=5).json())

    def stop(self) -> None:
        stop_fake(self.proc)


@pytest.fixture(scope="session")
def ollama_fake() -> Iterator[Fake]:
    """Real all-MiniLM vectors, Ollama's one-call-at-a-time behaviour."""
    fake = Fake("ollama", "--parallel", "1", "--models", "all-minilm,nomic-embed-text")
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def openai_fake() -> Iterator[Fake]:
    fake = Fake("openai_compat", "--models", "all-minilm")
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def flaky_fake() -> Iterator[Fake]:
    """Hash vectors (no model cost); faults are injected per test."""
    fake = Fake("ollama", "--fake-vectors", "hash", "--models", "flaky")
    yield fake
    fake.stop()


def model(backend: str, url: str, **kw: Any) -> dict[str, Any]:
    return {"backend": backend, "dims": 384, "max_context": 256,
            "endpoints": [{"url": url}], **kw}


@pytest.fixture(scope="session")
def daemon(
    tmp_path_factory: pytest.TempPathFactory,
    ollama_fake: Fake, openai_fake: Fake, flaky_fake: Fake,
) -> Iterator[DaemonProc]:
    dead = f"http://127.0.0.1:{dead_port()}"
    config = {
        "server": {"max_body_bytes": 1024 * 1024, "request_timeout_s": 30},
        "embedding": {
            "default_model": "all-minilm",
            "max_inputs": 256,
            "models": {
                # the first endpoint refuses connections: every batch must fall back to the fake
                "all-minilm": {
                    "backend": "ollama", "dims": 384, "max_context": 256,
                    "endpoints": [{"url": dead}, {"url": ollama_fake.url}],
                    "aliases": ["sentence-transformers/all-MiniLM-L6-v2"],
                },
                "minilm-openai": model("openai", openai_fake.url, upstream_model="all-minilm"),
                "flaky": model("ollama", flaky_fake.url, attempts=1, timeout_s=1.5,
                               connect_timeout_s=1, batch={"max_wait_ms": 1}),
                "gone": model("ollama", dead, attempts=1, fallback_model="all-minilm"),
            },
        },
        "supervision": {"ping_interval_s": 1, "ping_timeout_s": 1},
    }
    proc = DaemonProc(config, tmp_path_factory.mktemp("citadeld"))
    # not every model can embed ("gone" never can), so wait for liveness, then for the rest
    proc.start(require_ready=False)
    yield proc
    code = proc.stop()
    assert code == 0, proc.log_tail()


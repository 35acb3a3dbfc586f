"""Config: file + env overrides, validation naming the key, exit 78 before binding."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from citadeld.config import ConfigError, load_config, redact

ROOT = Path(__file__).resolve().parents[2]


def test_embedded_defaults() -> None:
    cfg = load_config(None, env={})
    assert cfg.server.listen == "127.0.0.1:8000"
    assert cfg.cache.backend == "memory"
    m = cfg.embedding.models["all-minilm"]
    assert (m.backend, m.dims, m.max_context) == ("local", 384, 256)


def test_shipped_config_configures_the_four_models() -> None:
    cfg = load_config(ROOT / "etc" / "citadel.yaml", env={})
    assert set(cfg.embedding.models) == {
        "nomic-embed-text", "mxbai-embed-large", "bge-m3", "all-minilm"
    }
    assert cfg.embedding.models["bge-m3"].dims == 1024
    assert all(m.backend == "ollama" for m in cfg.embedding.models.values())


def test_env_overrides_single_keys(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("server:\n  listen: 127.0.0.1:9000\n")
    cfg = load_config(f, env={
        "CITADEL_SERVER__LISTEN": "0.0.0.0:9100",
        "CITADEL_EMBEDDING__MODELS__ALL_MINILM__BATCH__MAX_ITEMS": "64",
        "CITADEL_CACHE__TTL_S": "60",
        "UNRELATED": "x",
    })
    assert cfg.server.listen == "0.0.0.0:9100"
    assert cfg.server.port == 9100
    assert cfg.cache.ttl_s == 60
    assert cfg.embedding.models["all-minilm"].batch.max_items == 64


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("server:\n  lisen: 1.2.3.4:80\n", "server.lisen: unknown key"),
        ("server:\n  listen: nope\n", "server.listen"),
        ("cache:\n  backend: redis\n", "redis_url"),
        ("embedding:\n  default_model: missing\n", "default_model"),
        ("embedding:\n  models:\n    x: {backend: ollama, dims: 8}\n", "endpoints"),
        ("embedding:\n  models:\n    all-minilm: {backend: local, dims: -1}\n",
         "embedding.models.all-minilm.dims"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("server: [\n", "not valid YAML"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, yaml_text: str, needle: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(f, env={})
    assert needle in str(err.value)


def test_env_error_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"server\.max_body_bytes"):
        load_config(None, env={"CITADEL_SERVER__MAX_BODY_BYTES": "tiny"})


def test_redact_masks_secrets(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        "cache: {backend: redis, redis_url: 'redis://:pw@h:6379/0'}\n"
        "embedding:\n  default_model: m\n  models:\n"
        "    m: {backend: openai, dims: 4, endpoints: [{url: 'http://h', api_key: sekret}]}\n"
    )
    out = redact(load_config(f, env={}))
    assert out["embedding"]["models"]["m"]["endpoints"][0]["api_key"] == "***"
    assert "pw" not in out["cache"]["redis_url"]


def test_bad_config_exits_78_before_binding(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    f = tmp_path / "bad.yaml"
    f.write_text(f"server:\n  listen: 127.0.0.1:{port}\n  bogus: 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "citadeld.main", "--config", str(f)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 78
    assert "server.bogus" in proc.stderr
    with socket.socket() as s:  # nothing was bound: the port is still free
        s.bind(("127.0.0.1", port))


def test_check_config_ok() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "citadeld.main", "--check-config", "-c",
         str(ROOT / "etc" / "citadel.yaml")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr

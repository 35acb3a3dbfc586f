"""The auth, cors and limits sections: defaults, errors that name the key, the environment,
redaction, the --insecure guard and `citadeld keygen`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from citadeld.config import Config, ConfigError, load_config, redact
from citadeld.security.config import AuthConfig, CORSConfig, LimitsConfig
from citadeld.security.exposure import exposure_problem, is_loopback
from citadeld.security.key_store import KeyStore
from citadeld.security.keygen import main as keygen_main
from citadeld.security.keys import KeyTable

ROOT = Path(__file__).resolve().parents[3]


def test_defaults() -> None:
    cfg = Config()
    assert cfg.auth.enabled is False and cfg.cors.allow_origins == ()
    assert set(cfg.auth.open_routes) == {"/health/live", "/health/ready", "/health", "/metrics"}
    assert cfg.auth.jwt.algorithms == ("RS256", "ES256") and not cfg.auth.jwt.enabled
    shipped = load_config(ROOT / "etc" / "citadel.yaml", env={})
    assert shipped.auth.enabled is True


@pytest.mark.parametrize(("text", "needle"), [
    ("auth: {jwt: {leeway_s: 301}}", "auth.jwt.leeway_s"),
    ("auth: {jwt: {jwks_url: 'https://x/jwks'}}", "jwt.issuer is required"),
    ("auth: {jwt: {jwks_url: 'ftp://x'}}", "auth.jwt.jwks_url"),
    ("auth: {jwt: {algorithms: [HS256]}}", "auth.jwt.algorithms"),
    ("auth: {jwt: {algorithms: [none]}}", "auth.jwt.algorithms"),
    ("auth: {jwt: {hs256_secret: short}}", "auth.jwt.hs256_secret"),
    ("auth: {jwt: {role_claim: 'a..b'}}", "role_claim"),
    ("auth: {rules: [{path: /x, role: god}]}", "auth.rules.0.role"),
    ("auth: {rules: [{path: /x, role: user, methods: [FETCH]}]}", "auth.rules.0.methods"),
    ("auth: {api_keys: [{id: XYZ, sha256: '00'}]}", "auth.api_keys.0.id"),
    ("auth: {nope: 1}", "auth.nope: unknown key"),
    ("cors: {allow_origins: ['https://ui.example.org/path']}", "cors.allow_origins"),
    ("limits: {max_field_size: 10}", "limits.max_field_size"),
    ("limits: {keepalive_timeout_s: 0}", "limits.keepalive_timeout_s"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as info:
        load_config(path, env={})
    assert needle in str(info.value), str(info.value)


def test_env_and_redaction() -> None:
    cfg = load_config(None, env={"CITADEL_AUTH__ENABLED": "true",
                                 "CITADEL_AUTH__JWT__HS256_SECRET": "x" * 40,
                                 "CITADEL_CORS__ALLOW_ORIGINS": "[https://ui.example.org]"})
    assert cfg.auth.enabled and cfg.auth.jwt.enabled
    assert cfg.cors.allow_origins == ("https://ui.example.org",)
    assert redact(cfg)["auth"]["jwt"]["hs256_secret"] == "***"


def test_limits_reach_aiohttp() -> None:
    kw = LimitsConfig(max_field_size=4096, keepalive_timeout_s=7).runner_kwargs()
    assert kw["max_field_size"] == 4096 and kw["keepalive_timeout"] == 7
    assert kw["max_headers"] == 100  # this aiohttp knows it
    assert CORSConfig(allow_origins=["https://a.test/"]).allow_origins == ("https://a.test",)


@pytest.mark.parametrize(("listen", "enabled", "insecure", "refused"), [
    ("127.0.0.1:8000", False, False, False),
    ("[::1]:8000", False, False, False),
    ("localhost:8000", False, False, False),
    ("127.8.0.1:8000", False, False, False),
    ("0.0.0.0:8000", False, False, True),
    ("[::]:8000", False, False, True),
    ("10.0.0.5:8000", False, False, True),
    ("node1.cluster:8000", False, False, True),
    ("0.0.0.0:8000", True, False, False),
    ("0.0.0.0:8000", False, True, False),
])
def test_exposure(listen: str, enabled: bool, insecure: bool, refused: bool) -> None:
    cfg = Config.model_validate({"server": {"listen": listen}, "auth": {"enabled": enabled}})
    problem = exposure_problem(cfg, insecure)
    assert (problem is not None) == refused
    if problem:
        assert "--insecure" in problem and listen in problem
    assert is_loopback("::1") and not is_loopback("example.org")


def test_check_config_refuses_exposure_with_78(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"server": {"listen": "0.0.0.0:9"}}))
    r = subprocess.run([sys.executable, "-m", "citadeld.main", "-c", str(path),
                        "--check-config"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 78 and "refusing to listen" in r.stderr
    r = subprocess.run([sys.executable, "-m", "citadeld.main", "-c", str(path),
                        "--check-config", "--insecure"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


async def test_keygen_entry_is_accepted_by_the_config(capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    assert keygen_main(["ci-bot", "--role", "developer", "--rate", "60"]) == 0
    out, err = capsys.readouterr()
    key = err.split(": ", 1)[1].strip()
    entries = yaml.safe_load(out)
    cfg = Config.model_validate({"auth": {"enabled": True, "api_keys": entries}})
    assert cfg.auth.api_keys[0].role == "developer" and key not in out
    store = KeyStore(cfg.auth, None, str(tmp_path))
    p = store.table.verify(key)
    assert not isinstance(p, str) and p.role == "developer" and p.rate_per_min == 60
    assert isinstance(store.table, KeyTable) and AuthConfig().enabled is False

"""GCRA bucket math, group resolution, keys and headers - driven with an exact fake clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citadeld.config import Config, ConfigError, load_config
from citadeld.security.buckets import LocalBuckets, Policy, gcra
from citadeld.security.principal import LOCAL, Principal
from citadeld.security.ratelimit import RateLimiter, headers_of, redis_url_of
from citadeld.security.ratelimit_audit_config import RateLimitsConfig


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_fresh_bucket_allows_exactly_burst_at_once() -> None:
    p = Policy(per_min=60, burst=5)
    tat = None
    remaining = []
    for _ in range(5):
        new, d = gcra(tat, 100.0, p)
        assert d.allowed and new is not None
        tat = new
        remaining.append(d.remaining)
    assert remaining == [4, 3, 2, 1, 0]
    new, d = gcra(tat, 100.0, p)
    assert not d.allowed and new is None
    assert d.retry_after_s == pytest.approx(1.0)  # one interval (60/60 s) until a token
    assert d.reset_s == pytest.approx(5.0)  # five intervals until the bucket is full


def test_refill_is_one_token_per_interval() -> None:
    p = Policy(per_min=120, burst=2)  # interval 0.5 s
    b = LocalBuckets(clock=(c := Clock()))
    assert [b.check("k", p).allowed for _ in range(3)] == [True, True, False]
    c.t += 0.49
    assert not b.check("k", p).allowed
    c.t += 0.02
    d = b.check("k", p)
    assert d.allowed and d.remaining == 0
    assert not b.check("k", p).allowed
    c.t += 10  # long idle: back to a full bucket, never more than burst
    assert [b.check("k", p).allowed for _ in range(3)] == [True, True, False]


def test_refused_requests_do_not_consume() -> None:
    p = Policy(per_min=60, burst=1)
    b = LocalBuckets(clock=(c := Clock()))
    assert b.check("k", p).allowed
    for _ in range(100):  # hammering while limited must not push the next slot further out
        assert not b.check("k", p).allowed
    c.t += 1.0
    assert b.check("k", p).allowed


def test_keys_are_independent() -> None:
    p = Policy(per_min=60, burst=1)
    b = LocalBuckets(clock=Clock())
    assert b.check("a", p).allowed and b.check("b", p).allowed
    assert not b.check("a", p).allowed


@settings(max_examples=200, deadline=None)
@given(per_min=st.floats(1, 100_000), burst=st.integers(1, 500),
       gaps=st.lists(st.floats(0, 5), min_size=1, max_size=200))
def test_never_more_than_burst_plus_rate_over_any_window(per_min: float, burst: int,
                                                         gaps: list[float]) -> None:
    """Over any run, allowed <= burst + elapsed * rate (the token-bucket bound)."""
    p = Policy(per_min, burst)
    b = LocalBuckets(clock=(c := Clock(0.0)))
    allowed = 0
    for g in gaps:
        c.t += g
        allowed += b.check("k", p).allowed
    assert allowed <= burst + math.floor((c.t + 1e-6) / p.interval_s + 1e-9)
    assert allowed >= 1


def test_local_buckets_are_bounded() -> None:
    p = Policy(per_min=60, burst=10)
    b = LocalBuckets(max_keys=100, clock=Clock())
    for i in range(1000):
        b.check(f"k{i}", p)
    assert len(b) <= 100


def _limiter(**cfg: object) -> RateLimiter:
    return RateLimiter(RateLimitsConfig(enabled=True, **cfg), None)  # type: ignore[arg-type]


def test_route_groups() -> None:
    rl = _limiter()
    assert rl.group_of("/api/v1/embed") == "embedding"
    assert rl.group_of("/v1/embeddings") == "embedding"
    assert rl.group_of("/api/embed") == "embedding"
    assert rl.group_of("/api/embeddings") == "embedding"  # not "/api/embed" + "dings"
    assert rl.group_of("/v1/chat/completions") == "llm"
    assert rl.group_of("/api/v1/vectors/{id}") == "vectors"
    assert rl.group_of("/api/v1/audit") == "default"
    assert rl.group_of("unmatched") == "default"  # 404 scanners are limited too
    assert rl.group_of("/health/ready") is None
    assert rl.group_of("/metrics") is None
    assert rl.group_of("/healthz") == "default"  # prefix means a path segment


def test_defaults_and_policy_override() -> None:
    rl = _limiter()
    assert rl.policy(LOCAL, "embedding") == Policy(100, 100)  # the original plans' 100/min
    key = Principal("k1", "user", "key", key_id="k1", rate_per_min=1000)
    assert rl.policy(key, "embedding") == Policy(1000, 1000)
    rl2 = _limiter(embedding={"per_min": 100, "burst": 10, "routes": ["/api/v1/embed"]})
    assert rl2.policy(key, "embedding") == Policy(1000, 100)  # keeps the burst proportion


def test_subject_and_key() -> None:
    rl = _limiter()
    anon = Principal("10.0.0.7", "anonymous", "anonymous")
    assert rl.subject(anon, "10.0.0.7") == "ip:10.0.0.7"
    assert rl.subject(LOCAL, "10.0.0.8") == "ip:10.0.0.8"  # auth off: per client address
    key = Principal("ci-bot", "user", "key", key_id="abc")
    assert rl.subject(key, "10.0.0.9") == "key:abc"
    jwt = Principal("user-1", "user", "jwt")
    assert rl.key("llm", rl.subject(jwt, None)) == "citadel:rl:llm:jwt:user-1"
    long = rl.key("llm", "jwt:" + "x" * 1000)
    assert len(long) < 80 and long.startswith("citadel:rl:llm:h:")


def test_headers() -> None:
    _, d = gcra(None, 0.0, Policy(100, 100))
    h = headers_of(d)
    assert h == {"RateLimit-Limit": "100", "RateLimit-Remaining": "99", "RateLimit-Reset": "1",
                 "RateLimit-Policy": "100;w=60;burst=100"}


def test_config_validation_and_redis_choice() -> None:
    cfg = load_config(env={"CITADEL_RATE_LIMITS__ENABLED": "true",
                           "CITADEL_RATE_LIMITS__EMBEDDING__PER_MIN": "5"})
    assert cfg.rate_limits.enabled and cfg.rate_limits.embedding.per_min == 5
    assert cfg.rate_limits.embedding.routes  # overriding the limit keeps the routes
    for env in ({"CITADEL_RATE_LIMITS__EMBEDDING__PER_MIN": "0"},
                {"CITADEL_RATE_LIMITS__REDIS_URL": "http://x"},
                {"CITADEL_RATE_LIMITS__DEFAULT__ROUTES": "[api]"},
                {"CITADEL_RATE_LIMITS__NOPE": "1"},
                {"CITADEL_AUDIT__EXCLUDE_PATHS": "[metrics]"}):
        with pytest.raises(ConfigError):
            load_config(env=env)
    rl = RateLimitsConfig()
    assert redis_url_of(rl, "redis://c") == "redis://c"
    assert redis_url_of(RateLimitsConfig(backend="local"), "redis://c") is None
    assert redis_url_of(RateLimitsConfig(redis_url="redis://r"), "redis://c") == "redis://r"
    assert not Config().rate_limits.enabled  # the embedded default trusts loopback callers


def test_openapi_documents_429_on_every_limited_route() -> None:
    from citadeld import __version__
    from citadeld.http.openapi import build_openapi

    doc = build_openapi(__version__, ["all-minilm"])
    limited = exempt = 0
    for path, item in doc["paths"].items():
        for op in item.values():
            ref = op["responses"].get("429", {}).get("$ref", "")
            if path.startswith(("/health", "/metrics", "/openapi.json", "/docs")):
                assert not ref.endswith("TooManyRequests"), path
                exempt += 1
            else:
                assert ref.endswith("TooManyRequests"), path
                limited += 1
    assert limited > 20 and exempt >= 5
    resp = doc["components"]["responses"]["OpenAITooManyRequests"]
    assert {"Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset",
            "RateLimit-Policy"} <= set(resp["headers"])
    assert resp["content"]["application/json"]["example"]["error"]["type"] == "rate_limit_error"

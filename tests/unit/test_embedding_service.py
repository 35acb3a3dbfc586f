"""EmbeddingService on the in-process cache: all-cached answers share the cached rows."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from citadeld.cache_core import SHORT_TEXT, MemoryCache, cache_key
from citadeld.config import load_config
from citadeld.embedding import EmbeddingService
from citadeld.errors import BadRequest
from citadeld.metrics import Metrics


class NoPool:
    async def embed(self, texts: list[str], truncate: bool) -> list[Any]:
        raise AssertionError("a cached text reached the backend")


def _service() -> tuple[EmbeddingService, MemoryCache, np.ndarray]:
    cfg = load_config(None)
    cache = MemoryCache(max_entries=10, ttl_s=60)
    name = cfg.embedding.default_model
    m = cfg.embedding.models[name]
    vec = np.arange(m.dims, dtype=np.float32) / m.dims
    cache.put_many([(cache.key(name, m.dims, m.normalize, "cached text"), vec)])
    svc = EmbeddingService(cfg.embedding, {name: NoPool()}, cache, Metrics())  # type: ignore[dict-item]
    return svc, cache, vec


def test_all_cached_answer_hands_out_the_cached_row() -> None:
    svc, cache, vec = _service()
    out = asyncio.run(svc.embed(None, ["cached text"]))
    assert out.cached == [True] and out.tokens == [0] and out.dims == vec.shape[0]
    assert np.array_equal(out.rows[0], vec)
    assert not out.rows[0].flags.writeable  # shared with the cache: nobody may mutate it
    assert out.vectors.shape == (1, vec.shape[0]) and np.array_equal(out.vectors[0], vec)
    two = asyncio.run(svc.embed(None, ["cached text", "cached text"]))
    assert two.vectors.shape == (2, vec.shape[0]) and two.cached == [True, True]
    assert cache.hits == 3


@pytest.mark.parametrize(("texts", "code"), [
    ([], "invalid_request"), (["ok", ""], "invalid_request"), (["x" * 10**6], "input_too_long"),
])
def test_inputs_are_checked_before_the_cache(texts: list[str], code: str) -> None:
    svc, _, _ = _service()
    with pytest.raises(BadRequest) as err:
        asyncio.run(svc.embed(None, texts))
    assert err.value.code == code


@pytest.mark.parametrize(("model", "texts", "error"), [
    ("no-such-model", ["cached text"], "model_not_found"), (None, [""], "invalid_request"),
    (None, ["x" * 10**6], "input_too_long"), ("", ["x" * 10**6], "input_too_long"),
])
def test_the_one_text_shortcut_refuses_what_the_general_checks_refuse(
        model: str | None, texts: list[str], error: str) -> None:
    svc, _, _ = _service()
    with pytest.raises(Exception) as err:
        svc.embed_now(model, texts)
    assert getattr(err.value, "code", None) == error


def test_a_cache_hit_is_counted_in_the_metrics() -> None:
    svc, _, _ = _service()
    name = svc.cfg.default_model
    for model in (None, name, f"{name}:latest"):
        out = svc.embed_now(model, ["cached text"])
        assert not asyncio.iscoroutine(out) and out.model == name  # type: ignore[union-attr]
    assert svc.metrics.cache_hits.labels().value == 3
    text = svc.metrics.registry.get_sample_value(
        "citadel_embed_stage_seconds_count", {"model": name, "stage": "cache"})
    assert text == 3


def test_a_reloaded_config_applies_its_live_limits() -> None:
    svc, _, _ = _service()
    assert svc.embed_now(None, ["cached text"]).cached == [True]  # type: ignore[union-attr]
    svc.cfg = svc.cfg.model_copy(update={"max_input_chars": 5, "max_inputs": 1})
    with pytest.raises(BadRequest) as err:
        svc.embed_now(None, ["cached text"])
    assert err.value.code == "input_too_long"
    with pytest.raises(BadRequest) as err:
        svc.embed_now(None, ["a", "b"])
    assert err.value.code == "too_many_inputs"


class EchoPool:
    """Embeds by text length, so each text gets its own vector; counts what reached it."""

    def __init__(self, dims: int) -> None:
        self.dims = dims
        self.seen: list[str] = []

    async def embed(self, texts: list[str], truncate: bool) -> list[Any]:
        self.seen += texts
        return [(np.full(self.dims, len(t), dtype=np.float32), 1) for t in texts]


@pytest.mark.parametrize("length", [1, SHORT_TEXT, SHORT_TEXT + 1, 5000])
def test_short_and_long_texts_are_cached_and_kept_apart(length: int) -> None:
    cfg = load_config(None)
    name = cfg.embedding.default_model
    dims = cfg.embedding.models[name].dims
    cache = MemoryCache(max_entries=10, ttl_s=60)
    pool = EchoPool(dims)
    svc = EmbeddingService(cfg.embedding, {name: pool}, cache, Metrics())  # type: ignore[dict-item]
    text, near = "x" * length, "x" * (length - 1) + "y"
    first = asyncio.run(svc.embed(None, [text, near]))
    again = asyncio.run(svc.embed(None, [text]))
    assert first.cached == [False, False] and again.cached == [True]
    assert np.array_equal(again.rows[0], first.rows[0]) and pool.seen == [text, near]
    key = cache.key(name, dims, True, text)
    # short texts key themselves (exact), long ones by the same digest Redis uses
    assert key == ((name, dims, True, text) if length <= SHORT_TEXT
                   else cache_key(name, dims, True, text))
    other_dims = asyncio.run(svc.embed(None, [text], dimensions=dims // 2))
    assert other_dims.cached == [False] and other_dims.dims == dims // 2

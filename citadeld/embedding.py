"""EmbeddingService: what every embedding route calls, whatever its dialect.

Order of work per request: resolve the model, look all inputs up in the cache in one batched call,
send only the misses to the model's pool, reduce dimensions, write the new vectors back (fire and
forget), and fall back to another model only where the config says so. Every answer names the
model that produced it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable

import numpy as np

from citadeld.actors.cache import EmbeddingCache
from citadeld.actors.embedder_pool import EmbedderPool
from citadeld.cache_core import Key
from citadeld.config import EmbeddingConfig, ModelConfig
from citadeld.errors import (
    BadRequest,
    ItemError,
    ModelNotFound,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from citadeld.metrics import Metrics


class EmbedOutcome:
    """What an embedding call produced, in input order.

    ``rows`` are the vectors as 1-D arrays, which is how answers serialise them; on an
    all-cached answer they are the cached arrays themselves (read-only, shared), and the 2-D
    ``vectors`` is only built if someone asks for it. (``list(array2d)`` would also give rows,
    but numpy ends that iteration with an IndexError, a costly exception per answer.)
    """

    __slots__ = ("_vectors", "cached", "dims", "model", "rows", "tokens", "total_tokens")

    def __init__(self, model: str, vectors: np.ndarray | None, cached: list[bool],
                 tokens: list[int], rows: list[np.ndarray] | None = None) -> None:
        self.model = model
        self._vectors = vectors
        self.cached = cached
        self.tokens = tokens
        if rows is None:
            assert vectors is not None
            rows = [vectors[i] for i in range(vectors.shape[0])]
        self.rows = rows
        # plain attributes, not properties: every answer reads them (a property is a call)
        self.dims = int(rows[0].shape[0]) if rows else 0
        self.total_tokens = sum(tokens)

    @property
    def vectors(self) -> np.ndarray:
        """(n, dims) float32; may be a read-only view of cached rows."""
        if self._vectors is None:
            self._vectors = (self.rows[0].reshape(1, -1) if len(self.rows) == 1
                             else np.stack(self.rows))
        return self._vectors


def _keys(cache: EmbeddingCache, name: str, dims: int, normalize: bool,
          texts: list[str]) -> list[Key]:
    key = cache.key
    if len(texts) == 1:  # most requests: no comprehension (each builds a function object)
        return [key(name, dims, normalize, texts[0])]
    return [key(name, dims, normalize, t) for t in texts]


class EmbeddingService:
    def __init__(
        self,
        cfg: EmbeddingConfig,
        pools: dict[str, EmbedderPool],
        cache: EmbeddingCache,
        metrics: Metrics,
    ) -> None:
        self.cfg = cfg
        self.pools = pools
        self.cache = cache
        self.metrics = metrics
        self._names: dict[str, str] = {}
        for name, m in cfg.models.items():
            self._names[name] = name
            for alias in m.aliases:
                self._names[alias] = name
        # Ollama clients say "all-minilm:latest" for "all-minilm"
        for name in cfg.models:
            self._names.setdefault(f"{name}:latest", name)
        self._cache_stage = {n: metrics.embed_stage.labels(n, "cache") for n in cfg.models}
        # dims and normalisation need a restart to change (they are part of every cache key)
        self._facts = {n: (m.dims, m.normalize) for n, m in cfg.models.items()}
        self._hits = metrics.cache_hits.labels()

    @property
    def cfg(self) -> EmbeddingConfig:
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: EmbeddingConfig) -> None:
        """A reload installs a new config here; the limits it may change live are copied out
        again. Plain copies of what every request reads: pydantic models answer attribute reads
        three times slower than a plain attribute, a measurable cost at ten reads per cache hit."""
        self._cfg = cfg
        self._max_inputs = cfg.max_inputs
        self._max_chars = cfg.max_input_chars
        self._default = cfg.default_model

    def resolve(self, model: str | None) -> str:
        if model is None or model == "":
            return self._default
        name = self._names.get(model)
        if name is None:
            raise ModelNotFound(f"model {model!r} is not configured", param="model")
        return name

    def model_cfg(self, name: str) -> ModelConfig:
        return self.cfg.models[name]

    def check_inputs(self, texts: list[str]) -> None:
        """Limits shared by every dialect; per-dialect shape checks happen in the routes."""
        if not texts:
            raise BadRequest("input must contain at least one text", param="input")
        if len(texts) > self._max_inputs:
            raise BadRequest(
                f"too many inputs: {len(texts)} (at most {self._max_inputs} per request)",
                code="too_many_inputs",
                param="input",
            )
        limit = self._max_chars
        for t in texts:
            if not t or len(t) > limit:
                self._refuse(texts, limit)

    @staticmethod
    def _refuse(texts: list[str], limit: int) -> None:
        for i, t in enumerate(texts):
            if not t:
                raise BadRequest(f"input {i} is empty", param="input")
            if len(t) > limit:
                raise BadRequest(
                    f"input {i} has {len(t)} characters (at most {limit})",
                    code="input_too_long",
                    param="input",
                )

    async def embed(
        self,
        model: str | None,
        texts: list[str],
        *,
        use_cache: bool = True,
        truncate: bool | None = None,
        dimensions: int | None = None,
    ) -> EmbedOutcome:
        out = self.embed_now(model, texts, use_cache=use_cache, truncate=truncate,
                             dimensions=dimensions)
        return out if isinstance(out, EmbedOutcome) else await out

    def embed_now(
        self,
        model: str | None,
        texts: list[str],
        *,
        use_cache: bool = True,
        truncate: bool | None = None,
        dimensions: int | None = None,
    ) -> EmbedOutcome | Awaitable[EmbedOutcome]:
        """``embed`` without a coroutine when the in-process cache has every text (the hot
        path): the outcome itself; otherwise an awaitable of it, which goes on from the
        lookup already made (a route awaits it: ``out if isinstance(out, EmbedOutcome)``)."""
        # the common request inline (one text, a known model): every call saved here is paid
        # once per cache hit; anything else takes the general checks, which raise
        name = self._names.get(model) if model else self._default
        if name is None or len(texts) != 1 or not texts[0] or len(texts[0]) > self._max_chars:
            name = self.resolve(model)
            self.check_inputs(texts)
        if use_cache:
            full, normalize = self._facts[name]
            dims = full if dimensions is None else self._dims(name, full, dimensions)
            t0 = time.perf_counter()
            keys = ([self.cache.key(name, dims, normalize, texts[0])] if len(texts) == 1
                    else _keys(self.cache, name, dims, normalize, texts))
            found = self.cache.lookup_now(keys)  # the in-process cache answers without a hop
            if found is not None:
                hit = found[0] if len(found) == 1 else None
                if hit is not None and hit.shape == (dims,):
                    self._cache_stage[name].observe(time.perf_counter() - t0)  # _looked, inline
                    self._hits.inc(1)
                    return EmbedOutcome(name, None, [True], [0], rows=found)  # type: ignore[arg-type]
                looked = self._looked(name, dims, keys, found, t0)
                if isinstance(looked, EmbedOutcome):
                    return looked
                return self._embed_guarded(name, texts, use_cache, truncate, dimensions,
                                           looked)
        return self._embed_guarded(name, texts, use_cache, truncate, dimensions, None)

    async def _embed_guarded(
        self,
        name: str,
        texts: list[str],
        use_cache: bool,
        truncate: bool | None,
        dimensions: int | None,
        looked: tuple[list[Key], list[np.ndarray | None], list[int]] | None,
    ) -> EmbedOutcome:
        try:
            return await self._embed_with(name, texts, use_cache, truncate, dimensions, looked)
        except (Unavailable, UpstreamError, UpstreamTimeout):
            fallback = self.cfg.models[name].fallback_model
            if fallback is None:
                raise
            return await self._embed_with(fallback, texts, use_cache, truncate, dimensions)

    @staticmethod
    def _dims(name: str, full: int, dimensions: int | None) -> int:
        # JSON Schema's integer admits 356.0; numpy shapes and the cache key need an int
        dims = full if dimensions is None else int(dimensions)
        if not 1 <= dims <= full:
            raise BadRequest(
                f"dimensions must be between 1 and {full} for model {name}",
                param="dimensions",
            )
        return dims

    def _looked(
        self, name: str, dims: int, keys: list[Key], hits: list[np.ndarray | None],
        t0: float,
    ) -> EmbedOutcome | tuple[list[Key], list[np.ndarray | None], list[int]]:
        """Account a cache lookup: the outcome when every text hit, else (keys, hits, misses)."""
        self._cache_stage[name].observe(time.perf_counter() - t0)
        shape = (dims,)
        misses = []
        for i, hit in enumerate(hits):
            if hit is None or hit.shape != shape:
                misses.append(i)
        n = len(keys)
        if n - len(misses):
            self._hits.inc(n - len(misses))
        if not misses:  # all cached (the hot path): the cached rows themselves, no copy
            # no None left in hits (typing.cast would be a call per request)
            return EmbedOutcome(name, None, [True] * n, [0] * n, rows=hits)  # type: ignore[arg-type]
        self.metrics.cache_misses.inc(len(misses))
        return keys, hits, misses

    async def _embed_with(
        self,
        name: str,
        texts: list[str],
        use_cache: bool,
        truncate: bool | None,
        dimensions: int | None,
        looked: tuple[list[Key], list[np.ndarray | None], list[int]] | None = None,
    ) -> EmbedOutcome:
        full, normalize = self._facts[name]
        dims = self._dims(name, full, dimensions)
        n = len(texts)
        keys: list[Key] = []
        hits: list[np.ndarray | None] = []
        if not use_cache:
            misses = list(range(n))
        elif looked is not None:  # embed_now looked already
            keys, hits, misses = looked
        else:
            t0 = time.perf_counter()
            keys = _keys(self.cache, name, dims, normalize, texts)
            found = self.cache.lookup_now(keys)  # the in-process cache answers without a hop
            hits = found if found is not None else await self.cache.get_many(keys)
            got = self._looked(name, dims, keys, hits, t0)
            if isinstance(got, EmbedOutcome):
                return got
            keys, hits, misses = got
        mcfg = self.cfg.models[name]
        trunc = mcfg.truncate if truncate is None else truncate
        vectors = np.empty((n, dims), dtype=np.float32)
        cached = [False] * n
        tokens = [0] * n
        for i, hit in enumerate(hits):
            if hit is not None and hit.shape == (dims,):
                vectors[i] = hit
                cached[i] = True
        if misses:
            pool = self.pools[name]
            try:
                results = await pool.embed([texts[i] for i in misses], trunc)
            except ItemError as exc:
                index = misses[exc.index] if exc.index is not None else None
                where = f"input {index}" if index is not None else "an input"
                if exc.error.kind != "client":  # e.g. NaN from the backend: not the caller's fault
                    raise UpstreamError(f"{where}: {exc.error.message}") from None
                raise BadRequest(
                    f"{where}: {exc.error.message}", code="input_rejected", param="input"
                ) from None
            fresh: list[tuple[Key, np.ndarray]] = []
            for i, (vec, ntok) in zip(misses, results, strict=True):
                out = _reduce(vec, dims, normalize) if dims != vec.shape[0] else vec
                if not np.all(np.isfinite(out)):
                    raise UpstreamError(f"backend returned non-finite values for input {i}")
                vectors[i] = out
                tokens[i] = ntok
                if use_cache:
                    fresh.append((keys[i], vectors[i].copy()))
            if fresh:
                self.cache.put_many(fresh)
        return EmbedOutcome(name, vectors, cached, tokens)


def _reduce(vec: np.ndarray, dims: int, normalize: bool) -> np.ndarray:
    """Matryoshka-style reduction (as OpenAI's `dimensions`): keep the leading dims, renormalise."""
    out = np.asarray(vec[:dims], dtype=np.float32)
    if normalize:
        norm = float(np.linalg.norm(out))
        if norm > 0:
            out = out / norm
    return out


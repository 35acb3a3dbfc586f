"""The contract every embedding backend meets. Backends are synchronous: each runs inside its own
EmbedderActor thread and handles one whole batch at a time, so blocking I/O is fine there."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from citadeld.errors import BackendError


@dataclass
class BatchResult:
    """Vectors row-aligned with the batch's texts. `errors[i]` set means item i failed alone
    (its row in `vectors` is then meaningless); `tokens[i]` is the input's token count."""

    vectors: np.ndarray  # (n, dims) float32, L2-normalised when the model asks for it
    tokens: list[int]
    errors: dict[int, BackendError] = field(default_factory=dict)
    backend_s: float = 0.0  # set by the actor: time inside the backend call


class EmbeddingBackend(Protocol):
    name: str  # endpoint label for metrics and logs, e.g. "ollama@http://127.0.0.1:11434"

    def embed(self, texts: list[str], truncate: bool) -> BatchResult:
        """Embed a whole batch. Raises BackendError for failures of the whole call."""
        ...

    def probe(self) -> None:
        """Cheap liveness check of the endpoint; raises BackendError when it is down."""
        ...

    def warm(self) -> None:
        """Load the model upstream (keep_alive) so the first request pays no load time."""
        ...

    def close(self) -> None: ...

"""Deterministic benchmark texts and request-body factories, shared by every figure.

The model-limit figure and the daemon figures must embed exactly the same kind of text, and a
"miss" benchmark must never hit a cache by accident; so texts are a pure function of
``(seed, index)``: ~16 real English words, unique for every index below 256**3 and seed below
256. Body factories take keyword arguments from the load generator's command line and return a
``(index) -> bytes`` callable; the load generator hands each request a globally unique index.
"""

from __future__ import annotations

from collections.abc import Callable
from hashlib import blake2b

import orjson

BodyFn = Callable[[int], bytes]

# 256 words: three of them encode an index uniquely (256**3 ~ 16.7 M texts per seed).
_VOCAB = (
    "able account across action active actual address admit adult affect after again against "
    "agency agent agree ahead allow almost alone along already also always amount analysis "
    "animal answer anyone appear apply approach area argue around arrive article artist assume "
    "attack attention author available avoid away baby back balance bank base beat beautiful "
    "become before begin behavior behind believe benefit best better between beyond bill "
    "billion black blood blue board body book born both break bring brother budget build "
    "building business call camera campaign cancer capital card care career carry case catch "
    "cause cell center central century certain chair challenge chance change character charge "
    "check child choice church citizen city civil claim class clear close coach cold collection "
    "college color common community company compare computer concern condition conference "
    "consider consumer contain continue control cost could country couple course court cover "
    "create crime cultural culture current customer dark data daughter dead deal death debate "
    "decade decide decision deep defense degree democrat describe design despite detail "
    "determine develop difference different difficult dinner direction director discover "
    "discuss disease doctor door down draw dream drive drop drug during early east easy economic "
    "economy edge education effect effort eight either election else employee energy enjoy "
    "enough enter entire environment evening event ever every evidence exactly example "
    "executive exist expect experience expert explain family father fear federal feel field "
    "fight figure fill film final financial find fine finger finish fire firm first "
    "fish five floor focus follow food foot force foreign forget form former forward four free "
    "friend front full fund future game"
).split()
assert len(_VOCAB) == 256, len(_VOCAB)

WORDS = 16  # words per text: 3 encode the index, 1 the seed, 12 are filler


def text(index: int, seed: int = 0) -> str:
    """The ``index``-th benchmark text of ``seed``; distinct (seed, index) give distinct texts."""
    if not 0 <= index < 256**3 or not 0 <= seed < 256:
        raise ValueError("index must be in [0, 256**3) and seed in [0, 256)")
    digest = blake2b(index.to_bytes(3, "little") + bytes((seed,)), digest_size=WORDS - 4).digest()
    filler = [_VOCAB[b] for b in digest]
    ident = [_VOCAB[seed], _VOCAB[index >> 16], _VOCAB[(index >> 8) & 255], _VOCAB[index & 255]]
    # The identifying words sit in the middle so texts do not share a long common prefix.
    return " ".join(filler[:6] + ident + filler[6:])


def texts(n: int, seed: int = 0, start: int = 0) -> list[str]:
    return [text(start + i, seed) for i in range(n)]


def native_embed(
    model: str | None = None, seed: int = 0, offset: int = 0, cache: bool = True,
    distinct: int = 0,
) -> BodyFn:
    """Bodies for citadeld's ``POST /api/v1/embed``, one text each.

    ``distinct=0``: every request a new text (``offset + index``); ``distinct=N``: cycle over the
    first N texts (cache-hit workloads).
    """

    def body(i: int) -> bytes:
        j = i % distinct if distinct else offset + i
        obj: dict[str, object] = {"text": text(j, seed)}
        if model is not None:
            obj["model"] = model
        if not cache:
            obj["cache"] = False
        return orjson.dumps(obj)

    return body


def ollama_embed(model: str = "all-minilm", seed: int = 0, offset: int = 0) -> BodyFn:
    """Bodies for Ollama's ``POST /api/embed`` with one input each (no batching by the client)."""

    def body(i: int) -> bytes:
        return orjson.dumps({"model": model, "input": text(offset + i, seed)})

    return body

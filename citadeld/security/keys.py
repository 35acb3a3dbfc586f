"""API keys: the format, the hash, and the in-memory table the hot path checks.

A key is ``ck_<id>_<secret>``: ``id`` is 12 public hex digits (what `keys list`, logs and the
audit trail show), ``secret`` 32 random bytes (256 bits) in URL-safe base64. Only
``sha256(key)`` is stored. A plain, fast hash is the right tool here, unlike for passwords: a
slow KDF (bcrypt, argon2) defends low-entropy secrets against guessing, but 2^256 candidates
cannot be enumerated at any hash speed, so a leaked table reveals nothing usable, while every
request pays for the hash - one sha256 of ~60 bytes is about a microsecond.

The table lives in memory (id -> hash, role, expiry), so a request never waits on PostgreSQL;
:mod:`citadeld.security.key_store` keeps it in step with the database.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from citadeld.security.principal import Principal

PREFIX = "ck_"
ID_HEX = 12
_KEY = re.compile(r"ck_([0-9a-f]{12})_[A-Za-z0-9_-]{43}\Z")


def generate() -> tuple[str, str, str]:
    """A new key: (id, the whole key - shown once, its sha256 hex - stored)."""
    key_id = secrets.token_hex(ID_HEX // 2)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    return key_id, key, sha256_hex(key)


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def looks_like_key(token: str) -> bool:
    return token.startswith(PREFIX)


@dataclass(frozen=True, slots=True)
class KeyEntry:
    id: str
    name: str
    role: str
    digest: bytes  # sha256 of the whole key
    expires_at: float | None = None  # unix time
    rate_per_min: float | None = None
    revoked_at: float | None = None
    created_at: float | None = None
    source: str = "db"  # db | config
    principal: Principal = field(init=False, compare=False)

    def __post_init__(self) -> None:
        # built once, so a request reuses it instead of allocating its own
        object.__setattr__(self, "principal", Principal(
            name=self.id, role=self.role, kind="key", key_id=self.id,
            rate_per_min=self.rate_per_min))

    def public(self, now: float | None = None) -> dict[str, Any]:
        """What `keys list` shows: never the hash."""
        now = time.time() if now is None else now
        state = ("revoked" if self.revoked_at is not None else
                 "expired" if self.expires_at is not None and now >= self.expires_at else
                 "active")
        return {"id": self.id, "name": self.name, "role": self.role, "state": state,
                "created_at": self.created_at, "expires_at": self.expires_at,
                "revoked_at": self.revoked_at, "rate_per_min": self.rate_per_min,
                "source": self.source}


class KeyTable:
    """id -> KeyEntry; replaced wholesale on refresh (one reference swap, no lock needed on a
    single event loop)."""

    def __init__(self) -> None:
        self.entries: dict[str, KeyEntry] = {}

    def replace(self, entries: dict[str, KeyEntry]) -> None:
        self.entries = entries

    def put(self, entry: KeyEntry) -> None:
        self.entries = {**self.entries, entry.id: entry}

    def verify(self, token: str) -> Principal | str:
        """The key's principal, or why it is refused (for the security log; the client only
        learns "invalid credential"). Costs a regex match, a dict lookup, one sha256 and a
        constant-time compare."""
        m = _KEY.match(token)
        if m is None:
            return "malformed key"
        entry = self.entries.get(m.group(1))
        if entry is None:
            return "unknown key id"
        if not hmac.compare_digest(hashlib.sha256(token.encode()).digest(), entry.digest):
            return "wrong secret"
        if entry.revoked_at is not None:
            return "revoked key"
        if entry.expires_at is not None and time.time() >= entry.expires_at:
            return "expired key"
        return entry.principal


def key_id_of(token: str) -> str | None:
    """The public id of something that looks like a key (safe to log), else None."""
    m = _KEY.match(token)
    return m.group(1) if m else None

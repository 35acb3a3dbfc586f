"""API key format, hashing and the in-memory table's verdicts."""

from __future__ import annotations

import hashlib
import re
import time

from citadeld.security.keys import KeyEntry, KeyTable, generate, key_id_of, sha256_hex


def entry(key_id: str, key: str, **kw: object) -> KeyEntry:
    return KeyEntry(id=key_id, name="n", role=str(kw.pop("role", "user")),
                    digest=bytes.fromhex(sha256_hex(key)), **kw)  # type: ignore[arg-type]


def test_format_and_hash() -> None:
    seen = set()
    for _ in range(50):
        key_id, key, sha = generate()
        assert re.fullmatch(r"ck_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", key)
        assert key[3:15] == key_id and key_id_of(key) == key_id
        assert sha == hashlib.sha256(key.encode()).hexdigest()
        seen.add(key)
    assert len(seen) == 50


def test_verdicts() -> None:
    table = KeyTable()
    kid, key, _ = generate()
    table.put(entry(kid, key, rate_per_min=10.0))
    p = table.verify(key)
    assert not isinstance(p, str)
    assert (p.name, p.kind, p.key_id, p.rate_per_min, p.authenticated) == (
        kid, "key", kid, 10.0, True)
    assert table.verify(key) is p
    wrong = key[:-1] + ("a" if key[-1] != "a" else "b")
    assert table.verify(wrong) == "wrong secret"
    assert table.verify("ck_" + "0" * 12 + key[15:]) == "unknown key id"
    for bad in ("", "ck_", key + "x", key[:-1], key.upper(), "ck_" + kid + "_" + "é" * 43,
                "ck_" + kid + "-" + key[16:], " " + key, key + "\n"):
        assert table.verify(bad) == "malformed key", bad
        assert key_id_of(bad) is None or bad == key.upper()
    k2, key2, _ = generate()
    table.put(entry(k2, key2, expires_at=time.time() - 1))
    assert table.verify(key2) == "expired key"
    k3, key3, _ = generate()
    table.put(entry(k3, key3, revoked_at=time.time()))
    assert table.verify(key3) == "revoked key"
    assert {e["state"] for e in (table.entries[k].public() for k in (kid, k2, k3))} == {
        "active", "expired", "revoked"}
    assert "digest" not in table.entries[kid].public()

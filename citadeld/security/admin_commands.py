"""`citadelctl keys create|list|revoke`: API keys over the admin socket (root or the citadel
group only, see citadeld.admin.server), so creating the first admin key needs no key."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

from citadeld.actors.persistence import PersistenceError, PersistenceUnavailable
from citadeld.admin.protocol import UNAVAILABLE, AdminError
from citadeld.admin.registry import AdminContext, Param, command
from citadeld.admin.reload import live
from citadeld.security.config import ROLES, ConfigKey
from citadeld.security.key_store import KeyStore, KeyStoreError

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _store(ctx: AdminContext) -> KeyStore:
    store = ctx.state.extra.get("keys")
    if not isinstance(store, KeyStore):
        raise AdminError("authentication is off (auth.enabled: false): no API keys", "not_found")
    return store


def parse_expiry(text: str, now: float | None = None) -> float:
    """``30d``, ``12h``, ``90m``, ``2027-01-31`` or ``2027-01-31T12:00:00Z`` -> unix time."""
    now = time.time() if now is None else now
    text = text.strip()
    m = _DURATION.match(text)
    if m:
        return now + float(m.group(1)) * _UNIT[m.group(2)]
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise AdminError(f"--expires {text!r}: give a duration (30d, 12h) or an ISO date",
                         "usage") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(
        timespec="seconds")


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, **{k: _iso(row[k]) for k in ("created_at", "expires_at", "revoked_at")}}


@command("keys create", mutating=True, ask="create a new API key?",
         params=[Param("name", help="who or what the key is for"),
                 Param("role", help="user, developer or admin", choices=ROLES),
                 Param("expires", optional=True, help="e.g. 90d or 2027-01-31 (default never)"),
                 Param("rate", optional=True, help="requests per minute (default: the "
                       "configured limit)")],
         help="create an API key; its secret is shown once")
async def keys_create(ctx: AdminContext, args: dict[str, Any]) -> Any:
    store = _store(ctx)
    expires = parse_expiry(str(args["expires"])) if args.get("expires") else None
    rate = None
    if args.get("rate") is not None:
        try:
            rate = float(args["rate"])
        except ValueError:
            raise AdminError(f"--rate {args['rate']!r} is not a number", "usage") from None
    peer = ctx.peer or {}
    by = f"uid:{peer['uid']}" if "uid" in peer else None
    try:
        entry, key = await store.create(str(args["name"]), str(args["role"]),
                                        expires_at=expires, rate_per_min=rate, created_by=by)
    except KeyStoreError as exc:
        raise AdminError(str(exc), "failed") from None
    except (PersistenceUnavailable, PersistenceError) as exc:
        raise AdminError(f"PostgreSQL: {exc}; no key was created", UNAVAILABLE) from None
    return {**_public(entry.public()), "key": key,
            "note": "the key is shown only now; only its hash is stored"}


@command("keys list", help="API keys (never their secrets)")
async def keys_list(ctx: AdminContext, args: dict[str, Any]) -> Any:
    store = _store(ctx)
    now = time.time()
    return {"keys": [_public(e.public(now)) for e in store.entries()], "table": store.status()}


@command("keys revoke", mutating=True, ask="revoke this API key?",
         params=[Param("id", help="the key id (ck_<id>_...)")],
         help="revoke an API key: refused at once here, within auth.keys_refresh_s elsewhere")
async def keys_revoke(ctx: AdminContext, args: dict[str, Any]) -> Any:
    store = _store(ctx)
    key_id = str(args["id"])
    if key_id.startswith("ck_"):
        key_id = key_id[3:15]  # a whole key pasted: its id
    try:
        entry = await store.revoke(key_id)
    except KeyStoreError as exc:
        raise AdminError(str(exc), "not_found" if "no API key" in str(exc) else "failed"
                         ) from None
    except (PersistenceUnavailable, PersistenceError) as exc:
        raise AdminError(f"PostgreSQL: {exc}; the key is not revoked", UNAVAILABLE) from None
    return _public(entry.public())


@live("auth.api_keys")
def _reload_config_keys(state: Any, path: str, value: Any) -> str | None:
    """Keys listed in the config apply on reload: add one, or remove one to revoke it."""
    store = state.extra.get("keys")
    if not isinstance(store, KeyStore):
        return "authentication is off; needs a restart"
    store.set_config_keys([ConfigKey.model_validate(k) for k in value or ()])
    return None

"""Config keys (auth.api_keys) apply on `citadelctl reload`: removing one revokes it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from citadeld.admin import reload
from citadeld.config import Config
from citadeld.security import admin_commands  # noqa: F401 - registers the reload rule
from citadeld.security.key_store import KeyStore
from tests.support.auth import role_keys


async def test_reload_adds_and_removes_config_keys(tmp_path: Path) -> None:
    keys, entries = role_keys()
    running = Config.model_validate({"auth": {"enabled": True, "api_keys": entries[:1]}})
    store = KeyStore(running.auth, None, str(tmp_path))
    state = SimpleNamespace(config=running, extra={"keys": store}, pools={},
                            embedding=SimpleNamespace(cfg=None))
    assert not isinstance(store.table.verify(keys["user"]), str)
    assert isinstance(store.table.verify(keys["admin"]), str)
    new = Config.model_validate({"auth": {"enabled": True, "api_keys": entries[1:]}})
    out = reload.apply(state, reload.plan(running, new))  # type: ignore[arg-type]
    assert out["applied"] == ["auth.api_keys"] and not out["restart_required"]
    assert store.table.verify(keys["user"]) == "unknown key id"
    assert not isinstance(store.table.verify(keys["admin"]), str)
    # other auth keys still need a restart
    changed = Config.model_validate({"auth": {"enabled": True, "api_keys": entries[1:],
                                              "realm": "x"}})
    out = reload.apply(state, reload.plan(state.config, changed))  # type: ignore[arg-type]
    assert "auth.realm" in out["restart_required"]

"""citadelctl hands a command's own --options to the daemon as named arguments."""

from __future__ import annotations

import time

import pytest

from citadeld.admin.protocol import AdminError
from citadeld.admin.registry import REGISTRY
from citadeld.ctl import split_named
from citadeld.security import admin_commands
from citadeld.security.admin_commands import parse_expiry


def test_split_named() -> None:
    rest, named = split_named(["keys", "create", "ci", "--role", "admin", "--rate=100", "-y",
                               "--json", "--socket", "/s", "--expires", "30d", "--dry-run"])
    assert rest == ["keys", "create", "ci", "-y", "--json", "--socket", "/s"]
    assert named == {"role": "admin", "rate": "100", "expires": "30d", "dry_run": "true"}
    assert split_named(["status", "--timeout=3"]) == (["status", "--timeout=3"], {})


def test_keys_commands_bind_named_args() -> None:
    assert admin_commands.keys_create is not None
    cmd = REGISTRY.get("keys create")
    assert cmd is not None and cmd.mutating
    args = cmd.bind(["ci"], {"role": "user", "rate": "5"})
    assert args == {"name": "ci", "role": "user", "rate": "5"}
    with pytest.raises(AdminError, match="role must be one of"):
        cmd.bind(["ci"], {"role": "root"})
    with pytest.raises(AdminError, match="missing ROLE"):
        cmd.bind(["ci"], {})
    assert REGISTRY.get("keys revoke") is not None and REGISTRY.get("keys list") is not None


def test_parse_expiry() -> None:
    now = 1_000_000.0
    assert parse_expiry("30d", now) == now + 30 * 86400
    assert parse_expiry("12h", now) == now + 12 * 3600
    assert parse_expiry("2027-01-31", now) == 1801353600.0  # 2027-01-31T00:00:00Z
    assert parse_expiry("2027-01-31T12:00:00Z", now) == 1801396800.0
    with pytest.raises(AdminError):
        parse_expiry("soon", now)
    assert parse_expiry("1w") > time.time()

"""The unit file: notify type, watchdog, restart policy, directories, and the hardening score
that `systemd-analyze security --offline` gives it (<= 2.5)."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.packaging.conftest import ROOT, need_tool

UNIT = ROOT / "systemd" / "citadeld.service"
MAX_EXPOSURE = 2.5


def settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_service_shape() -> None:
    s = settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["ExecStart"] == ["/usr/bin/citadeld --config /etc/citadel/citadel.yaml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert int(s["WatchdogSec"][0]) > 0 and s["Restart"] == ["on-failure"]
    assert s["StartLimitBurst"] and s["StartLimitIntervalSec"]
    assert s["User"] == ["citadel"] and s["Group"] == ["citadel"]
    for d in ("RuntimeDirectory", "StateDirectory", "LogsDirectory", "ConfigurationDirectory"):
        assert s[d] == ["citadel"], d
    assert "78" in s["RestartPreventExitStatus"][0]  # a config error is not fixed by restarting
    # TimeoutStopSec leaves room for the default drain (30 s) plus stopping the actors
    assert int(s["TimeoutStopSec"][0]) >= 45
    sysusers = (ROOT / "systemd" / "citadel.sysusers").read_text()
    assert re.search(r"^u citadel ", sysusers, re.M)


def test_security_exposure_at_most_2_5() -> None:
    analyze = need_tool("systemd-analyze", "systemd")
    help_text = subprocess.run([analyze, "security", "--help"], capture_output=True,
                               text=True).stdout
    if "--offline" not in help_text:  # systemd < 250 cannot score a unit file that is not loaded
        pytest.fail("this systemd-analyze has no --offline; install systemd >= 250")
    r = subprocess.run([analyze, "security", "--offline=true",
                        f"--threshold={int(MAX_EXPOSURE * 10)}", str(UNIT)],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for citadeld.service: ([0-9.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, r.stdout
    assert r.returncode == 0, r.stdout + r.stderr

"""Packaging checks: build the .deb once per session (bounded), share it between tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 600  # wheel downloads for three CPython ABIs; about 2 minutes when warm


def need_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: apt-get install {package} (scripts/test.sh installs it)")
    return path


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The .deb built by packaging/deb/build.sh (CITADEL_DEB points at a prebuilt one)."""
    prebuilt = os.environ.get("CITADEL_DEB")
    if prebuilt:
        yield Path(prebuilt)
        return
    need_tool("dpkg-deb", "dpkg")
    out = tmp_path_factory.mktemp("deb")
    r = subprocess.run(["bash", str(ROOT / "packaging/deb/build.sh"), str(out)],
                       capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    debs = list(out.glob("citadel_*_amd64.deb"))
    assert len(debs) == 1, r.stdout
    yield debs[0]

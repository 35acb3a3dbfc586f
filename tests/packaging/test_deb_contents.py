"""The .deb itself: name, fields, files, conffiles, lintian, and a wheelhouse that resolves
offline with hashes for every Python it claims to support."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import BinaryIO

import pytest

from citadeld import __version__
from tests.packaging.conftest import ROOT, need_tool

pytestmark = pytest.mark.timeout(900)

# what Ubuntu 24.04 (noble) has, by name: the Depends must stay within it
NOBLE_HAS = {"python3", "python3-venv", "passwd", "procps", "redis-server", "postgresql"}


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                          check=True).stdout.strip()


def names(relation: str) -> set[str]:
    return {re.split(r"[ (]", alt.strip())[0] for part in relation.split(",")
            for alt in part.split("|") if alt.strip()}


def test_name_fields_and_dependencies(deb: Path) -> None:
    assert deb.name == f"citadel_{__version__}_amd64.deb"
    assert field(deb, "Package") == "citadel" and field(deb, "Architecture") == "amd64"
    assert names(field(deb, "Depends")) <= NOBLE_HAS
    assert "python3 (>= 3.11)" in field(deb, "Depends")
    assert names(field(deb, "Suggests")) <= NOBLE_HAS


def test_files_and_conffiles(deb: Path, tmp_path: Path) -> None:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout
    for path in ("./usr/bin/citadeld", "./usr/bin/citadelctl", "./etc/citadel/citadel.yaml",
                 "./usr/lib/systemd/system/citadeld.service", "./usr/lib/sysusers.d/citadel.conf",
                 "./usr/lib/tmpfiles.d/citadel.conf", "./usr/share/doc/citadel/copyright",
                 "./usr/share/doc/citadel/examples/prometheus/alerts.yml",
                 "./usr/share/doc/citadel/examples/prometheus/grafana-dashboard.json",
                 "./usr/lib/citadel/wheels/requirements-cp311.txt",
                 "./usr/lib/citadel/wheels/requirements-cp312.txt",
                 "./usr/lib/citadel/wheels/requirements-cp313.txt"):
        assert path in listing, path
    assert "torch" not in listing and "sentence_transformers" not in listing  # no `local` extra
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp_path / "ctl")], check=True)
    assert (tmp_path / "ctl" / "conffiles").read_text().split() == ["/etc/citadel/citadel.yaml"]
    assert "./opt/" not in listing  # the venv there is postinst's; dpkg must not own /opt
    for script in ("postinst", "prerm", "postrm"):
        subprocess.run(["sh", "-n", str(tmp_path / "ctl" / script)], check=True)


def test_lintian_has_no_errors(deb: Path) -> None:
    lintian = need_tool("lintian", "lintian")
    r = subprocess.run([lintian, "--fail-on", "error", "--display-level", ">=warning",
                        "--show-overrides", str(deb)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not [line for line in r.stdout.splitlines() if line.startswith("E:")], r.stdout


@pytest.mark.parametrize("pyver", ["3.11", "3.12", "3.13"])
def test_wheelhouse_installs_offline_with_hashes(deb: Path, tmp_path: Path, pyver: str) -> None:
    """Resolve the per-ABI requirements against the bundled wheels only, as postinst does, for
    each target Python (this host runs one of them; pip's --python-version checks the others)."""
    with tarfile.open(fileobj=_data_tar(deb, tmp_path)) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("./usr/lib/citadel/wheels/")]
        tar.extractall(tmp_path / "root", members=members, filter="data")
    wheels = tmp_path / "root/usr/lib/citadel/wheels"
    tag = "cp" + pyver.replace(".", "")
    # `pip download` honours --python-version for Requires-Python too (install --target does not)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-index", "--isolated",
           "--find-links", str(wheels), "--only-binary=:all:", "--require-hashes",
           "--dest", str(tmp_path / "t"), "--python-version", pyver,
           "--implementation", "cp", "--abi", tag, "--abi", "abi3", "--abi", "none",
           "-r", str(wheels / f"requirements-{tag}.txt")]
    platforms = runpy.run_path(str(ROOT / "packaging/deb/wheelhouse.py"))["PLATFORMS"]
    for plat in [*platforms, "any"]:
        cmd += ["--platform", plat]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stdout + r.stderr
    reqs = (wheels / f"requirements-{tag}.txt").read_text()
    assert re.search(r"^citadeld==", reqs, re.M)
    assert all("--hash=sha256:" in line for line in reqs.splitlines() if "==" in line)


def _data_tar(deb: Path, tmp_path: Path) -> BinaryIO:
    out = tmp_path / "data.tar"
    with out.open("wb") as f:
        subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=f, check=True)
    return out.open("rb")

"""Build the .deb's wheelhouse: citadeld's wheel and its runtime dependencies as binary wheels for
each target CPython, plus one hash-pinned requirements file per ABI.

    python packaging/deb/wheelhouse.py OUT_DIR OWN_WHEEL 3.11 3.12 3.13

Runtime dependencies only (pyproject's [project].dependencies): no `local` extra, so no torch;
the packaged config uses Ollama. Wheels must be manylinux for glibc <= 2.36 (Debian 12, the
oldest target); a dependency without such a wheel fails the build, never a node's install.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

GLIBC_MAX = 36  # Debian 12 has glibc 2.36; Ubuntu 24.04 2.39; Debian 13 2.41
PLATFORMS = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"] + [
    f"manylinux_2_{n}_x86_64" for n in range(5, GLIBC_MAX + 1)
]
WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-"
                   r"(?P<plat>[^-]+)\.whl$")


def download(out: Path, own_wheel: Path, pyver: str) -> list[Path]:
    tag = "cp" + pyver.replace(".", "")
    target = out / f".dl-{tag}"
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
           "--only-binary=:all:", "--implementation", "cp", "--python-version", pyver,
           "--abi", tag, "--abi", "abi3", "--abi", "none", "--dest", str(target)]
    for plat in [*PLATFORMS, "any"]:
        cmd += ["--platform", plat]
    subprocess.run([*cmd, str(own_wheel)], check=True)
    return sorted(target.glob("*.whl"))


def main() -> int:
    out, own = Path(sys.argv[1]), Path(sys.argv[2])
    versions = sys.argv[3:] or ["3.11", "3.12", "3.13"]
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(len(versions)) as pool:  # network-bound: one pip per ABI at once
        downloaded = dict(zip(versions, pool.map(lambda v: download(out, own, v), versions),
                              strict=True))
    for pyver in versions:
        tag = "cp" + pyver.replace(".", "")
        lines = []
        for whl in downloaded[pyver]:
            m = WHEEL.match(whl.name)
            if not m:
                raise SystemExit(f"unexpected wheel name {whl.name}")
            dest = out / whl.name  # identical names are identical files: stored once
            if not dest.exists():
                whl.replace(dest)
            digest = hashlib.sha256(dest.read_bytes()).hexdigest()
            lines.append(f"{m['name']}=={m['version']} --hash=sha256:{digest}")
        (out / f"requirements-{tag}.txt").write_text(
            f"# citadel runtime for CPython {pyver}: pip install --no-index --require-hashes\n"
            + "\n".join(sorted(lines, key=str.lower)) + "\n")
        print(f"{tag}: {len(lines)} wheels")
    for tmp in out.glob(".dl-*"):
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())

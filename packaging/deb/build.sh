#!/usr/bin/env bash
# Build citadel_<version>_amd64.deb with one command:
#     packaging/deb/build.sh [OUT_DIR]        (default: dist/)
# Needs: dpkg-deb, a Python >= 3.11 with pip (PYTHON, default .venv/bin/python, else python3)
# and PyPI for the wheelhouse (runtime dependencies only, binary wheels for CPython 3.11, 3.12 and
# 3.13: Debian 12, Ubuntu 24.04, Debian 13). PYVERSIONS overrides that list.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$(mkdir -p "${1:-$root/dist}" && cd "${1:-$root/dist}" && pwd)"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py=python3; fi
fi
pyversions="${PYVERSIONS:-3.11 3.12 3.13}"
version="$("$py" -c 'import re,sys; print(re.search(r"__version__ = \"([^\"]+)\"", open(sys.argv[1]).read())[1])' "$root/citadeld/__init__.py")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
stage="$work/stage"

echo "citadel $version: building the citadeld wheel"
(cd "$root" && "$py" -m pip wheel --quiet --disable-pip-version-check --no-deps \
    --no-build-isolation --wheel-dir "$work/own" . >/dev/null 2>&1) \
  || (cd "$root" && "$py" -m pip wheel --quiet --disable-pip-version-check --no-deps \
    --wheel-dir "$work/own" .)
own="$(ls "$work"/own/citadeld-*.whl)"
rm -rf "$root/build"  # setuptools' scratch directory

echo "citadel $version: wheelhouse for CPython $pyversions"
# shellcheck disable=SC2086
"$py" "$here/wheelhouse.py" "$stage/usr/lib/citadel/wheels" "$own" $pyversions

install -D -m 0755 "$here/debian/citadeld.wrapper" "$stage/usr/bin/citadeld"
install -D -m 0755 "$here/debian/citadelctl.wrapper" "$stage/usr/bin/citadelctl"
install -D -m 0644 "$root/etc/citadel.yaml" "$stage/etc/citadel/citadel.yaml"
install -D -m 0644 "$root/systemd/citadeld.service" "$stage/usr/lib/systemd/system/citadeld.service"
install -D -m 0644 "$root/systemd/citadel.sysusers" "$stage/usr/lib/sysusers.d/citadel.conf"
install -D -m 0644 "$root/systemd/citadel.tmpfiles" "$stage/usr/lib/tmpfiles.d/citadel.conf"
doc="$stage/usr/share/doc/citadel"
install -D -m 0644 "$here/debian/copyright" "$doc/copyright"
sed -e "s/@VERSION@/$version/g" -e "s/@DATE@/$(date -R -u -d "@${SOURCE_DATE_EPOCH:-$(date +%s)}")/" \
  "$here/debian/changelog.in" | gzip -9n > "$work/changelog.gz"
install -D -m 0644 "$work/changelog.gz" "$doc/changelog.gz"
gzip -9n < "$root/docs/operations.md" > "$work/operations.md.gz"
install -D -m 0644 "$work/operations.md.gz" "$doc/operations.md.gz"
gzip -9n < "$root/docs/security.md" > "$work/security.md.gz"
install -D -m 0644 "$work/security.md.gz" "$doc/security.md.gz"
for f in "$root"/packaging/prometheus/*; do
  install -D -m 0644 "$f" "$doc/examples/prometheus/$(basename "$f")"
done
for page in citadeld citadelctl; do
  install -d "$stage/usr/share/man/man8"
  gzip -9n < "$here/debian/$page.8" > "$stage/usr/share/man/man8/$page.8.gz"
  chmod 0644 "$stage/usr/share/man/man8/$page.8.gz"
done
install -D -m 0644 "$here/debian/lintian-overrides" "$stage/usr/share/lintian/overrides/citadel"

install -d -m 0755 "$stage/DEBIAN"
for s in postinst prerm postrm; do install -m 0755 "$here/debian/$s" "$stage/DEBIAN/$s"; done
install -m 0644 "$here/debian/conffiles" "$stage/DEBIAN/conffiles"
size="$(du -sk --exclude=DEBIAN "$stage" | cut -f1)"
sed -e "s/@VERSION@/$version/" -e "s/@SIZE@/$size/" "$here/debian/control.in" > "$stage/DEBIAN/control"
(cd "$stage" && find . -type f ! -path './DEBIAN/*' ! -path './etc/*' -printf '%P\0' | sort -z \
  | xargs -0 md5sum > DEBIAN/md5sums)
chmod 0644 "$stage/DEBIAN/md5sums"
find "$stage" -type d -exec chmod 0755 {} +

deb="$out/citadel_${version}_amd64.deb"
# gzip: the payload is mostly wheels (zip archives already); xz would take minutes for nothing
dpkg-deb --root-owner-group -Zgzip -z6 --build "$stage" "$deb" >/dev/null
echo "$deb"

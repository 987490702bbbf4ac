#!/bin/sh
# Build the Debian package:   packaging/deb/build.sh   ->  dist/sessionguard_<version>_<arch>.deb
#
# What ends up in the package
#   /opt/sessionguard/                  private venv (Debian's /usr/bin/python3.11) with
#                                       sessionguard[systemd] + orjson, structlog, watchdog
#                                       from PyPI (Debian 12 has no python3-orjson)
#   /usr/bin/sessionguardd, sessionguardctl    -> symlinks into the venv
#   /lib/systemd/system/sessionguard.{service,socket}
#   /usr/lib/sysusers.d/sessionguard.conf, /usr/lib/tmpfiles.d/sessionguard.conf,
#   /usr/lib/sysctl.d/60-sessionguard-inotify.conf
#   /etc/sessionguard/sessionguard.toml  (conffile)
#   /usr/share/doc/sessionguard/
#
# Why the venv is built inside a private mount namespace
#   A venv is not relocatable: bin/python's pyvenv.cfg, every console-script shebang
#   and pip's RECORD files name the absolute path the venv was created at.  So the
#   venv is created *at* /opt/sessionguard -- but inside `unshare --mount`, where
#   /opt/sessionguard is a bind mount of the staging directory.  Nothing on the host
#   is touched (an installed /opt/sessionguard is only shadowed inside the
#   namespace), no shebangs need rewriting, and bin/python stays a symlink to
#   /usr/bin/python3.11, so Debian's security updates of the interpreter apply.
#   (Not --copies: a copied interpreter binary would go stale on Python updates.)
#   Needs root (mount namespace).  If /opt/sessionguard does not exist it is
#   created as an empty mount point and removed again afterwards.
#
# Build requirements (installed with apt-get if missing and we are root):
#   python3.11-venv python3-dev libsystemd-dev pkg-config gcc  (systemd-python is
#   compiled from source: PyPI has no wheel for it), dpkg-dev (dpkg-deb).
set -eu

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=/usr/bin/python3.11          # Debian's interpreter, never a pyenv/virtualenv one
PREFIX=/opt/sessionguard
DIST=${DIST:-$REPO/dist}

die() { echo "build.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (uses a private mount namespace to build the venv at $PREFIX)"
[ -x "$PY" ] || die "$PY missing: apt-get install python3.11"

# -- build dependencies ---------------------------------------------------------
missing=""
for pkg in python3.11-venv python3-dev libsystemd-dev pkg-config gcc dpkg-dev; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    echo "build.sh: installing build dependencies:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends $missing \
        || { apt-get update -q && apt-get install -y -q --no-install-recommends $missing; }
fi

VERSION=$("$PY" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$REPO/pyproject.toml")
ARCH=$(dpkg --print-architecture)
PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
NEXT_PYVER=$("$PY" -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')

WORK=$(mktemp -d /tmp/sessionguard-deb.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
mkdir -p "$ROOT$PREFIX" "$DIST"

# -- 1. the venv, built at its real path ---------------------------------------
created_mountpoint=no
if [ ! -e "$PREFIX" ]; then
    mkdir -p "$PREFIX"
    created_mountpoint=yes
fi
# A clean environment: no PYTHONPATH/VIRTUAL_ENV/pyenv shims leaking into the build.
# PIP_* settings of this machine (index mirrors, certificates) are kept.
env -u PYTHONPATH -u PYTHONHOME -u VIRTUAL_ENV -u PYENV_VERSION -u PYTHONSTARTUP \
    -u PIP_USER -u PIP_TARGET -u PIP_PREFIX \
    PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    unshare --mount --propagation private sh -eu -c '
        mount --bind "$1" "$2"
        "$3" -m venv "$2"
        "$2/bin/python" -m pip install --quiet --upgrade pip
        "$2/bin/python" -m pip install --quiet "$4[systemd]"
        # pip itself is not needed at run time; drop it to keep the package small.
        "$2/bin/python" -m pip uninstall --quiet --yes pip
        "$2/bin/python" -m compileall -q -j0 "$2/lib" >/dev/null || true
    ' build "$ROOT$PREFIX" "$PREFIX" "$PY" "$REPO" || {
        [ $created_mountpoint = yes ] && rmdir "$PREFIX"
        die "venv build failed"
    }
[ $created_mountpoint = yes ] && rmdir "$PREFIX"

# Sanity: the venv must point at Debian's python and nothing under the build dirs.
grep -q "^home = /usr/bin" "$ROOT$PREFIX/pyvenv.cfg" || die "venv not based on /usr/bin python"
if grep -rlI -e "$ROOT" -e "$WORK" "$ROOT$PREFIX" >/dev/null 2>&1; then
    die "staging path leaked into the venv: $(grep -rlI -e "$ROOT" "$ROOT$PREFIX" | head -3)"
fi
# direct_url.json records where the project was installed from (the build tree): drop it.
find "$ROOT$PREFIX" -name direct_url.json -path '*sessionguard-*' -delete

# -- 2. the rest of the tree ------------------------------------------------------
install -d "$ROOT/usr/bin" "$ROOT/lib/systemd/system" "$ROOT/usr/lib/sysusers.d" \
    "$ROOT/usr/lib/tmpfiles.d" "$ROOT/usr/lib/sysctl.d" "$ROOT/etc/sessionguard" \
    "$ROOT/usr/share/doc/sessionguard/examples" "$ROOT/DEBIAN"
for exe in sessionguardd sessionguardctl; do
    [ -e "$ROOT$PREFIX/bin/$exe" ] || die "console script $exe missing in venv"
    ln -s "$PREFIX/bin/$exe" "$ROOT/usr/bin/$exe"
done
install -m 0644 "$REPO/sessionguard.service" "$ROOT/lib/systemd/system/sessionguard.service"
grep -q "^ExecStart=$PREFIX/bin/sessionguardd " "$ROOT/lib/systemd/system/sessionguard.service" \
    || die "sessionguard.service ExecStart does not point at $PREFIX/bin/sessionguardd"
install -m 0644 "$REPO/packaging/systemd/sessionguard.socket" "$ROOT/lib/systemd/system/"
install -m 0644 "$REPO/packaging/sysusers.d/sessionguard.conf" "$ROOT/usr/lib/sysusers.d/"
install -m 0644 "$REPO/packaging/tmpfiles.d/sessionguard.conf" "$ROOT/usr/lib/tmpfiles.d/"
install -m 0644 "$REPO/packaging/sysctl.d/60-sessionguard-inotify.conf" "$ROOT/usr/lib/sysctl.d/"
install -m 0644 "$REPO/packaging/sessionguard.toml" "$ROOT/etc/sessionguard/sessionguard.toml"
DOC=$ROOT/usr/share/doc/sessionguard
[ -f "$REPO/README.md" ] && install -m 0644 "$REPO/README.md" "$DOC/README.md"
install -m 0644 "$REPO/packaging/README.md" "$DOC/README.packaging.md"
install -m 0644 "$REPO/packaging/logship/vector.toml" "$REPO/packaging/logship/fluent-bit.conf" "$DOC/examples/"
cat > "$DOC/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: sessionguard
Files: *
License: MIT
Comment: /opt/sessionguard also contains third-party Python packages from PyPI;
 their licences are in /opt/sessionguard/lib/python$PYVER/site-packages/*.dist-info/.
EOF

# -- 3. DEBIAN/ -------------------------------------------------------------------
# The venv is tied to one Python minor version (lib/python3.11, cp311 extension
# modules), hence the upper bound; libsystemd0 for systemd-python's _daemon/_journal.
SIZE=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
cat > "$ROOT/DEBIAN/control" <<EOF
Package: sessionguard
Version: $VERSION
Architecture: $ARCH
Maintainer: sessionguard developers <sessionguard@localhost>
Section: admin
Priority: optional
Installed-Size: $SIZE
Depends: python3 (>= $PYVER), python$PYVER, python3 (<< $NEXT_PYVER), libsystemd0, systemd
Homepage: file:///usr/share/doc/sessionguard/
Description: keeps prior versions of chat session files that a write shrinks
 sessionguardd watches chat/agent servers' session directories (inotify plus
 periodic reconciliation) and keeps the prior version of every session file
 that a write shrinks, wipes or deletes.  sessionguardctl lists, diffs and
 restores versions over a Unix socket.
 .
 Ships a private Python virtual environment in /opt/sessionguard.
EOF
echo "/etc/sessionguard/sessionguard.toml" > "$ROOT/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "$REPO/packaging/deb/$script" "$ROOT/DEBIAN/$script"
done

OUT="$DIST/sessionguard_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$OUT" >/dev/null
echo "$OUT"

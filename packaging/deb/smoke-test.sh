#!/bin/sh
# CI smoke test of the Debian package, as root:
#
#     packaging/deb/smoke-test.sh [--keep-group] [DEB]
#
# builds the package (unless DEB is given), runs lintian on it (any error or
# warning fails), installs it with dpkg -i, checks the installed files (man pages,
# completion, no byte-code shipped but compiled by postinst), runs a
# watch-and-shrink test with the installed sessionguardd/sessionguardctl, then
# purges it and checks that /opt/sessionguard and its byte-code are gone.
#
# Like every Debian package, a purge leaves the system user and groups it created
# (sessionguard, sessionguard-admin).  By default this script then removes those it
# created; with --keep-group it leaves them as a real purge does, so that CI can run
# the test suite again on a machine where the package was installed and purged
# (issue 14) -- whoever passes --keep-group removes them afterwards.
set -eu
cd "$(dirname "$0")/../.."
keep_group=no
if [ "${1:-}" = --keep-group ]; then
    keep_group=yes
    shift
fi
if [ "$(id -u)" != 0 ]; then
    echo "deb smoke test: skipped (needs root for dpkg -i)"; exit 0
fi
if dpkg -s sessionguard >/dev/null 2>&1; then
    echo "deb smoke test: sessionguard is already installed here; refusing to replace it" >&2; exit 1
fi
fail() { echo "deb smoke test: FAILED: $*" >&2; exit 1; }

deb=${1:-}
[ -n "$deb" ] || deb=$(packaging/deb/build.sh | tail -n 1)
echo "deb smoke test: $deb ($(dpkg-deb -f "$deb" Installed-Size) kB installed)"

if ! command -v lintian >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends lintian >/dev/null
fi
lint=$(lintian --fail-on none "$deb" 2>/dev/null)
echo "$lint" | grep -E '^(E|W):' && fail "lintian reports errors or warnings"
echo "deb smoke test: lintian: no errors or warnings"

work=$(mktemp -d /tmp/sg-deb-smoke.XXXXXX)
had_user=$(getent passwd sessionguard >/dev/null && echo yes || echo no)
had_group=$(getent group sessionguard >/dev/null && echo yes || echo no)
had_admin=$(getent group sessionguard-admin >/dev/null && echo yes || echo no)
pid=""
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; fi
    dpkg -P sessionguard >/dev/null 2>&1 || true
    if [ "$keep_group" = no ]; then
        [ "$had_user" = yes ] || userdel sessionguard 2>/dev/null || true
        [ "$had_admin" = yes ] || groupdel sessionguard-admin 2>/dev/null || true
        [ "$had_group" = yes ] || groupdel sessionguard 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
dpkg -i "$deb" >/dev/null

# installed as documented
/usr/bin/sessionguardd --version
man -w sessionguardd sessionguardctl sessionguard.toml >/dev/null || fail "man pages not found by man"
[ -f /usr/share/bash-completion/completions/sessionguardctl ] || fail "no bash completion"
[ -n "$(find /opt/sessionguard -name '*.pyc' -print -quit)" ] || fail "postinst compiled no byte-code"
getent group sessionguard >/dev/null || fail "no sessionguard group after install"
/usr/bin/sessionguardd --check-config --config /etc/sessionguard/sessionguard.toml >/dev/null

# a wipe, caught by the installed daemon
mkdir "$work/sessions"
/usr/bin/python3 - "$work/sessions/abc.json" 1000 <<'PY'
import json, sys
json.dump({"title": "t", "messages": [{"role": "user", "content": str(i)} for i in range(int(sys.argv[2]))]}, open(sys.argv[1], "w"))
PY
/usr/bin/sessionguardd --watch "$work/sessions" --socket "$work/sg.sock" --log-format json >"$work/log" 2>&1 &
pid=$!
for _ in $(seq 100); do grep -q daemon.started "$work/log" && break; sleep 0.1; done
/usr/bin/python3 - "$work/sessions/abc.json" <<'PY'
import json, os, sys
tmp = sys.argv[1] + ".tmp.1.1"
json.dump({"title": "t", "messages": []}, open(tmp, "w"))
os.replace(tmp, sys.argv[1])
PY
/usr/bin/sessionguardctl --socket "$work/sg.sock" sync >/dev/null
found=$(ls "$work/sessions/.sessionguard/sessions/abc/" | grep '_1000msgs_shrink_daemon_' || true)
/usr/bin/sessionguardctl --socket "$work/sg.sock" history abc
[ -n "$found" ] || { cat "$work/log"; fail "no 1000-message version kept"; }
kill "$pid"; wait "$pid" || true; pid=""

# purged: nothing of the package is left but its users and groups
dpkg -P sessionguard >/dev/null
[ ! -e /opt/sessionguard ] || fail "/opt/sessionguard left after purge"
[ ! -e /etc/sessionguard ] || fail "/etc/sessionguard left after purge"
getent group sessionguard >/dev/null || fail "purge removed the sessionguard group (Debian packages leave it)"
echo "deb smoke test: ok ($found)"

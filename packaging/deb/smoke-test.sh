#!/bin/sh
# CI smoke test of the Debian package: build it, install it with dpkg -i, run
# the installed sessionguardd --version and a short watch-and-shrink test from
# the installed files, then purge it and the users it created. Root only.
set -eu
cd "$(dirname "$0")/../.."
if [ "$(id -u)" != 0 ]; then
    echo "deb smoke test: skipped (needs root for dpkg -i)"; exit 0
fi
if [ -e /opt/sessionguard ] && dpkg -s sessionguard >/dev/null 2>&1; then
    echo "deb smoke test: sessionguard is already installed here; refusing to replace it" >&2; exit 1
fi
deb=$(packaging/deb/build.sh | tail -n 1)
work=$(mktemp -d /tmp/sg-deb-smoke.XXXXXX)
had_user=$(getent passwd sessionguard >/dev/null && echo yes || echo no)
cleanup() {
    [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    dpkg -P sessionguard >/dev/null 2>&1 || true
    if [ "$had_user" = no ]; then
        userdel sessionguard 2>/dev/null || true
        groupdel sessionguard-admin 2>/dev/null || true
        groupdel sessionguard 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
dpkg -i "$deb" >/dev/null
/usr/bin/sessionguardd --version
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
[ -n "$found" ] || { echo "deb smoke test: FAILED, no 1000-message version kept"; cat "$work/log"; exit 1; }
echo "deb smoke test: ok ($found)"

#!/bin/sh
# Make sure the command-line tools the test suite runs exist (called by `make test`).
#
# tests/deploy needs systemd-analyze (Debian/Ubuntu package systemd) to verify the unit files
# and score their hardening; tests/test_provision.py checks certificate chains with openssl;
# Mosquitto (with mosquitto_passwd) is deploy/ensure-mosquitto.sh's. Everything present: exit
# 0 silently. Root with apt-get: install what is missing. Otherwise: one line on stderr, exit 1.
set -eu

missing=""
packages=""
while read -r cmd pkg; do
    if ! command -v "$cmd" >/dev/null 2>&1; then
        missing="$missing $cmd"
        packages="$packages $pkg"
    fi
done <<'EOF_TOOLS'
systemd-analyze systemd
openssl openssl
EOF_TOOLS
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure-tools: installing$packages with apt-get (for$missing)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086 # one word per package
    apt-get install -y -qq --no-install-recommends $packages >/dev/null
    for cmd in $missing; do
        if ! command -v "$cmd" >/dev/null 2>&1; then
            echo "ensure-tools: apt-get install$packages finished but $cmd was not found" >&2
            exit 1
        fi
    done
    exit 0
fi

echo "ensure-tools: the tests need$missing; install it (Debian/Ubuntu: sudo apt-get install$packages) and run make test again" >&2
exit 1
